"""The SQLite usage writer's connection on both twins, against real SQLite
files: the compiled one runs a batch's transaction through SQLite's C API
without the GIL, the pure one through Python's sqlite3; the same rows, the
same rollups, the same counts and the same errors either way. The
recorder's own tests (test_usage.py, test_rollup.py) run on whichever twin
the build selects."""
from __future__ import annotations

import asyncio
import gc
import itertools
import math
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubcore import store
from hubcore.accounting import _sqlite_batch_py, rollup, sqlitewriter
from hubcore.accounting.rows import insert_values
from hubcore.accounting.usage import INSERT_SIZES, INSERT_SQL, Outcome, UsageEvent
from tests.accounting.test_usage import Lock, make_event
from tests.http.twins import NO_EXTENSIONS, check_compiled_loaded, check_no_extensions_selects_pure, twin_of

COMPILED = "hubcore.accounting._sqlite_batch"
ROLLUP_TABLES = ("usage_hourly", *rollup.DAY_TABLES, "usage_ttfb_hourly")


@pytest.fixture(params=["c", "py"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return twin_of(request.param, COMPILED, _sqlite_batch_py)


def migrated(path: Path) -> Path:
    store.connect(path).close()
    return path


def stored(path: Path, table: str = "usage") -> list[tuple[Any, ...]]:
    """Every row of `table` with each column's SQLite type beside its value."""
    conn = sqlite3.connect(path)
    try:
        columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
        typed = ", ".join(f"{c}, typeof({c})" for c in columns)
        return conn.execute(f"SELECT {typed} FROM {table} ORDER BY 1, 3, 5").fetchall()
    finally:
        conn.close()


def write(conn: Any, events: list[UsageEvent]) -> int:
    return int(conn.write(conn.prepare(events)))


def test_compiled_twin_loaded() -> None:
    check_compiled_loaded(sqlitewriter, [sqlitewriter.BatchConnection], COMPILED, "hubcore.accounting._sqlite_batch_py")


def test_no_extensions_selects_pure_twin() -> None:
    check_no_extensions_selects_pure(
        "hubcore.accounting.sqlitewriter", "BatchConnection", "hubcore.accounting._sqlite_batch_py"
    )


def test_a_batch_of_every_statement_size_goes_in_with_its_rollups(twin: ModuleType, tmp_path: Path) -> None:
    rows = sum(INSERT_SIZES) * 2 + 1  # two statements of each size, and one more row
    events = [make_event(i, user=f"user-{i % 3}", ttfb_ms=None if i % 4 == 0 else i / 3) for i in range(rows)]
    path = migrated(tmp_path / "hub.db")
    conn = twin.BatchConnection(path, 1000)
    try:
        assert write(conn, events) == rows
        # A replay: what is in already is skipped and not counted, nor summed again.
        assert write(conn, events[:5] + [make_event(rows)]) == 1
    finally:
        conn.close()
    # The same rows one INSERT each, summed by rollup.add.
    reference = migrated(tmp_path / "reference.db")
    plain = store.connect(reference)
    try:
        with store.immediate(plain):
            for event in [*events, make_event(rows)]:
                plain.execute(INSERT_SQL, insert_values([event]))
            rollup.add(plain, 0)
    finally:
        plain.close()
    for table in ("usage", *ROLLUP_TABLES):
        assert stored(path, table) == stored(reference, table), table
    assert len(stored(path)) == rows + 1


def test_the_batch_holds_its_values_after_the_events_are_gone(twin: ModuleType, tmp_path: Path) -> None:
    """The compiled batch points into its values' text: it must keep them."""
    conn = twin.BatchConnection(migrated(tmp_path / "hub.db"), 1000)
    try:
        events = [make_event(i, user="".join(["ü", str(i) * 40]), model=str(i) * 3) for i in range(50)]
        batch = conn.prepare(events)
        del events
        gc.collect()
        [str(n) * 40 for n in range(1000)]  # memory the freed strings would have been
        assert conn.write(batch) == 50
    finally:
        conn.close()
    check = sqlite3.connect(tmp_path / "hub.db")
    try:
        assert check.execute("SELECT user, model FROM usage ORDER BY id").fetchall() == \
            [("ü" + str(i) * 40, str(i) * 3) for i in range(50)]
    finally:
        check.close()


def test_a_failing_statement_rolls_back_the_whole_batch(twin: ModuleType, tmp_path: Path) -> None:
    path = migrated(tmp_path / "hub.db")
    other = store.connect(path)
    other.execute("CREATE TRIGGER refuse BEFORE INSERT ON usage WHEN NEW.request_id = 'req-000299'"
                  " BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END")
    conn = twin.BatchConnection(path, 1000)
    try:
        events = [make_event(i) for i in range(300)]
        with pytest.raises(sqlite3.IntegrityError, match="refused by a trigger") as raised:
            write(conn, events)
        assert raised.value.sqlite_errorcode == 1811  # SQLITE_CONSTRAINT_TRIGGER
        assert stored(path) == [] and all(stored(path, table) == [] for table in ROLLUP_TABLES)
        other.execute("DROP TRIGGER refuse")
        # No transaction left open: the same connection takes the batch now.
        assert write(conn, events) == 300
    finally:
        conn.close()
        other.close()
    assert len(stored(path)) == 300


def test_a_locked_database_fails_after_the_busy_timeout(twin: ModuleType, tmp_path: Path) -> None:
    path = migrated(tmp_path / "hub.db")
    conn = twin.BatchConnection(path, 150)
    try:
        with Lock(path):
            started = time.monotonic()
            with pytest.raises(sqlite3.OperationalError, match="database is locked") as raised:
                write(conn, [make_event(1)])
            assert time.monotonic() - started >= 0.14
            assert raised.value.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
        assert write(conn, [make_event(1)]) == 1
    finally:
        conn.close()


def test_values_sqlite_cannot_take_raise_as_sqlite3_does(twin: ModuleType, tmp_path: Path) -> None:
    path = migrated(tmp_path / "hub.db")
    conn = twin.BatchConnection(path, 1000)
    try:
        with pytest.raises(sqlite3.ProgrammingError, match="type 'dict' is not supported"):
            write(conn, [make_event(0), make_event(1, user={"not": "text"})])
        with pytest.raises(OverflowError):
            write(conn, [make_event(2, input_tokens=2**63)])
        assert write(conn, [make_event(3)]) == 1
    finally:
        conn.close()
    check = sqlite3.connect(path)
    try:
        assert check.execute("SELECT request_id FROM usage").fetchall() == [("req-000003",)]
    finally:
        check.close()


def test_an_unopenable_file_and_a_closed_connection(twin: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file"):
        twin.BatchConnection(tmp_path / "no such directory" / "hub.db", 1000)
    conn = twin.BatchConnection(migrated(tmp_path / "hub.db"), 1000)
    batch = conn.prepare([make_event(0)])
    conn.close()
    conn.close()
    with pytest.raises(sqlite3.ProgrammingError, match="closed database"):
        conn.write(batch)


def test_the_connection_sets_the_pragmas_of_every_hubcore_connection(twin: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    conn = twin.BatchConnection(path, 1000)
    conn.close()
    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        check.close()


def test_an_empty_batch_writes_nothing(twin: ModuleType, tmp_path: Path) -> None:
    conn = twin.BatchConnection(migrated(tmp_path / "hub.db"), 1000)
    try:
        assert write(conn, []) == 0
        assert write(conn, [make_event(0)]) == 1
    finally:
        conn.close()


# -- both twins, the same results ----------------------------------------------------

text = st.one_of(st.none(), st.text(max_size=12))  # every code point but surrogates; NUL too
finite = st.floats(allow_nan=False, allow_infinity=False)
usage_events = st.builds(
    UsageEvent,
    ts=st.floats(0, 4e9), request_id=st.text(min_size=1, max_size=3), endpoint=st.text(max_size=8),
    status=st.integers(-(2**63), 2**63 - 1), outcome=st.sampled_from(list(Outcome)),
    total_ms=st.one_of(finite, st.just(math.inf)),
    token_id=st.one_of(st.none(), st.integers(0, 10**6)), user=text, project=text, upstream=text, key_label=text,
    model=text, input_tokens=st.integers(0, 2**63 - 1), output_tokens=st.integers(-5, 10**9),
    cost_micros=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    ttfb_ms=st.one_of(st.none(), st.floats(allow_nan=True)),
    output_estimated=st.booleans(), cost_basis=text, served_model=text, route=text, stop_reason=text,
)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Path, Path, Any, Any]]:
    """One file for each twin, written the same batches in the same order."""
    if NO_EXTENSIONS:
        pytest.skip("HUBCORE_NO_EXTENSIONS is set: only the pure twin")
    with tempfile.TemporaryDirectory() as directory:
        paths = migrated(Path(directory, "c.db")), migrated(Path(directory, "py.db"))
        compiled = twin_of("c", COMPILED, _sqlite_batch_py).BatchConnection(paths[0], 1000)
        pure = _sqlite_batch_py.BatchConnection(paths[1], 1000)
        try:
            yield paths[0], paths[1], compiled, pure
        finally:
            compiled.close()
            pure.close()


def outcome(conn: Any, events: list[UsageEvent]) -> tuple[str, Any]:
    try:
        return "written", write(conn, events)
    except (sqlite3.Error, OverflowError) as exc:
        return type(exc).__name__, str(exc)


@settings(max_examples=150, deadline=None)
@given(batch=st.lists(usage_events, max_size=45))
def test_both_twins_store_the_same_rows_and_sums(pair: tuple[Path, Path, Any, Any], batch: list[UsageEvent]) -> None:
    """Request ids of three characters repeat across examples: replays too."""
    c_path, py_path, compiled, pure = pair
    assert outcome(compiled, batch) == outcome(pure, batch)
    for table in ("usage", *ROLLUP_TABLES):
        assert stored(c_path, table) == stored(py_path, table), table


# -- the writer around the connection -------------------------------------------------


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hubcore-usage-writer")]


async def test_the_writer_runs_its_connection_on_a_thread_of_its_own(tmp_path: Path) -> None:
    before = len(writer_threads())
    writer = sqlitewriter.SqliteUsageWriter(migrated(tmp_path / "hub.db"), 200)
    with pytest.raises(sqlite3.OperationalError, match="not open"):
        await writer.insert([make_event(0)])
    await writer.open()
    assert len(writer_threads()) == before + 1
    with Lock(tmp_path / "hub.db"):
        # The write waits on the lock on the writer's thread; the loop goes on.
        write = asyncio.ensure_future(writer.insert([make_event(0)]))
        ticks = 0
        while not write.done():
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks >= 10
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await write
    assert await writer.insert([make_event(i) for i in range(3)]) == 3
    await writer.close()
    await writer.close()
    with pytest.raises(sqlite3.OperationalError, match="not open"):
        await writer.insert([make_event(4)])
    for _ in range(100):
        if len(writer_threads()) == before:
            break
        await asyncio.sleep(0.01)
    assert len(writer_threads()) == before


async def test_a_writer_that_cannot_open_leaves_no_thread(tmp_path: Path) -> None:
    before = len(writer_threads())
    writer = sqlitewriter.SqliteUsageWriter(tmp_path / "missing" / "hub.db", 200)
    with pytest.raises(sqlite3.OperationalError):
        await writer.open()
    for _ in range(100):
        if len(writer_threads()) == before:
            break
        await asyncio.sleep(0.01)
    assert len(writer_threads()) == before
    await writer.close()


def test_every_remainder_of_the_statement_sizes_goes_in_whole(twin: ModuleType, tmp_path: Path) -> None:
    """A batch of every remainder goes in whole (the sizes' sums, and one
    less and one more)."""
    conn = twin.BatchConnection(migrated(tmp_path / "hub.db"), 1000)
    ids = itertools.count()
    try:
        total = 0
        for rows in sorted({0, 1, 3, 4, 5, 31, 33, INSERT_SIZES[0] - 1, INSERT_SIZES[0] + 37}):
            events = [make_event(next(ids)) for _ in range(rows)]
            assert write(conn, events) == rows
            total += rows
    finally:
        conn.close()
    assert len(stored(tmp_path / "hub.db")) == total
