"""[dashboard]: its fields checked like every table, off with listen = "",
and a port it cannot bind stops the hub's start with one line."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hubcore import config as config_mod
from hubcore.errors import ConfigError
from tests.conftest import upstreams_for
from tests.fakevendor import FakeVendor
from tests.hubharness import HubThread, make_config, run_cli


def parse(dashboard: dict[str, object]) -> config_mod.Config:
    return config_mod.parse({"dashboard": dashboard}, source="hub.toml", env={})


def test_the_dashboard_listens_on_8788_unless_told_otherwise() -> None:
    assert parse({}).dashboard == config_mod.DashboardConfig(listen="127.0.0.1:8788", session_ttl=8 * 3600.0)
    assert parse({"listen": ""}).dashboard.listen == ""


@pytest.mark.parametrize(("table", "message"), [
    ({"listn": "x"}, "hub.toml: dashboard.listn: unknown field; did you mean listen?"),
    ({"listen": "nowhere"}, 'hub.toml: dashboard.listen: expected "HOST:PORT", got \'nowhere\''),
    ({"tls_cert": "c.pem"}, "hub.toml: dashboard.tls_cert / dashboard.tls_key: set both or neither"),
    ({"session_ttl": 0}, "hub.toml: dashboard.session_ttl: must be positive"),
    ({"session_ttl": "8h"}, "hub.toml: dashboard.session_ttl: expected float, got str"),
])
def test_a_bad_dashboard_table_is_refused_with_its_field(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(table)
    assert str(refused.value) == message


def test_a_dashboard_port_in_use_stops_the_start_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken, FakeVendor() as vendor:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        toml = tmp_path / "hub.toml"
        toml.write_text(
            f'[server]\nlisten = "127.0.0.1:0"\ndatabase = "{tmp_path / "hub.db"}"\nops_socket = ""\n'
            f'[dashboard]\nlisten = "127.0.0.1:{port}"\n'
            f'[[upstream]]\nname = "anthropic"\nkind = "anthropic"\nbase_url = "{vendor.url}"\nkeys = ["sk-ant-good"]\n'
        )
        done = run_cli("serve", "--config", str(toml), timeout=30)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (dashboard): " in done.stderr


def test_listen_empty_turns_the_dashboard_off(tmp_path: Path) -> None:
    with FakeVendor() as vendor, HubThread(make_config(tmp_path, upstreams_for(vendor))) as hub:
        assert hub.app is not None and hub.app.dashboard is None and hub.dashboard_url == ""
