"""`log_format = "json"`: every line a running hub writes is one JSON object
with ts, level, logger and msg, whoever logged it (hubcore, the root logger,
asyncio, warnings, an uncaught exception), access lines included."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.fakevendor import OPENAI_KEY, FakeVendor
from tests.functional.test_lifecycle import KEY_ONE, Serve, eventually, request
from tests.hubharness import REPO

LEVELS = {"debug", "info", "warning", "error", "critical"}


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    with FakeVendor(keys={KEY_ONE: "ok", OPENAI_KEY: "ok"}) as v:
        yield v


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as a JSON object with the fields every record has."""
    records = []
    for line in text.splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(record, dict), line
        assert record.get("level") in LEVELS, line
        assert isinstance(record.get("ts"), float) and isinstance(record.get("logger"), str), line
        assert isinstance(record.get("msg"), str), line
        records.append(record)
    return records


def test_a_json_hub_writes_only_json_lines(tmp_path: Path, vendor: FakeVendor) -> None:
    s = Serve(tmp_path, vendor, log_format="json")
    try:
        s.start()  # an empty database: the first start mints the admin token
        token = (tmp_path / "first-token").read_text().strip()
        good = request(s.port, token)
        refused = request(s.port, "hc-not-a-token")
        assert (good[0], refused[0]) == (200, 401)
        s.signal(signal.SIGHUP)
        eventually(lambda: "configuration reloaded" in s.log_text(), what="reload logged")
        s.write([("a1", KEY_ONE)], extra="no_such_setting = 1\n")
        s.signal(signal.SIGHUP)
        eventually(lambda: "reload rejected" in s.log_text(), what="rejection logged")
        s.signal(signal.SIGTERM)
        assert s.wait() == 0
    finally:
        s.close()
    text = s.log_text()
    records = json_lines(text)
    assert token not in text and KEY_ONE not in text

    def one(**fields: Any) -> dict[str, Any]:
        found = [r for r in records if all(r.get(k) == v for k, v in fields.items())]
        assert len(found) == 1, (fields, records)
        return found[0]

    first = next(r for r in records if "first-token" in r["msg"])
    assert first["level"] == "warning" and first["logger"].startswith("hubcore")
    served = one(request_id=good[1])
    assert (served["logger"], served["level"], served["status"], served["user"]) == ("hubcore.access", "info", 200, "admin")
    assert served["total_ms"] > 0 and served["client"] == "127.0.0.1"
    denied = one(request_id=refused[1])
    assert (denied["status"], denied["outcome"], denied["user"], denied["endpoint"]) == (401, "refused", None, "/v1/messages")
    assert any(r["level"] == "error" and "reload rejected" in r["msg"] for r in records)
    assert any(r["msg"] == "configuration reloaded from " + str(s.config) for r in records)
    assert records[-1]["msg"] == "stopped"


# Logs through every kind of logger after setup_logging, then dies of an
# uncaught exception: each of these must come out as one JSON line.
SCRIPT = textwrap.dedent("""
    import asyncio, logging, threading, warnings
    from hubcore import config, runtime

    runtime.setup_logging(config.parse({"server": {"log_format": "json"}}, source="<t>", env={}))
    logging.getLogger().warning("root says %s", "hello")
    logging.getLogger("some.library").error("a library's error")
    logging.getLogger("hubcore.proxy").info("hubcore info")
    logging.getLogger("hubcore.proxy").debug("below the configured level")
    logging.getLogger("some.library").info("a library's info: below warning")
    logging.getLogger("hubcore").info("%d args", "wrong")
    logging.getLogger("hubcore").info("lone surrogate \\udcff in a file name")
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("hubcore").exception("it failed")
    warnings.warn("something is deprecated", DeprecationWarning)

    async def broken():
        raise RuntimeError("nobody awaited me")

    async def main():
        task = asyncio.get_running_loop().create_task(broken())
        await asyncio.sleep(0.01)
        del task  # the loop's exception handler logs it through the asyncio logger

    asyncio.run(main())
    import gc; gc.collect()
    thread = threading.Thread(target=lambda: 1 / 0, name="worker")
    thread.start(); thread.join()
    raise SystemError("uncaught at the top")
""")


def test_every_logger_and_an_uncaught_exception_come_out_as_json(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", SCRIPT], capture_output=True, text=True, timeout=60,
        cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1 and result.stdout == ""
    records = json_lines(result.stderr)
    by_msg = {r["msg"]: r for r in records}
    assert by_msg["root says hello"]["logger"] == "root"
    assert by_msg["a library's error"] == {**by_msg["a library's error"], "logger": "some.library", "level": "error"}
    assert by_msg["hubcore info"]["level"] == "info"
    assert not any("below" in r["msg"] for r in records)
    assert any("wrong" in r["msg"] and "unformattable" in r["msg"] for r in records)
    assert any("lone surrogate" in r["msg"] for r in records)
    assert "ZeroDivisionError" in by_msg["it failed"]["exc"]
    assert any(r["logger"] == "py.warnings" and "something is deprecated" in r["msg"] for r in records)
    assert any(r["logger"] == "asyncio" and "nobody awaited me" in r.get("exc", "") + r["msg"] for r in records)
    assert any("thread worker" in r["msg"] and "ZeroDivisionError" in r["exc"] for r in records)
    top = records[-1]
    assert top["level"] == "critical" and "SystemError: uncaught at the top" in top["exc"]
