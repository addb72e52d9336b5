"""[[alert]] in the config: defaults, event groups, secrets by reference,
and errors that name the entry and field and never the URL."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hubcore import config as config_mod
from hubcore.config import ALERT_EVENTS
from hubcore.errors import ConfigError

SECRET_URL = "https://hooks.example.com/services/T000/B000/XXXXsecretXXXX"


def parse(*entries: dict[str, Any], env: dict[str, str] | None = None) -> config_mod.Config:
    return config_mod.parse({"alert": list(entries)}, source="hub.toml", env=env or {})


def test_defaults_and_what_a_repr_shows() -> None:
    (alert,) = parse({"url": SECRET_URL}).alerts
    assert (alert.label, alert.format, alert.events, alert.min_interval) == ("alert[0]", "json", ALERT_EVENTS, 600.0)
    assert (alert.timeout, alert.retries, alert.retry_backoff) == (5.0, 2, 1.0)
    assert alert.url == SECRET_URL and SECRET_URL not in repr(alert) and "XXXXsecret" not in repr(parse().alerts)
    assert parse().alerts == ()


def test_events_take_kinds_and_groups() -> None:
    (alert,) = parse({"url": SECRET_URL, "events": ["usage.degraded", "budget", "upstream"], "name": "ops"}).alerts
    assert alert.label == "ops"
    assert alert.events == (
        "budget.threshold", "upstream.unavailable", "upstream.failover", "upstream.recovered", "usage.degraded",
    )


def test_the_url_may_come_from_the_environment_or_a_file(tmp_path: Path) -> None:
    path = tmp_path / "hook"
    path.write_text(SECRET_URL + "\n")
    first, second = parse({"url": "env:HOOK"}, {"url": f"file:{path}"}, env={"HOOK": SECRET_URL}).alerts
    assert first.url == second.url == SECRET_URL


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"url": "ftp://hooks.example.com/XXXXsecretXXXX"}, "alert[0].url: expected an http:// or https:// URL with a host"),
        ({"url": "https:///XXXXsecretXXXX"}, "alert[0].url: expected an http:// or https:// URL with a host"),
        ({"url": "https://hooks.example.com:port/XXXXsecretXXXX"}, "alert[0].url: not a URL (its port is not a number)"),
        ({"url": "env:NOT_SET"}, "alert[0].url: environment variable NOT_SET is not set or empty"),
        ({}, "alert[0].url: required"),
        ({"url": SECRET_URL, "format": "xml"}, "alert[0].format: must be 'json' or 'slack', got 'xml'"),
        ({"url": SECRET_URL, "events": ["budget.crossed"]}, "alert[0].events: unknown event kind 'budget.crossed'"),
        ({"url": SECRET_URL, "events": []}, "alert[0].events: must be a non-empty array"),
        ({"url": SECRET_URL, "events": "budget"}, "alert[0].events: must be a non-empty array"),
        ({"url": SECRET_URL, "min_interval": -1}, "alert[0].min_interval: must not be negative"),
        ({"url": SECRET_URL, "min_interval": "10m"}, "alert[0].min_interval: expected float, got str"),
        ({"url": SECRET_URL, "timeout": 0}, "alert[0].timeout: must be positive"),
        ({"url": SECRET_URL, "retries": 11}, "alert[0].retries: must be from 0 to 10"),
        ({"url": SECRET_URL, "name": "two words"}, "alert[0].name: 'two words' is not a name"),
        ({"url": SECRET_URL, "formt": "json"}, "alert[0].formt: unknown field; did you mean format?"),
    ],
)
def test_a_malformed_alert_names_its_field_and_never_its_url(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"url": SECRET_URL, "name": "first"}, entry)
    text = str(info.value).replace("alert[1]", "alert[0]")
    assert text.startswith("hub.toml: ") and message in text
    assert "XXXXsecret" not in text


def test_names_are_unique_and_the_array_is_an_array() -> None:
    with pytest.raises(ConfigError, match=r"alert\[1\].name: duplicate alert name 'ops'"):
        parse({"url": SECRET_URL, "name": "ops"}, {"url": SECRET_URL, "name": "ops"})
    with pytest.raises(ConfigError, match=r"alert: must be an array of tables \(\[\[alert\]\]\)"):
        config_mod.parse({"alert": {"url": SECRET_URL}}, source="hub.toml", env={})


def test_load_alerts_reads_no_vendor_key(tmp_path: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(
        '[[upstream]]\nname = "a"\nkind = "anthropic"\nbase_url = "https://api.anthropic.com"\nkeys = ["env:GONE"]\n'
        f'[[alert]]\nurl = "{SECRET_URL}"\nformat = "slack"\n'
    )
    with pytest.raises(ConfigError):
        config_mod.load(str(path), env={})
    (alert,) = config_mod.load_alerts(str(path), env={})
    assert alert.format == "slack"
