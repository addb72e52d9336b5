"""bench.profile --mode perf without perf: the reading of `perf script`
output into the event loop thread's split (bench/perfsplit.py)."""
from __future__ import annotations

from bench import perfsplit

PY = "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0"
CONN = "/work/main/hubcore/http/_conn.cpython-311-x86_64-linux-gnu.so"
WIRE = "/work/main/hubcore/http/_wire.cpython-311-x86_64-linux-gnu.so"
PARSER = "/work/main/.venv/lib/python3.11/site-packages/httptools/parser/parser.cpython-311-x86_64-linux-gnu.so"
UVLOOP = "/work/main/.venv/lib/python3.11/site-packages/uvloop/loop.cpython-311-x86_64-linux-gnu.so"
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
SQLITE = "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0.8.6"
K = "[kernel.kallsyms]"


def sample(tid: int, *frames: tuple[str, str]) -> str:
    lines = [f"{tid:5} "]  # perf pads a thread id to five columns
    for i, (sym, dso) in enumerate(frames):
        lines.append(f"\t{0x1000 + i:16x} {sym} ({dso})")
    return "\n".join(lines) + "\n\n"


# The shapes `perf script -F tid,ip,sym,dso` prints with --call-graph dwarf,
# innermost frame first; "(inlined)" stands where the dso goes.
WRITEV = sample(
    7, ("_raw_spin_unlock_irqrestore", K), ("sock_def_readable", K), ("tcp_sendmsg", K), ("do_writev", K),
    ("do_syscall_64", K), ("entry_SYSCALL_64_after_hwframe", K), ("__GI___writev", LIBC), ("uv__writev", "inlined"),
    ("uv__try_write", UVLOOP),
)
READ = sample(7, ("_copy_to_iter", K), ("tcp_recvmsg", K), ("ksys_read", K), ("do_syscall_64", K),
              ("__GI___libc_read", LIBC), ("uv__read", UVLOOP))
PAGE_FAULT = sample(7, ("clear_page_erms", K), ("do_anonymous_page", K), ("asm_exc_page_fault", K),
                    ("_PyObject_Malloc", PY))
BODY_COPY = sample(
    7, ("__memcpy_avx512_unaligned_erms", "inlined"), ("PyBytes_FromStringAndSize", PY),
    ("__pyx_f_9httptools_6parser_6parser_cb_on_body", PARSER), ("llhttp__internal__run", PARSER),
    ("__pyx_f_7hubcore_4http_5_conn_8ConnCore__received", CONN),
)
LOOKUP = sample(7, ("_PyType_Lookup", PY), ("_PyObject_GenericGetAttrWithDict", PY),
                ("__Pyx_PyObject_GetAttrStr", "inlined"),
                ("__pyx_pw_7hubcore_4http_5_wire_15HeaderCollector_7on_header", WIRE))
COMPILED = sample(7, ("__pyx_f_7hubcore_4http_5_wire_first_value", WIRE), ("__pyx_f_7hubcore_4http_5_conn_8ConnCore__received", CONN))
WRITER = sample(9, ("sqlite3VdbeExec", SQLITE), ("sqlite3_step", SQLITE))
TEXT = WRITEV * 3 + READ + PAGE_FAULT + BODY_COPY * 2 + LOOKUP + COMPILED + WRITER * 2


def test_samples_keep_real_frames_and_drop_inlined_ones() -> None:
    got = list(perfsplit.samples(TEXT.splitlines()))
    assert [s.tid for s in got] == [7] * 9 + [9, 9]
    first = got[0]
    assert first.frames[0] == ("_raw_spin_unlock_irqrestore", K)
    assert ("uv__writev", "inlined") not in first.frames
    assert first.frames[-1] == ("uv__try_write", UVLOOP)
    assert got[5].frames[0] == ("PyBytes_FromStringAndSize", PY)  # the inlined memcpy is its own


