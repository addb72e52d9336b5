"""bench/floor.py, the benchmark's bare pass-through proxy: the saturation
phase compares hubcore with it, so it must carry requests and answers intact."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest

from bench import services
from tests.fakevendor import ANTHROPIC_KEY, FakeVendor, expected_text


@pytest.fixture
def floor(vendor: FakeVendor, tmp_path: Path) -> Iterator[services.Service]:
    service = services.start_floor(tmp_path, vendor.port, ANTHROPIC_KEY)
    try:
        yield service
    finally:
        service.stop()


def test_floor_streams_and_answers_on_one_connection(floor: services.Service, vendor: FakeVendor) -> None:
    # The client's credential is replaced by the vendor key, as nginx's is.
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{floor.port}", api_key="client-credential", max_retries=0)
    prompts = ["first " * 2000, "second", "third " * 500]
    for prompt in prompts[:2]:
        with client.messages.stream(model="claude-sonnet-4-6", max_tokens=64,
                                    messages=[{"role": "user", "content": prompt}]) as stream:
            assert "".join(stream.text_stream) == expected_text()
            assert stream.get_final_message().usage.output_tokens > 0
    message = client.messages.create(model="claude-sonnet-4-6", max_tokens=64,
                                     messages=[{"role": "user", "content": prompts[2]}])
    assert message.content[0].text == expected_text()  # type: ignore[union-attr]

    requests = vendor.requests
    assert [r.json()["messages"][0]["content"] for r in requests] == prompts
    assert {r.header("x-api-key") for r in requests} == {ANTHROPIC_KEY}
    assert vendor.protocol_errors == []
    # Three requests, one pooled upstream connection.
    assert vendor.connections_accepted == 1
