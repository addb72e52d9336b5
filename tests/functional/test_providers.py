"""Several upstreams of one kind, end to end: two fake vendors behind one hub,
the official SDK and raw requests as clients. The preferred upstream serves
while it is healthy; in its outage every request succeeds through the
backup, which gets the mapped model and otherwise the client's exact body;
once it is back, new requests return to it within its health-check interval
plus a second; with every candidate down the client gets one clean error."""
from __future__ import annotations

import http.client
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest

from hubcore import config as config_mod, store
from hubcore.accounting.pricing import PriceTable
from hubcore.governance.limits import Limits
from tests.fakevendor import FakeVendor, RecordedRequest, expected_text
from tests.hubharness import HubThread, make_config, run_cli

PRIMARY_KEY, BACKUP_KEY = "sk-ant-primary", "sk-ant-backup"
HEALTH_CHECK = 0.5
# The client's body, spaced as no serialiser would: the backup must get
# these bytes with only the model's value changed.
BODY = b'{ "model" :  "claude-sonnet-4-6", "max_tokens": 16,\n "messages": [{"role": "user", "content": "model: claude-sonnet-4-6"}],\n "metadata": {"model": "claude-sonnet-4-6"} }'
MAPPED = BODY.replace(b'"model" :  "claude-sonnet-4-6"', b'"model" :  "relay-sonnet"', 1)


def upstream(name: str, vendor_url: str, key: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "kind": "anthropic", "base_url": vendor_url, "keys": [{"key": key, "label": name}], **fields}


@contextmanager
def two_vendor_hub(tmp_path: Path, primary: FakeVendor, backup: FakeVendor, **backup_fields: Any) -> Iterator[tuple[HubThread, str]]:
    config = make_config(tmp_path, [
        upstream("primary", primary.url, PRIMARY_KEY, health_check_interval=HEALTH_CHECK),
        upstream("backup", backup.url, BACKUP_KEY, priority=1,
                 model_map={"claude-sonnet-4-6": "relay-sonnet"}, **backup_fields),
    ])
    with HubThread(config) as hub:
        yield hub, hub.mint("dev")