def test_a_thread_id_of_any_width_starts_a_sample() -> None:
    text = sample(123456, ("tcp_sendmsg", K)) + "    7 \n\t    1000 _PyType_Lookup (" + PY + ")\n"
    got = list(perfsplit.samples(text.splitlines()))
    assert [(s.tid, s.frames) for s in got] == [(123456, [("tcp_sendmsg", K)]), (7, [("_PyType_Lookup", PY)])]


def test_a_sample_without_a_trailing_blank_line_counts() -> None:
    got = list(perfsplit.samples((TEXT + READ.rstrip("\n")).splitlines()))
    assert len(got) == 12 and got[-1].frames[-1] == ("uv__read", UVLOOP)


def test_the_busiest_thread_is_split_by_library_system_call_and_caller() -> None:
    s = perfsplit.split(perfsplit.samples(TEXT.splitlines()))
    assert s.total == 11 and s.threads == [(7, 9), (9, 2)] and s.loop == 9
    assert s.groups == {perfsplit.KERNEL: 5, perfsplit.INTERPRETER: 3, perfsplit.HUBCORE: 1}
    assert s.syscalls == {"do_writev": 3, "ksys_read": 1, "(no system call: asm_exc_page_fault)": 1}
    assert s.interpreter == {"PyBytes_FromStringAndSize": 2, "_PyType_Lookup": 1}
    # The nearest frame above that is not the interpreter: httptools' copy of
    # the body, and the compiled header collector's attribute lookup.
    assert s.interpreter_callers == {"httptools.parser.parser.cb_on_body": 2, "http._wire.HeaderCollector.on_header": 1}


def test_groups() -> None:
    assert perfsplit.group(K) == perfsplit.KERNEL
    assert perfsplit.group(PY) == perfsplit.INTERPRETER
    assert perfsplit.group(CONN) == perfsplit.HUBCORE
    assert perfsplit.group(PARSER) == "httptools"
    assert perfsplit.group(SQLITE) == "SQLite"
    assert perfsplit.group("/usr/lib/x86_64-linux-gnu/libm.so.6") == "libm.so.6"


def test_cython_names_read_as_module_class_function() -> None:
    r = perfsplit.readable
    assert r("__pyx_f_7hubcore_4http_5_conn_8ConnCore__received") == "http._conn.ConnCore._received"
    assert r("__pyx_pw_7hubcore_4http_5_conn_8ConnCore_7data_received") == "http._conn.ConnCore.data_received"
    assert r("__pyx_pw_7hubcore_7gateway_9_exchange_7HubCore_3handle") == "gateway._exchange.HubCore.handle"
    assert r("__pyx_f_7hubcore_7gateway_6_heads_request_head") == "gateway._heads.request_head"
    assert r("__pyx_tp_dealloc_7hubcore_4http_5_wire_HeaderList") == "http._wire.HeaderList"
    assert r("__pyx_f_9httptools_6parser_6parser_cb_on_body") == "httptools.parser.parser.cb_on_body"
    assert r("uv__read") == "uv__read"


def test_render_gives_shares_and_microseconds_a_request() -> None:
    s = perfsplit.split(perfsplit.samples(TEXT.splitlines()))
    text = perfsplit.render("hubcore at c=16", s, cpu_us=110.0)
    assert text.startswith("## hubcore at c=16\n")
    assert "threads: 7 81.8%, 9 18.2%" in text
    # The loop's 9 of 11 samples of 110 µs: 90 µs a request, 5 of 9 in the kernel.
    assert "| kernel | 55.6% | 50.0 |" in text
    assert "| do_writev | 33.3% | 30.0 |" in text
    assert "| httptools.parser.parser.cb_on_body | 22.2% | 20.0 |" in text
    assert "µs a request" not in perfsplit.render("no CPU figure", s, cpu_us=None)
    assert "(no samples)" in perfsplit.render("empty", perfsplit.split([]), cpu_us=1.0)
