"""Spool on real files: appending, counting, reading back after a crash, truncating."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hubcore.accounting import spool as spool_module
from hubcore.accounting.spool import Spool, SpoolChunk, decode_line, encode_line
from hubcore.accounting.usage import UsageEvent

# A line as the hubcore before the Spool class wrote it (UsageRecorder._encode):
# the format is the contract between a crashed run and the next one.
OLD_LINE = (
    b'{"ts":1760000000.5,"request_id":"req-old","endpoint":"/v1/messages","status":200,'
    b'"outcome":"ok","total_ms":12.5,"token_id":7,"user":"alice","project":null,'
    b'"upstream":null,"key_label":null,"model":"claude-sonnet-4-5","input_tokens":10,'
    b'"output_tokens":20,"cache_write_5m":0,"cache_write_1h":0,"cache_read":0,'
    b'"reasoning_tokens":0,"server_tool_requests":0,"stop_reason":null,"error_type":null,'
    b'"cost_micros":1234,"ttfb_ms":3.25,"attempts":1,"session_id":null,"user_agent":null,'
    b'"output_estimated":false}\n'
)
# The same event spooled by a hubcore from before output_estimated and
# user_agent existed.
LINE_WITHOUT_NEW_FIELDS = (
    b'{"ts":1760000000.5,"request_id":"req-older","endpoint":"/v1/messages","status":200,'
    b'"outcome":"ok","total_ms":12.5,"token_id":7,"user":"alice","model":"claude-sonnet-4-5",'
    b'"input_tokens":10,"output_tokens":20,"cost_micros":1234,"ttfb_ms":3.25,"attempts":1}\n'
)


def make_event(i: int, **overrides: object) -> UsageEvent:
    fields: dict[str, object] = dict(
        ts=1_760_000_000.0 + i, request_id=f"req-{i:06d}", endpoint="/v1/messages",
        status=200, outcome="ok", total_ms=10.0 + i, model="claude-sonnet-4-5",
        input_tokens=i, output_tokens=2 * i, cost_micros=100 + i,
    )
    fields.update(overrides)
    return UsageEvent(**fields)  # type: ignore[arg-type]


def read_all(spool: Spool) -> list[SpoolChunk]:
    """Read everything and consume it, as a replay whose inserts all succeed."""
    chunks = list(spool.read())
    for chunk in chunks:
        spool.consume(chunk)
    return chunks


def request_ids(chunks: list[SpoolChunk]) -> list[str]:
    return [e.request_id for chunk in chunks for e in chunk.events]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "usage.spool"


def test_append_fsync_and_reopen_counts_the_lines(path: Path) -> None:
    spool = Spool(path)
    spool.append([make_event(0), make_event(1)], sync=True)
    spool.append([make_event(2)], sync=False)
    assert (spool.lines, spool.pending, spool.dirty) == (3, 3, True)
    spool.fsync()
    assert spool.dirty is False
    spool.close()
    assert path.stat().st_mode & 0o777 == 0o600

    reopened = Spool(path)
    reopened.open(count_lines=True)
    try:
        assert (reopened.lines, reopened.pending, reopened.torn) == (3, 3, False)
        assert request_ids(read_all(reopened)) == ["req-000000", "req-000001", "req-000002"]
        assert reopened.pending == 0
    finally:
        reopened.close()


def test_encoding_is_the_old_format_byte_for_byte_new_fields_last() -> None:
    event = decode_line(OLD_LINE)
    assert event is not None and event.cost_basis is None
    assert encode_line(event) == OLD_LINE[:-2] + b',"cost_basis":null,"served_model":null,"route":null}\n'
    event.cost_basis = "estimate"
    again = decode_line(encode_line(event))
    assert again is not None and again.cost_basis == "estimate"


def test_old_lines_without_new_fields_decode_with_defaults() -> None:
    event = decode_line(LINE_WITHOUT_NEW_FIELDS)
    assert event is not None
    assert (event.request_id, event.output_tokens, event.cost_micros) == ("req-older", 20, 1234)
    assert (event.output_estimated, event.user_agent, event.cache_read) == (False, None, 0)


def test_unknown_keys_are_dropped_and_unreadable_lines_are_none() -> None:
    newer = OLD_LINE.replace(b'"output_estimated":false}', b'"output_estimated":true,"from_the_future":1}')
    event = decode_line(newer)
    assert event is not None and event.output_estimated is True
    assert decode_line(b"{not json") is None
    assert decode_line(b"[1, 2]") is None
    assert decode_line(b'{"request_id": "no-ts"}') is None  # required fields missing


def test_a_spool_written_by_the_old_code_reads_back(path: Path) -> None:
    path.write_bytes(OLD_LINE + LINE_WITHOUT_NEW_FIELDS)
    spool = Spool(path)
    try:
        chunks = read_all(spool)
        assert request_ids(chunks) == ["req-old", "req-older"]
        assert spool.truncate_if_consumed()
    finally:
        spool.close()


def test_a_torn_last_line_after_a_crash_is_skipped_and_the_next_append_starts_a_line(path: Path) -> None:
    whole = encode_line(make_event(0))
    torn = encode_line(make_event(1))[:40]  # kill -9 in the middle of a write
    path.write_bytes(whole + torn)
    spool = Spool(path)
    spool.open(count_lines=True)
    try:
        assert (spool.lines, spool.torn) == (1, True)
        chunks = list(spool.read())
        assert [(len(c.events), c.bad, c.torn) for c in chunks] == [(1, 0, 0), (0, 0, len(torn))]
        for chunk in chunks:
            spool.consume(chunk)
        assert (spool.bad_lines, spool.offset) == (1, len(whole) + len(torn))

        # Left untruncated, as when the database refused the replay:
        # the next append must not glue its line onto the torn one.
        spool.append([make_event(2)], sync=True)
        assert spool.torn is False
        assert path.read_bytes() == whole + torn + b"\n" + encode_line(make_event(2))
        assert request_ids(read_all(spool)) == ["req-000002"]
    finally:
        spool.close()


def test_garbled_lines_are_counted_bad_and_consumed(path: Path) -> None:
    path.write_bytes(encode_line(make_event(0)) + b"{not json\n" + encode_line(make_event(1)))
    spool = Spool(path)
    try:
        chunks = read_all(spool)
        assert request_ids(chunks) == ["req-000000", "req-000001"]
        assert sum(c.bad for c in chunks) == 1
        assert (spool.bad_lines, spool.pending) == (1, 0)
    finally:
        spool.close()


def test_nothing_counts_as_read_until_consumed(path: Path) -> None:
    spool = Spool(path)
    try:
        spool.append([make_event(i) for i in range(3)], sync=True)
        # A replay whose insert failed: the same lines come back next time.
        first = list(spool.read())
        assert (spool.offset, spool.pending) == (0, 3)
        assert request_ids(first) == request_ids(read_all(spool))
        assert spool.pending == 0
    finally:
        spool.close()


def test_lines_cut_by_a_chunk_boundary_are_read_whole(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = [make_event(i) for i in range(50)]
    monkeypatch.setattr(spool_module, "SPOOL_READ_CHUNK", 97)  # far shorter than a line
    spool = Spool(path)
    try:
        spool.append(events, sync=True)
        chunks = read_all(spool)
        assert len(chunks) > 1
        assert [e for c in chunks for e in c.events] == events
        assert sum(c.bad for c in chunks) == 0
    finally:
        spool.close()


def test_truncate_after_replay_and_not_over_a_later_append(path: Path) -> None:
    spool = Spool(path)
    try:
        spool.append([make_event(0), make_event(1)], sync=True)
        chunks = iter(spool.read())
        first = next(chunks)
        # Appended while the replay awaited the database: not part of this read.
        spool.append([make_event(2)], sync=False)
        assert list(chunks) == []
        spool.consume(first)
        assert spool.truncate_if_consumed() is False
        assert spool.pending == 1

        assert request_ids(read_all(spool)) == ["req-000002"]
        assert spool.truncate_if_consumed() is True
        assert path.stat().st_size == 0
        assert (spool.offset, spool.lines, spool.pending) == (0, 0, 0)
        spool.append([make_event(3)], sync=True)
        assert request_ids(read_all(spool)) == ["req-000003"]
    finally:
        spool.close()


def test_skipped_request_ids_are_passed_over_once(path: Path) -> None:
    spool = Spool(path)
    try:
        spool.append([make_event(0), make_event(1)], sync=True)
        spool.skip(["req-000001"])
        chunks = read_all(spool)
        assert request_ids(chunks) == ["req-000000"]
        assert sum(c.skipped for c in chunks) == 1
        assert spool.pending == 0
        # The skip set holds each id once: a later copy is read again.
        spool.append([make_event(1)], sync=True)
        assert request_ids(read_all(spool)) == ["req-000001"]
    finally:
        spool.close()


def test_a_missing_file_reads_as_empty_and_resets_the_counts(path: Path) -> None:
    spool = Spool(path)
    spool.append([make_event(0)], sync=True)
    spool.close()
    path.unlink()
    assert list(spool.read()) == []
    assert spool.pending == 0
    assert spool.truncate_if_consumed() is False


def test_a_failed_append_counts_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "spool-is-a-directory"
    directory.mkdir()
    spool = Spool(directory)
    with pytest.raises(OSError):
        spool.append([make_event(0)], sync=True)
    assert (spool.lines, spool.pending, spool.is_open) == (0, 0, False)


def test_events_round_trip_every_field(path: Path) -> None:
    event = make_event(
        7, token_id=3, user="bob", project="p", upstream="openai", key_label="k",
        cache_write_5m=1, cache_write_1h=2, cache_read=3, reasoning_tokens=4,
        server_tool_requests=5, stop_reason="end_turn", error_type="overloaded",
        ttfb_ms=1.5, attempts=2, session_id="s", user_agent="ua", output_estimated=True,
    )
    spool = Spool(path)
    try:
        spool.append([event], sync=True)
        [chunk] = read_all(spool)
        assert [dataclasses.asdict(e) for e in chunk.events] == [dataclasses.asdict(event)]
    finally:
        spool.close()
