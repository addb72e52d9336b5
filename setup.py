"""Build hubcore, with the compiled SSE meter (and the interpretation code its
twins share), HTTP head handling, the client connection's request path, the
upstream connection's response path, the Exchange's common path (and the
gateway's head functions it calls), the key ring's common path, the
Limiter's request path, the metrics' per-request counters, the access
log's line, the usage writer's bound values, the usage recorder's record
and the usage writer's SQLite connection unless HUBCORE_NO_EXTENSIONS=1.

The pure-Python twins (hubcore/accounting/_meter_py.py, hubcore/http/_wire_py.py,
hubcore/http/_conn_py.py, hubcore/http/_upstream_py.py,
hubcore/gateway/_exchange_py.py, hubcore/routing/_lease_py.py,
hubcore/governance/_admit_py.py, hubcore/ops/_tally_py.py,
hubcore/ops/_access_py.py, hubcore/accounting/_rows_py.py,
hubcore/accounting/_sqlite_batch_py.py,
hubcore/gateway/rewrite.py, routes.py and
hubcore/routing/headroom.py for _heads.pyx, and the sources of
COMPILED_FROM_SOURCE) are always installed, so a build without a
compiler, or with the variable set, still gives a working hub; at run
time HUBCORE_NO_EXTENSIONS=1 loads them (hubcore/__init__.py).
"""
import os

from setuptools import setup

# Plain-Python modules compiled by Cython as they are written, each its own
# pure-Python twin (hubcore/__init__.py loads the source under
# HUBCORE_NO_EXTENSIONS). Only the meter's interpretation code gains from it:
# compiled, the request path's modules (exchange, server, client, limiter,
# key ring and twelve more) ran 7% more instructions per request than
# interpreted (`python -m bench.hotpath --instructions`: 720k against 672k on
# the event loop's thread), since Python 3.11's specialised attribute reads
# are quicker than the generic ones of compiled code.
COMPILED_FROM_SOURCE = ["hubcore/accounting/_meter_interpret.py"]


def sqlite_extensions() -> list:
    """The SQLite usage writer's connection, which calls SQLite's C API:
    built where SQLite's header is (Debian: libsqlite3-dev), else left to
    its pure twin with a note, so that a machine without it still builds
    the rest."""
    from setuptools import Extension
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    if not compiler.has_function("sqlite3_libversion", includes=["sqlite3.h"], libraries=["sqlite3"]):
        print("setup.py: SQLite's header or library not found (libsqlite3-dev); "
              "the usage writer's connection runs its pure-Python twin")
        return []
    return [Extension("hubcore.accounting._sqlite_batch", ["hubcore/accounting/_sqlite_batch.pyx"],
                      libraries=["sqlite3"], extra_compile_args=["-O3"])]


# llhttp, the HTTP parser httptools wraps, vendored at the version
# httptools ships (hubcore/http/vendor/llhttp/README.md): the compiled
# connection cores run it through their common base, hubcore.http._parsing,
# the one module it is compiled into (its symbols stay inside). Its header
# is needed wherever the cores' declarations (_parsing.pxd, _conn.pxd,
# _upstream.pxd) are cimported.
LLHTTP = "hubcore/http/vendor/llhttp"
LLHTTP_SOURCES = [f"{LLHTTP}/llhttp.c", f"{LLHTTP}/api.c", f"{LLHTTP}/http.c"]

ext_modules = []
if not os.environ.get("HUBCORE_NO_EXTENSIONS"):
    from Cython.Build import cythonize
    from setuptools import Extension

    ext_modules = cythonize(
        [
            Extension("hubcore.accounting._meter", ["hubcore/accounting/_meter.pyx"], extra_compile_args=["-O3"]),
            Extension("hubcore.http._wire", ["hubcore/http/_wire.pyx"], extra_compile_args=["-O3"]),
            Extension("hubcore.http._parsing", ["hubcore/http/_parsing.pyx", *LLHTTP_SOURCES], include_dirs=[LLHTTP],
                      extra_compile_args=["-O3", "-fvisibility=hidden"]),
            Extension("hubcore.http._conn", ["hubcore/http/_conn.pyx"], include_dirs=[LLHTTP],
                      extra_compile_args=["-O3"]),
            Extension("hubcore.http._upstream", ["hubcore/http/_upstream.pyx"], include_dirs=[LLHTTP],
                      extra_compile_args=["-O3"]),
            Extension("hubcore.gateway._exchange", ["hubcore/gateway/_exchange.pyx"], include_dirs=[LLHTTP],
                      extra_compile_args=["-O3"]),
            Extension("hubcore.gateway._heads", ["hubcore/gateway/_heads.pyx"], extra_compile_args=["-O3"]),
            Extension("hubcore.routing._lease", ["hubcore/routing/_lease.pyx"], extra_compile_args=["-O3"]),
            Extension("hubcore.governance._admit", ["hubcore/governance/_admit.pyx"], extra_compile_args=["-O3"]),
            Extension("hubcore.ops._tally", ["hubcore/ops/_tally.pyx"], extra_compile_args=["-O3"]),
            Extension("hubcore.ops._access", ["hubcore/ops/_access.pyx"], extra_compile_args=["-O3"]),
            Extension("hubcore.accounting._rows", ["hubcore/accounting/_rows.pyx"], extra_compile_args=["-O3"]),
            *sqlite_extensions(),
        ],
        compiler_directives={"language_level": "3"},
    ) + cythonize(
        # Both meter twins call the interpretation code a few times per
        # stream; interpreted, it cost the compiled meter 9% more
        # instructions per request.
        [Extension(path[:-3].replace("/", "."), [path], extra_compile_args=["-O3"]) for path in COMPILED_FROM_SOURCE],
        compiler_directives={"language_level": "3"},
    )

setup(ext_modules=ext_modules)
