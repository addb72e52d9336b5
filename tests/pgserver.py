"""A real PostgreSQL server for tests: initdb into a temporary directory,
`pg_ctl start` on a free port of 127.0.0.1 (its Unix socket in the same
directory), a password for the superuser so that the hub's password path is
exercised, stopped and removed at the end.

The binaries come from $HUBCORE_PG_BIN, else `pg_config --bindir`, else the
newest /usr/lib/postgresql/*/bin (Debian keeps them off PATH), else PATH.
Missing binaries skip the tests that need them, with the reason; under
CI=true they fail them (.ci/run installs the `postgresql` package).

PostgreSQL refuses to run as root: as root, the cluster belongs to the
`postgres` user (else `nobody`) and its directory lives under /tmp, outside
pytest's root-only tmp tree.
"""
from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hubcore import config
from tests.hubharness import free_port

SUPERUSER = "hubcore"
PASSWORD = "test-only-pg-password"
# The environment variable the tests' configs name (database_password = "env:...").
PASSWORD_ENV = "HUBCORE_TEST_PG_PASSWORD"
# Each test gets a database of its own: tests never see each other's rows.
_NAMES = itertools.count(1)


def pg_bin_dir() -> Path | None:
    """Where initdb, pg_ctl and postgres are; None when they are not installed."""
    configured = os.environ.get("HUBCORE_PG_BIN")
    if configured:
        return Path(configured)
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if found and (Path(found) / "initdb").exists():
            return Path(found)
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if debian:
        return Path(debian[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def require_pg_bin() -> Path:
    found = pg_bin_dir()
    if found is not None and all((found / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
        return found
    reason = "PostgreSQL is not installed (initdb, pg_ctl: Debian package postgresql, or set HUBCORE_PG_BIN)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
    pytest.skip(reason)


@dataclass(frozen=True)
class PgDatabase:
    """One test's database: the URL as [server] database takes it (no
    password in it) and the password, which the tests pass by env:."""

    url: str
    name: str
    password: str = PASSWORD

    @property
    def server_config(self) -> dict[str, str]:
        """The [server] fields that point a hub at this database."""
        return {"database": self.url, "database_password": f"env:{PASSWORD_ENV}"}


class PgServer:
    """A private PostgreSQL cluster; `stop()` and `start()` again keep its data and port."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="hubcore-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.log = self.root / "postgres.log"
        self._as = self._run_as()

    def _run_as(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            try:
                return pwd.getpwnam(name)
            except KeyError:
                continue
        raise RuntimeError("running as root and no postgres or nobody user to run PostgreSQL as")

    def _cmd(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs = {} if self._as is None else {"user": self._as.pw_uid, "group": self._as.pw_gid}
        done = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=self.root,
                              timeout=120, **kwargs)  # type: ignore[call-overload]
        if check and done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
                               f"\n{self.log_tail()}")
        return done

    def init(self) -> None:
        self.sockets.mkdir()
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._as is not None:
            for path in (self.root, self.sockets, pwfile):
                os.chown(path, self._as.pw_uid, self._as.pw_gid)
        # --no-sync and fsync=off: a test cluster needs no durability
        # against power cuts, and initdb's syncs cost seconds.
        self._cmd(self.bin / "initdb", "-D", self.data, "-U", SUPERUSER, f"--pwfile={pwfile}",
                  "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync", "--locale=C")
        pwfile.unlink()

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
                   " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._cmd(self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server ("immediate": as a crash would, no shutdown checkpoint)."""
        self._cmd(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop", check=False)

    def running(self) -> bool:
        return self._cmd(self.bin / "pg_ctl", "-D", self.data, "status", check=False).returncode == 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL over the Unix socket (trust): for set-up, not for what is tested."""
        done = self._cmd(self.bin / "psql", "-h", self.sockets, "-p", str(self.port), "-U", SUPERUSER,
                         "-d", database, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql)
        return done.stdout.strip()

    def create_database(self) -> PgDatabase:
        name = f"hub_{os.getpid()}_{next(_NAMES)}"
        self.psql(f"CREATE DATABASE {name}")
        return PgDatabase(self.url(name), name)

    def destroy(self) -> None:
        if self.data.exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_pg_server() -> Iterator[PgServer]:
    server = PgServer(require_pg_bin())
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()


_shared: PgServer | None = None


def shared_server() -> PgServer:
    """The run's cluster, started on first use and stopped at exit (or by
    the pg_server fixture's end): the fixture and make_config share it."""
    global _shared
    if _shared is None:
        os.environ[PASSWORD_ENV] = PASSWORD
        server = PgServer(require_pg_bin())
        atexit.register(server.destroy)
        server.init()
        server.start()
        _shared = server
    elif not _shared.running():  # a test that stopped it failed before restarting it
        _shared.start()
    return _shared


# Set to "postgresql", the hubs of tests/hubharness.make_config run on a
# database of their own on the shared cluster instead of a SQLite file, so
# that any test suite can be run on PostgreSQL:
#   HUBCORE_TEST_DATABASE=postgresql pytest tests/governance
ENGINE_ENV = "HUBCORE_TEST_DATABASE"


def engine_database() -> dict[str, str]:
    """The [server] fields of the engine HUBCORE_TEST_DATABASE asks for ({}: SQLite)."""
    engine = os.environ.get(ENGINE_ENV, "sqlite")
    if engine == "sqlite":
        return {}
    if engine != "postgresql":
        raise ValueError(f"{ENGINE_ENV}: sqlite or postgresql, not {engine!r}")
    # For the commands a test runs on a config it wrote by hand with the
    # database alone: libpq's variable, which asyncpg reads too.
    os.environ["PGPASSWORD"] = PASSWORD
    return shared_server().create_database().server_config


def pg_server_database(pg: PgDatabase, **server: Any) -> str:
    """The database of `pg` as a config hands it to hubcore (a PgTarget
    whose password comes by env:, as an operator's would)."""
    cfg = config.parse({"server": {**pg.server_config, **server}}, source="<test>", env=dict(os.environ))
    return cfg.server.database


@pytest.fixture(scope="session")
def pg_server() -> PgServer:
    """One PostgreSQL cluster for the whole run (a test that stops it starts it again)."""
    return shared_server()


@pytest.fixture
def pg_database(pg_server: PgServer) -> PgDatabase:
    """An empty database of this test's own on the session's cluster."""
    return shared_server().create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """[server] database of a fresh SQLite file, then of a fresh PostgreSQL
    database: a storage test that takes it runs on both engines."""
    if request.param == "sqlite":
        return str(tmp_path / "hub.db")
    return pg_server_database(request.getfixturevalue("pg_database"))


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll `predicate()` until true or `timeout` seconds passed; its last value."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