def post(hub: HubThread, token: str, body: bytes = BODY, session: str | None = None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=30)
    headers = {"x-api-key": token, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    if session is not None:
        headers["x-claude-code-session-id"] = session
    try:
        conn.request("POST", "/v1/messages", body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, orjson.loads(answer.read())
    finally:
        conn.close()


def posts(vendor: FakeVendor) -> list[RecordedRequest]:
    return [r for r in vendor.requests if r.method == "POST"]


def wait_until(condition: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - started


def test_primary_while_healthy_backup_in_its_outage_and_back_after_it(tmp_path: Path) -> None:
    primary = FakeVendor({PRIMARY_KEY: "ok"}).start()
    port = primary.port
    try:
        with FakeVendor({BACKUP_KEY: "ok"}) as backup, two_vendor_hub(tmp_path, primary, backup) as (hub, token):
            for _ in range(5):
                status, answer = post(hub, token)
                assert status == 200 and answer["content"][0]["text"] == expected_text()
            assert len(posts(primary)) == 5 and posts(backup) == []
            # The preferred upstream got the client's body untouched.
            assert all(r.body == BODY for r in posts(primary))

            primary.stop()  # connections refused from now on
            for _ in range(20):
                status, answer = post(hub, token)
                assert status == 200, answer
                assert answer["content"][0]["text"] == expected_text()
            assert len(posts(backup)) == 20
            for request in posts(backup):
                assert request.body == MAPPED
                assert request.key == BACKUP_KEY
            rows = hub.wait_rows(25)
            assert [r["upstream"] for r in rows[5:]] == ["backup"] * 20
            # The row keeps the client's model: prices are looked up by it.
            assert {r["model"] for r in rows} == {"claude-sonnet-4-6"}

            primary = FakeVendor({PRIMARY_KEY: "ok"}, port=port).start()
            back = time.monotonic()

            def served_by_primary() -> bool:
                status, _ = post(hub, token)
                assert status == 200
                return bool(posts(primary))

            took = wait_until(served_by_primary, HEALTH_CHECK + 1.0)
            print(f"first request on the primary {took:.3f} s after its return")
            assert time.monotonic() - back < HEALTH_CHECK + 1.0
            # And it stays there: new requests without a session all go back.
            before = len(posts(backup))
            for _ in range(5):
                assert post(hub, token)[0] == 200
            assert len(posts(backup)) == before
    finally:
        primary.stop()


def test_every_candidate_down_is_one_clean_error_without_a_hang(tmp_path: Path) -> None:
    primary = FakeVendor({PRIMARY_KEY: "ok"}).start()
    backup = FakeVendor({BACKUP_KEY: "ok"}).start()
    try:
        with two_vendor_hub(tmp_path, primary, backup) as (hub, token):
            primary.stop()
            backup.stop()
            client = anthropic.Anthropic(base_url=hub.url, api_key=token, max_retries=0, timeout=30)
            for _ in range(8):
                started = time.monotonic()
                with pytest.raises(anthropic.APIStatusError) as info:
                    client.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
                assert time.monotonic() - started < 2.0
                error = info.value
                assert error.status_code in (502, 503)
                assert isinstance(error.body, dict) and error.body["type"] == "error"
                assert "x-should-retry" in error.response.headers or "retry-after" in error.response.headers
            client.close()
    finally:
        primary.stop()
        backup.stop()


def test_a_5xx_moves_the_attempt_to_the_backup(tmp_path: Path) -> None:
    with FakeVendor({PRIMARY_KEY: 529}) as primary, FakeVendor({BACKUP_KEY: "ok"}) as backup, \
            two_vendor_hub(tmp_path, primary, backup) as (hub, token):
        status, answer = post(hub, token)
        assert status == 200 and answer["content"][0]["text"] == expected_text()
        assert [r.status for r in posts(primary)] == [529]
        assert [r.body for r in posts(backup)] == [MAPPED]
        (row,) = hub.wait_rows(1)
        assert (row["upstream"], row["attempts"]) == ("backup", 2)


def test_a_session_keeps_its_fallback_and_new_sessions_return(tmp_path: Path) -> None:
    primary = FakeVendor({PRIMARY_KEY: "ok"}).start()
    port = primary.port
    try:
        with FakeVendor({BACKUP_KEY: "ok"}) as backup, two_vendor_hub(tmp_path, primary, backup) as (hub, token):
            primary.stop()
            assert post(hub, token, session="moved")[0] == 200
            assert len(posts(backup)) == 1
            primary = FakeVendor({PRIMARY_KEY: "ok"}, port=port).start()
            wait_until(lambda: post(hub, token)[0] == 200 and bool(posts(primary)), HEALTH_CHECK + 1.0)
            on_primary = len(posts(primary))
            # Its prompt cache lives on the backup: it stays there.
            for _ in range(3):
                assert post(hub, token, session="moved")[0] == 200
            assert len(posts(backup)) == 4 and len(posts(primary)) == on_primary
            assert post(hub, token, session="new")[0] == 200
            assert len(posts(primary)) == on_primary + 1
    finally:
        primary.stop()


def test_failback_immediate_brings_a_moved_session_back(tmp_path: Path) -> None:
    primary = FakeVendor({PRIMARY_KEY: "ok"}).start()
    port = primary.port
    try:
        with FakeVendor({BACKUP_KEY: "ok"}) as backup:
            config = make_config(tmp_path, [
                upstream("primary", primary.url, PRIMARY_KEY, health_check_interval=HEALTH_CHECK, failback="immediate"),
                upstream("backup", backup.url, BACKUP_KEY, priority=1),
            ])
            with HubThread(config) as hub:
                token = hub.mint("dev")
                primary.stop()
                assert post(hub, token, session="s")[0] == 200 and len(posts(backup)) == 1
                primary = FakeVendor({PRIMARY_KEY: "ok"}, port=port).start()
                wait_until(lambda: post(hub, token, session="s")[0] == 200 and bool(posts(primary)), HEALTH_CHECK + 1.0)
    finally:
        primary.stop()


def test_weights_split_a_tier_and_models_narrow_the_candidates(tmp_path: Path) -> None:
    with FakeVendor({PRIMARY_KEY: "ok"}) as a, FakeVendor({BACKUP_KEY: "ok"}) as b, \
            FakeVendor({"sk-ant-haiku": "ok"}) as haiku:
        config = make_config(tmp_path, [
            upstream("a", a.url, PRIMARY_KEY, weight=3),
            upstream("b", b.url, BACKUP_KEY, weight=1),
            upstream("haiku-relay", haiku.url, "sk-ant-haiku", models=["claude-haiku-*"], priority=-1),
        ])
        with HubThread(config) as hub:
            token = hub.mint("dev")
            for _ in range(40):
                assert post(hub, token)[0] == 200
            assert (len(posts(a)), len(posts(b)), len(posts(haiku))) == (30, 10, 0)
            haiku_body = BODY.replace(b"claude-sonnet-4-6", b"claude-haiku-4-5")
            for _ in range(3):
                assert post(hub, token, haiku_body)[0] == 200
            assert [r.body for r in posts(haiku)] == [haiku_body] * 3


def test_a_body_without_a_string_model_goes_to_the_default_candidates_unchanged(tmp_path: Path) -> None:
    with FakeVendor({PRIMARY_KEY: "ok"}) as primary, FakeVendor({BACKUP_KEY: "ok"}) as backup, \
            two_vendor_hub(tmp_path, primary, backup) as (hub, token):
        primary.set_key_behaviour(PRIMARY_KEY, 529)
        body = b'{"model": 7, "max_tokens": 16, "messages": []}'
        status, answer = post(hub, token, body)
        # The vendor answers it (its 400), and the backup got it byte for byte.
        assert status == 400 and answer["type"] == "error"
        assert [r.body for r in posts(backup)] == [body]


def test_no_upstream_serves_the_model(tmp_path: Path) -> None:
    with FakeVendor({PRIMARY_KEY: "ok"}) as only:
        config = make_config(tmp_path, [upstream("relay", only.url, PRIMARY_KEY, models=["claude-haiku-*"])])
        with HubThread(config) as hub:
            status, answer = post(hub, hub.mint("dev"))
            assert status == 400
            assert answer["error"]["message"] == "no anthropic upstream of this hub serves model 'claude-sonnet-4-6'"
            assert only.requests == []


def restrict(hub: HubThread, user: str, groups: tuple[str, ...]) -> str:
    """A token of `user`, restricted to `groups`, already seen by the hub."""
    token = hub.mint(user)
    (token_id,) = [r["id"] for r in hub_tokens(hub) if r["user"] == user]
    hub.set_limits("token", token_id, Limits(groups=groups))
    return token


def hub_tokens(hub: HubThread) -> list[dict[str, Any]]:
    conn = store.connect(hub.config.server.database)
    try:
        return [{"id": i, "user": u} for i, u in conn.execute("SELECT id, user FROM tokens")]
    finally:
        conn.close()


def test_a_token_restricted_to_a_group_never_reaches_another_groups_upstream(tmp_path: Path) -> None:
    with FakeVendor({PRIMARY_KEY: "ok"}) as team, FakeVendor({BACKUP_KEY: "ok"}) as cheap:
        config = make_config(tmp_path, [
            upstream("team", team.url, PRIMARY_KEY),
            upstream("cheap", cheap.url, BACKUP_KEY, group="cheap", priority=1),
        ])
        with HubThread(config) as hub:
            restricted = restrict(hub, "intern", ("cheap",))
            anyone = hub.mint("dev")
            for _ in range(5):
                assert post(hub, restricted)[0] == 200
                assert post(hub, anyone)[0] == 200
            assert len(posts(cheap)) == 5 and len(posts(team)) == 5
            # Its group down: an error, never the other group's upstream.
            cheap.set_key_behaviour(BACKUP_KEY, 529)
            status, _ = post(hub, restricted)
            assert status == 529
            assert len(posts(team)) == 5
            # Restricted to a group no upstream has: a 403 naming it.
            nowhere = restrict(hub, "lost", ("research",))
            status, answer = post(hub, nowhere)
            assert status == 403 and answer["error"]["type"] == "permission_error"
            assert "research" in answer["error"]["message"]
            assert len(posts(team)) == 5


def test_a_half_price_upstream_records_half_the_list_price_and_the_route(tmp_path: Path) -> None:
    with FakeVendor({PRIMARY_KEY: 529}) as primary, FakeVendor({BACKUP_KEY: "ok"}) as backup:
        config = make_config(tmp_path, [
            upstream("primary", primary.url, PRIMARY_KEY),
            upstream("backup", backup.url, BACKUP_KEY, priority=1, cost_multiplier=0.5,
                     model_map={"claude-sonnet-4-6": "relay-sonnet"}),
        ])
        with HubThread(config) as hub:
            token = hub.mint("dev")
            assert post(hub, token)[0] == 200
            primary.set_key_behaviour(PRIMARY_KEY, "ok")
            # Wait out the circuit the 529 left? One 529 is below the
            # threshold: the primary serves the next request at once.
            assert post(hub, token)[0] == 200
            via_backup, via_primary = hub.wait_rows(2)
            assert (via_backup["upstream"], via_primary["upstream"]) == ("backup", "primary")
            assert via_backup["route"] == "primary/primary:529,backup/backup:200"
            assert via_primary["route"] == "primary/primary:200"
            assert (via_backup["served_model"], via_primary["served_model"]) == ("relay-sonnet", None)
            assert via_backup["model"] == via_primary["model"] == "claude-sonnet-4-6"
            prices = PriceTable.load()

            def list_price(row: dict[str, Any]) -> int:
                cost = prices.cost_micros(row["model"], row["input_tokens"], row["output_tokens"],
                                          row["cache_write_5m"], row["cache_write_1h"], row["cache_read"])
                assert cost is not None and cost > 0
                return cost

            assert via_primary["cost_micros"] == list_price(via_primary)
            # Half the list price of the client's model to the micro-dollar:
            # the exact sum of tokens x micro-dollars per million, halved,
            # divided by a million once, rounded half up.
            price = prices.price_for("claude-sonnet-4-6")
            assert price is not None
            exact = (via_backup["input_tokens"] * price.input + via_backup["output_tokens"] * price.output
                     + via_backup["cache_write_5m"] * price.cache_write_5m
                     + via_backup["cache_write_1h"] * price.cache_write_1h + via_backup["cache_read"] * price.cache_read)
            assert via_backup["cost_micros"] == (exact + 1_000_000) // 2_000_000
            assert abs(via_backup["cost_micros"] * 2 - list_price(via_backup)) <= 1
            assert hub.app is not None
            metrics = hub.app.metrics_text()
            assert 'hubcore_upstream_failovers_total{from="primary",to="backup"} 1' in metrics


def test_route_explain_names_the_choice_and_why_not_the_others(tmp_path: Path) -> None:
    with FakeVendor({PRIMARY_KEY: "ok", "sk-ant-primary-2": "ok"}) as primary, \
            FakeVendor({BACKUP_KEY: "ok"}) as backup, FakeVendor({"sk-ant-x": "ok"}) as research:
        config = make_config(tmp_path, [
            {**upstream("primary", primary.url, PRIMARY_KEY, weight=3),
             "keys": [{"key": PRIMARY_KEY, "label": "p1", "weight": 3}, {"key": "sk-ant-primary-2", "label": "p2"}]},
            upstream("backup", backup.url, BACKUP_KEY, priority=1, model_map={"claude-sonnet-4-6": "relay-sonnet"}),
            upstream("research", research.url, "sk-ant-x", group="research", models=["claude-opus-*"]),
        ])
        toml = tmp_path / "hubcore.toml"
        toml.write_text(f'[server]\ndatabase = "{config.server.database}"\nops_socket = "{config.server.ops_socket}"\n')
        with HubThread(config) as hub:
            restrict(hub, "intern", ("default",))
            explained = run_cli("route", "explain", "--model", "claude-sonnet-4-6", "--kind", "anthropic",
                                "--json", "--config", str(toml))
            assert explained.returncode == 0, explained.stderr
            answer = orjson.loads(explained.stdout)
            (route,) = answer["routes"]
            rows = {u["name"]: u for u in route["upstreams"]}
            assert [u["name"] for u in route["upstreams"]] == ["primary", "research", "backup"]
            assert rows["primary"]["probability"] == 1.0 and rows["primary"]["excluded"] is None
            assert [(k["label"], k["probability"]) for k in rows["primary"]["keys"]] == [("p1", 0.75), ("p2", 0.25)]
            assert "does not serve 'claude-sonnet-4-6'" in rows["research"]["excluded"]
            assert rows["backup"]["excluded"] == "priority 1: tier 0 has a usable upstream"
            assert rows["backup"]["sends_model"] == "relay-sonnet"

            # As the token restricted to the default group (the first minted: id 1) sees an opus request.
            opus = run_cli("route", "explain", "--model", "claude-opus-4-6", "--token-id", "1", "--config", str(toml))
            assert opus.returncode == 0, opus.stderr
            assert "groups default" in opus.stdout
            assert "group 'research' is not one of the principal's (default)" in opus.stdout
            # The primary's keys down: the backup's turn, and the text says so.
            primary.set_key_behaviour(PRIMARY_KEY, 401)
            primary.set_key_behaviour("sk-ant-primary-2", 401)
            for _ in range(2):
                post(hub, hub.mint("dev"))
            text = run_cli("route", "explain", "--model", "claude-sonnet-4-6", "--config", str(toml)).stdout
            assert "no usable key" in text and "backup" in text
            missing = run_cli("route", "explain", "--model", "m", "--token-id", "999", "--config", str(toml))
            assert missing.returncode != 0 and "no token with id 999" in missing.stderr


def test_a_reload_applies_new_priorities_and_refuses_a_bad_provider_setting(tmp_path: Path) -> None:
    with FakeVendor({PRIMARY_KEY: "ok"}) as primary, FakeVendor({BACKUP_KEY: "ok"}) as backup:
        path = tmp_path / "hubcore.toml"

        def write(backup_fields: str) -> None:
            path.write_text(
                f'[server]\nlisten = "127.0.0.1:0"\ndatabase = "{tmp_path / "hub.db"}"\nops_socket = ""\n'
                "token_reload_interval = 0.1\nusage_flush_interval = 0.05\n\n"
                f'[[upstream]]\nname = "primary"\nkind = "anthropic"\nbase_url = "{primary.url}"\nkeys = ["{PRIMARY_KEY}"]\n\n'
                f'[[upstream]]\nname = "backup"\nkind = "anthropic"\nbase_url = "{backup.url}"\nkeys = ["{BACKUP_KEY}"]\n'
                + backup_fields
            )

        write("priority = 1\n")
        with HubThread(config_mod.load(str(path), env={})) as hub:
            assert hub.app is not None
            hub.app.config_path = str(path)
            token = hub.mint("dev")
            assert post(hub, token)[0] == 200 and len(posts(primary)) == 1
            write("priority = -1\nmodel_map = { \"claude-sonnet-4-6\" = \"relay-sonnet\" }\n")
            ok, message = hub.call(hub.app.reload())
            assert ok and "upstream backup: priority 1 -> -1" in message, message
            assert post(hub, token)[0] == 200
            assert [r.body for r in posts(backup)] == [MAPPED]
            for bad in ("weight = -2\n", 'model_map = { "claude-sonnet-4-6" = "" }\n', "cost_multiplier = -1\n"):
                write("priority = 1\n" + bad)
                ok, message = hub.call(hub.app.reload())
                assert not ok and message.startswith(f"{path}: upstream[1]."), message
                # The running configuration stays, whole: the backup still leads.
                assert post(hub, token)[0] == 200
            assert len(posts(backup)) == 4 and len(posts(primary)) == 1


def test_a_body_that_names_its_model_first_is_routed_without_being_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Claude Code writes the model first and sends a session header: routing
    among several upstreams reads the model from the body's first bytes, and
    the body (90 KB and more) is never parsed on the request path."""
    from hubcore.accounting import meter

    parsed: list[int] = []
    real = meter.scan_request
    monkeypatch.setattr(meter, "scan_request", lambda body: parsed.append(len(body)) or real(body))
    with FakeVendor({PRIMARY_KEY: "ok"}) as sonnet, FakeVendor({BACKUP_KEY: "ok"}) as other:
        config = make_config(tmp_path, [
            upstream("sonnet", sonnet.url, PRIMARY_KEY, models=["claude-sonnet-*"]),
            upstream("other", other.url, BACKUP_KEY),
        ])
        with HubThread(config) as hub:
            token = hub.mint("dev")
            body = b'{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
            assert post(hub, token, body, session="s1")[0] == 200
            assert len(posts(sonnet)) == 1 and posts(other) == []
            assert parsed == []
