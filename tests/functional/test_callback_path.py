"""A request sent on a pooled connection runs in callbacks, with no task,
until something off the common path needs one (Exchange.ensure_task): a
retryable answer, a failure before or after the first byte, a timeout, the
client leaving, shutdown. Each case here warms the pool first, so the
request under test is sent in callbacks; the count of tasks started shows
which path it then took, and the client's answer and the usage row show that
the path did its job."""
from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from hubcore.http.server import HttpProtocol
from tests.fakevendor import Behaviour, FakeVendor, expected_text
from tests.hubharness import HubThread, make_config, mint

MODEL = "claude-sonnet-4-6"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
KEYS: dict[str, Behaviour] = {"k-1": "ok", "k-2": "ok"}


class TaskCount:
    """How many requests went on in a task (HttpProtocol.run_task calls)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        run_task = HttpProtocol.run_task

        def counting(protocol: HttpProtocol, coro: Any) -> None:
            self.count += 1
            run_task(protocol, coro)

        monkeypatch.setattr(HttpProtocol, "run_task", counting)

    def since(self, start: int) -> int:
        return self.count - start


@pytest.fixture
def tasks(monkeypatch: pytest.MonkeyPatch) -> TaskCount:
    return TaskCount(monkeypatch)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_orphaned_futures() -> Iterator[None]:
    """A future nobody awaits that holds an exception, or a task dropped
    while pending, is a request the callback path lost track of: asyncio
    logs them when they are collected."""
    records = _Records()
    logger = logging.getLogger("asyncio")
    logger.addHandler(records)
    try:
        yield
        gc.collect()
    finally:
        logger.removeHandler(records)
    assert not records.messages, records.messages


@contextlib.contextmanager
def warm_hub(tmp_path: Path, vendor: FakeVendor, **policy: Any) -> Iterator[tuple[HubThread, anthropic.Anthropic]]:
    """A hub with both keys and a client whose first request (sent here)
    leaves a pooled connection for the next one."""
    server = policy.pop("server", {})
    upstreams = [{
        "name": "anthropic", "kind": "anthropic", "base_url": vendor.url,
        "keys": [{"key": k, "label": k} for k in KEYS], **policy,
    }]
    config = make_config(tmp_path, upstreams, **server)
    token = mint(config.server.database, "alice", "callbacks")
    clients: list[anthropic.Anthropic] = []
    try:
        # The client outlives the hub: shutdown tests stop the hub under it.
        with HubThread(config) as hub:
            client = anthropic.Anthropic(base_url=hub.url, api_key=token, max_retries=0)
            clients.append(client)
            assert ask(client).content[0].text == expected_text()
            hub.wait_rows(1)
            vendor.reset()
            yield hub, client
    finally:
        for client in clients:
            client.close()


def ask(client: anthropic.Anthropic, **headers: str) -> Any:
    return client.messages.create(model=MODEL, max_tokens=32, messages=MESSAGES, extra_headers=headers or None)


def stream_texts(client: anthropic.Anthropic, texts: list[str] | None = None, **headers: str) -> list[str]:
    """A stream's text deltas, appended to `texts` as they come (so a caller
    still has them when the stream raises)."""
    texts = [] if texts is None else texts
    with client.messages.stream(model=MODEL, max_tokens=32, messages=MESSAGES, extra_headers=headers) as stream:
        for text in stream.text_stream:
            texts.append(text)
    return texts


def fail_once(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
    """Make method `name` of `cls` raise (a bug) on its first call only."""
    method = getattr(cls, name)
    calls = 0

    def failing_once(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError(f"bug in {name}")
        return method(*args)

    monkeypatch.setattr(cls, name, failing_once)


def last_row(hub: HubThread, count: int = 2) -> dict[str, Any]:
    rows = hub.wait_rows(count)
    assert len(rows) == count, rows
    return rows[-1]


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    with FakeVendor(dict(KEYS)) as vendor:
        yield vendor


def test_a_pooled_request_runs_without_a_task(tmp_path: Path, vendor: FakeVendor, tasks: TaskCount) -> None:
    with warm_hub(tmp_path, vendor) as (hub, client):
        start = tasks.count
        assert "".join(stream_texts(client)) == expected_text()
        assert ask(client).content[0].text == expected_text()
        assert tasks.since(start) == 0
        rows = hub.wait_rows(3)
        vendor.wait_idle()
        for row in rows[1:]:
            assert row["outcome"] == "ok" and row["status"] == 200 and row["attempts"] == 1
            assert row["model"] == MODEL and row["key_label"] in KEYS
            assert row["input_tokens"] > 0 and row["output_tokens"] > 0
        assert len(vendor.requests) == 2


def test_a_retryable_answer_goes_on_in_a_task_and_is_retried(tmp_path: Path, vendor: FakeVendor, tasks: TaskCount) -> None:
    with warm_hub(tmp_path, vendor, max_attempts=2) as (hub, client):
        start = tasks.count
        with pytest.raises(anthropic.InternalServerError) as info:
            ask(client, **{"x-fake-status": "529"})
        assert info.value.status_code == 529
        assert info.value.response.headers["x-should-retry"] == "false"
        assert tasks.since(start) == 1
        assert sorted(str(r.key) for r in vendor.requests) == sorted(KEYS)
        row = last_row(hub)
        assert (row["status"], row["attempts"], row["outcome"]) == (529, 2, "upstream_error")
        # The connection the 529 came on went back to the pool; it still serves.
        start = tasks.count
        assert ask(client).content[0].text == expected_text()
        assert tasks.since(start) == 0


@pytest.mark.parametrize("mode", ["reset", "close"])
def test_a_failure_before_the_first_byte_is_retried_in_a_task(tmp_path: Path, vendor: FakeVendor, tasks: TaskCount, mode: str) -> None:
    with warm_hub(tmp_path, vendor, max_attempts=2) as (hub, client):
        start = tasks.count
        with pytest.raises(anthropic.APIStatusError) as info:
            stream_texts(client, **{"x-fake-fail-after": "0", "x-fake-fail-mode": mode})
        assert info.value.status_code == 502
        assert tasks.since(start) == 1
        assert len(vendor.requests) == 2
        row = last_row(hub)
        assert (row["attempts"], row["outcome"]) == (2, "upstream_error")


@pytest.mark.parametrize("mode", ["reset", "stall", "error-event"])
def test_a_midstream_failure_is_ended_in_a_task(tmp_path: Path, vendor: FakeVendor, tasks: TaskCount, mode: str) -> None:
    with warm_hub(tmp_path, vendor, stream_idle_timeout=0.3) as (hub, client):
        start = tasks.count
        texts: list[str] = []
        with pytest.raises(anthropic.APIStatusError) as info:
            stream_texts(client, texts, **{"x-fake-fail-after": "5", "x-fake-fail-mode": mode})
        assert "".join(texts) == expected_text(2)
        assert info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
        (req,) = vendor.requests
        row = last_row(hub)
        assert (row["status"], row["outcome"], row["attempts"]) == (200, "upstream_aborted", 1)
        assert row["key_label"] == req.key
        # A reset or a stall (the stream idle timeout) fails the upstream
        # connection, ended in the task; an error event is a complete 200
        # stream, ended in callbacks.
        assert tasks.since(start) == (0 if mode == "error-event" else 1)


def test_a_first_byte_timeout_goes_on_in_a_task(tmp_path: Path, vendor: FakeVendor, tasks: TaskCount) -> None:
    with warm_hub(tmp_path, vendor, max_attempts=2, first_byte_timeout=0.2) as (hub, client):
        start = tasks.count
        began = time.monotonic()
        with pytest.raises(anthropic.APIStatusError) as info:
            ask(client, **{"x-fake-first-byte-delay-ms": "3000"})
        assert info.value.status_code == 504
        assert time.monotonic() - began < 2.5
        assert tasks.since(start) == 1
        row = last_row(hub)
        assert (row["attempts"], row["outcome"], row["error_type"]) == (2, "upstream_error", "timeout")


def test_a_client_that_leaves_mid_stream_is_recorded_in_a_task(tmp_path: Path, vendor: FakeVendor, tasks: TaskCount) -> None:
    with warm_hub(tmp_path, vendor) as (hub, client):
        start = tasks.count
        with client.messages.stream(
            model=MODEL, max_tokens=32, messages=MESSAGES,
            extra_headers={"x-fake-events": "50", "x-fake-delay-ms": "50"},
        ) as stream:
            assert next(iter(stream.text_stream)) == expected_text(1)
        row = last_row(hub)
        assert (row["status"], row["outcome"]) == (200, "client_aborted")
        assert tasks.since(start) == 1
        assert ask(client).content[0].text == expected_text()


def test_a_client_that_leaves_before_the_answer_is_recorded_in_a_task(tmp_path: Path, vendor: FakeVendor, tasks: TaskCount) -> None:
    with warm_hub(tmp_path, vendor) as (hub, client):
        start = tasks.count
        with pytest.raises(anthropic.APITimeoutError):
            client.with_options(timeout=0.3).messages.create(
                model=MODEL, max_tokens=32, messages=MESSAGES,
                extra_headers={"x-fake-first-byte-delay-ms": "1500"},
            )
        row = last_row(hub)
        assert (row["outcome"], row["attempts"]) == ("client_aborted", 1)
        assert tasks.since(start) == 1


def test_shutdown_drains_a_stream_sent_in_callbacks(tmp_path: Path, vendor: FakeVendor, tasks: TaskCount) -> None:
    result: list[str] = []
    with warm_hub(tmp_path, vendor, server={"drain_timeout": 10.0}) as (hub, client):
        start = tasks.count
        reader = threading.Thread(target=lambda: result.extend(stream_texts(client, **{"x-fake-events": "10", "x-fake-delay-ms": "50"})))
        reader.start()
        vendor.wait_for_requests(1, timeout=10)
    reader.join(10)
    assert "".join(result) == expected_text(10)
    assert tasks.since(start) == 1  # shutdown moved it into a task to wait on
    row = last_row(hub)
    assert (row["status"], row["outcome"]) == (200, "ok")


def test_shutdown_cuts_a_stream_sent_in_callbacks_at_the_drain_timeout(tmp_path: Path, vendor: FakeVendor, tasks: TaskCount) -> None:
    errors: list[BaseException] = []

    def read() -> None:
        try:
            stream_texts(client, **{"x-fake-events": "50", "x-fake-delay-ms": "100"})
        except Exception as e:  # whatever the SDK raises for a cut stream
            errors.append(e)

    with warm_hub(tmp_path, vendor, server={"drain_timeout": 0.3}) as (hub, client):
        reader = threading.Thread(target=read)
        reader.start()
        vendor.wait_for_requests(1, timeout=10)
        time.sleep(0.2)  # into the stream
    reader.join(10)
    assert errors, "the stream outlived the drain timeout"
    row = last_row(hub)
    assert (row["outcome"], row["error_type"]) == ("upstream_aborted", "hub_shutdown")


def test_a_failure_in_the_bookkeeping_closes_only_its_connection(
    tmp_path: Path, vendor: FakeVendor, tasks: TaskCount, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from hubcore.gateway import exchange as proxy

    with warm_hub(tmp_path, vendor) as (hub, client):
        fail_once(monkeypatch, proxy.Exchange, "_record")
        with caplog.at_level(logging.ERROR, logger="hubcore"):
            # The answer was written before the bookkeeping ran.
            assert ask(client).content[0].text == expected_text()
            # The hub closed that connection after the answer: the SDK may
            # have reused it in the meantime, and retries as it does for any
            # keep-alive connection closed under it.
            assert ask(client.with_options(max_retries=2)).content[0].text == expected_text()
        assert any("request handler failed" in r.getMessage() and r.exc_info for r in caplog.records)
        rows = hub.wait_rows(2)
        assert len(rows) == 2 and rows[-1]["outcome"] == "ok"


def test_a_failure_while_the_answer_begins_does_not_leave_the_client_waiting(
    tmp_path: Path, vendor: FakeVendor, tasks: TaskCount, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A bug where the answer's head is taken up fails the upstream
    # connection after the head, before any sink reads the body: the
    # request, run in callbacks, must still end (in its task), not hang.
    from hubcore.gateway import exchange as proxy

    with warm_hub(tmp_path, vendor) as (hub, client):
        fail_once(monkeypatch, proxy.Exchange, "_begin_stream")
        start = tasks.count
        with caplog.at_level(logging.ERROR, logger="hubcore"):
            with pytest.raises(anthropic.APIConnectionError) as info:
                client.with_options(timeout=10).messages.create(model=MODEL, max_tokens=32, messages=MESSAGES)
            assert not isinstance(info.value, anthropic.APITimeoutError)
        assert tasks.since(start) == 1
        assert any("request handler failed" in r.getMessage() for r in caplog.records)
        assert ask(client.with_options(max_retries=2)).content[0].text == expected_text()


def test_pipelined_requests_sent_in_callbacks_are_answered_in_order(tmp_path: Path, vendor: FakeVendor, tasks: TaskCount) -> None:
    from tests.functional.test_server import PLAIN_BODY, STREAM_BODY, Wire, messages_request

    with warm_hub(tmp_path, vendor) as (hub, client):
        token = client.api_key
        start = tasks.count
        wire = Wire(hub.port)
        wire.send(messages_request(token, STREAM_BODY) + messages_request(token, PLAIN_BODY))
        first = wire.response()
        assert first.status == 200 and b"event: message_stop" in first.body
        second = wire.response()
        assert second.status == 200 and second.json()["content"][0]["text"] == expected_text()
        assert tasks.since(start) == 0
        rows = hub.wait_rows(3)
        assert [r["outcome"] for r in rows[1:]] == ["ok", "ok"]
