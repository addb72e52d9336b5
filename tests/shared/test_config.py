"""[shared] and [server] workers: what is accepted, and each refusal in one
line naming the field, with a Redis password never in it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from hubcore import config as config_mod
from hubcore.errors import ConfigError

SOURCE = "hub.toml"
PASSWORD = "s3cret-pw"


def parse(data: dict[str, Any], env: dict[str, str] | None = None) -> config_mod.Config:
    return config_mod.parse(data, source=SOURCE, env=env or {})


def refusal(data: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, env)
    message = str(info.value)
    assert PASSWORD not in message
    assert message.startswith(f"{SOURCE}: ")
    return message


def test_no_shared_table_shares_nothing() -> None:
    loaded = parse({})
    assert loaded.shared == config_mod.SharedConfig()
    assert loaded.shared.redis == "" and loaded.server.workers == 1


def test_defaults_of_a_shared_redis() -> None:
    shared = parse({"shared": {"redis": "redis://10.0.0.5:6380/2"}}).shared
    assert shared.redis == "redis://10.0.0.5:6380/2"
    assert (shared.timeout, shared.on_failure, shared.heartbeat_interval) == (0.05, "local", 1.0)
    assert config_mod.redis_address(shared.redis) == config_mod.RedisAddress(False, "10.0.0.5", 6380, 2, None)


def test_a_password_in_the_url_is_kept_apart_and_masked() -> None:
    shared = parse({"shared": {"redis": f"rediss://hub:{PASSWORD}@redis.internal/1"}}).shared
    assert shared.password == PASSWORD
    assert shared.redis == "rediss://hub@redis.internal/1"
    assert PASSWORD not in repr(shared)
    assert config_mod.redis_address(shared.redis) == config_mod.RedisAddress(True, "redis.internal", 6379, 1, "hub")


def test_a_percent_encoded_password_is_decoded() -> None:
    assert parse({"shared": {"redis": "redis://:p%40ss@h/0"}}).shared.password == "p@ss"


def test_the_password_field_from_env_and_file(tmp_path: Path) -> None:
    shared = parse({"shared": {"redis": "redis://h/0", "password": "env:REDIS_PW"}}, {"REDIS_PW": PASSWORD}).shared
    assert shared.password == PASSWORD
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")
    assert parse({"shared": {"redis": "redis://h/0", "password": f"file:{secret}"}}).shared.password == PASSWORD


def test_the_whole_url_from_env() -> None:
    shared = parse({"shared": {"redis": "env:REDIS_URL"}}, {"REDIS_URL": f"redis://:{PASSWORD}@h:7000/3"}).shared
    assert (shared.redis, shared.password) == ("redis://h:7000/3", PASSWORD)


def test_mask_url() -> None:
    assert config_mod.mask_url(f"redis://u:{PASSWORD}@h:1/0") == "redis://u:***@h:1/0"
    assert config_mod.mask_url("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.parametrize(("shared", "expected"), [
    ({"redis": "http://h:6379"}, "shared.redis: expected \"redis://HOST:PORT/DB\" (or rediss:// for TLS), got 'http://h:6379'"),
    ({"redis": f"redis://:{PASSWORD}@h/zero"}, "shared.redis: 'redis://:***@h/zero': the database after the host must be a number, e.g. /0"),
    ({"redis": f"redis://:{PASSWORD}@h:99999/0"}, "shared.redis: 'redis://:***@h:99999/0' is not a URL"),
    ({"redis": "redis://h/0?timeout=1"}, "shared.redis: 'redis://h/0?timeout=1': options after ? or # are not read"),
    ({"redis": 6379}, "shared.redis: expected str, got int"),
    ({"timeout": 0.1}, "shared.redis: required: [shared] sets timeout but names no Redis to share through"),
    ({"redis": "redis://h", "timeout": 0}, "shared.timeout: must be a positive number of seconds, got 0.0"),
    ({"redis": "redis://h", "timeout": "fast"}, "shared.timeout: expected float, got str"),
    ({"redis": "redis://h", "heartbeat_interval": 2.0, "instance_ttl": 2.0}, "shared.instance_ttl: must be longer than heartbeat_interval"),
    ({"redis": "redis://h", "lease_ttl": 0.1}, "shared.lease_ttl: must be at least ten times timeout"),
    ({"redis": "redis://h", "on_failure": "open"}, "shared.on_failure: must be \"local\" or \"closed\", got 'open'"),
    ({"redis": "redis://h", "prefix": "hub core"}, "shared.prefix: 1 to 64 of the letters"),
    ({"redis": "redis://h", "max_connections": 0}, "shared.max_connections: must be at least 1"),
    ({"redis": "redis://h", "ca_file": "/etc/ca.pem"}, "shared.ca_file: only read for a rediss:// (TLS) URL"),
    ({"redis": "redis://h", "timout": 0.1}, "shared.timout: unknown field; did you mean timeout?"),
    ({"redis": f"redis://:{PASSWORD}@h", "password": "env:X"}, "shared.password: the URL in shared.redis has a password too"),
    ({"redis": "redis://h", "password": "env:NOT_SET"}, "shared.password: environment variable NOT_SET is not set or empty"),
])
def test_refusals_name_the_field(shared: dict[str, Any], expected: str) -> None:
    assert refusal({"shared": shared}).startswith(f"{SOURCE}: {expected}")


def test_workers_default_number_and_auto() -> None:
    assert parse({"server": {"workers": 3}, "shared": {"redis": "redis://h"}}).server.workers == 3
    auto = parse({"server": {"workers": "auto"}, "shared": {"redis": "redis://h"}}).server.workers
    assert auto == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("workers", [0, -1, 2000, "two", True, 1.5])
def test_workers_must_be_a_whole_number_or_auto(workers: object) -> None:
    message = refusal({"server": {"workers": workers}, "shared": {"redis": "redis://h"}})
    assert message == f'{SOURCE}: server.workers: must be a whole number from 1 to 1024 or "auto", got {workers!r}'


def test_several_workers_without_redis_are_refused_with_the_reason() -> None:
    message = refusal({"server": {"workers": 2}})
    assert message.startswith(f'{SOURCE}: server.workers: 2 workers need [shared] redis = "redis://HOST:PORT/DB": ')
    assert "multiplied by the number of workers" in message


def test_auto_workers_without_redis_are_refused_on_a_machine_of_several_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    if cores == 1:
        assert parse({"server": {"workers": "auto"}}).server.workers == 1
    else:
        assert "workers need [shared] redis" in refusal({"server": {"workers": "auto"}})


def test_a_toml_file_with_shared(tmp_path: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(
        '[server]\nworkers = 2\n\n[shared]\nredis = "redis://127.0.0.1:6379/0"\npassword = "env:HUB_REDIS"\n'
        'timeout = 0.1\non_failure = "closed"\n'
    )
    loaded = config_mod.load(str(path), env={"HUB_REDIS": PASSWORD})
    assert loaded.server.workers == 2
    assert (loaded.shared.password, loaded.shared.timeout, loaded.shared.on_failure) == (PASSWORD, 0.1, "closed")
