"""Several `hubcore serve` processes in front of one fake vendor, sharing one
PostgreSQL database and one redis-server, as an operator runs them: each
with its own config file, port, spool and ops socket. Started together,
stopped together (SIGTERM, then SIGKILL), with their logs kept for a
failing test's report."""
from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from hubcore.ops import client as opsclient
from tests.hubharness import REPO, eventually, free_port, hubcore_cmd, wait_listening
from tests.pgserver import PASSWORD, PASSWORD_ENV, PgDatabase


# Seconds an instance gets to listen after `hubcore serve` starts (schema
# migrations under an advisory lock, three at once, on a loaded machine).
START_TIMEOUT = 60.0
# Seconds it gets to drain and exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 15.0
SONNET = "claude-sonnet-4-6"
BODY = orjson.dumps({"model": SONNET, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})


@dataclass(frozen=True)
class Upstream:
    """One [[upstream]] of kind anthropic: its group and its keys' labels
    (each key's secret is its label)."""

    name: str
    group: str
    keys: tuple[str, ...]

    def toml(self, base_url: str) -> str:
        keys = ", ".join(f'{{ key = "{key}", label = "{key}" }}' for key in self.keys)
        return (f'\n[[upstream]]\nname = "{self.name}"\nkind = "anthropic"\ngroup = "{self.group}"\n'
                f'base_url = "{base_url}"\nkeys = [{keys}]\n')


def toml_table(name: str, fields: dict[str, Any]) -> str:
    """A TOML table of strings, numbers and booleans (JSON spells them alike)."""
    return f"\n[{name}]\n" + "".join(f"{key} = {orjson.dumps(value).decode()}\n" for key, value in fields.items())


def child_env() -> dict[str, str]:
    """This checkout importable, the database password where the configs
    say (env:), nothing of the caller's hubcore or PostgreSQL settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HUBCORE_", "PG", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update(PYTHONPATH=str(REPO), **{PASSWORD_ENV: PASSWORD})
    return env


class Instance:
    """One `hubcore serve --config FILE` process and its files."""

    def __init__(self, name: str, home: Path, database: PgDatabase, redis_url: str, vendor_url: str,
                 upstreams: Iterable[Upstream], shared: dict[str, Any]) -> None:
        self.name = name
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
        self._sock_dir = Path(tempfile.mkdtemp(prefix=f"hc-{name}-", dir="/tmp"))
        self.ops = str(self._sock_dir / "ops.sock")
        self.log = home / "serve.log"
        self.config = home / "hubcore.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._terminated = False
        server = {
            "listen": f"127.0.0.1:{self.port}", **database.server_config,
            "spool": str(home / "usage.spool"), "ops_socket": self.ops,
            "usage_flush_interval": 0.05, "drain_timeout": 5.0,
        }
        self.config.write_text(
            toml_table("server", server)
            + toml_table("shared", {"redis": redis_url, **shared})
            # Not the dashboard's default port, which every instance would want.
            + toml_table("dashboard", {"listen": ""})
            + "".join(upstream.toml(vendor_url) for upstream in upstreams)
        )

    def start(self) -> None:
        self._terminated = False
        self._log_file = open(self.log, "ab")
        self.proc = subprocess.Popen(hubcore_cmd("serve", "--config", str(self.config)),
                                     stdout=self._log_file, stderr=self._log_file, env=child_env(), cwd=self.home)

    def wait_ready(self) -> None:
        """Until the proxy port takes connections and the ops socket answers
        (its file exists from bind(), before listen())."""
        wait_listening(self.port, self.proc, timeout=START_TIMEOUT)
        eventually(self._answers, timeout=START_TIMEOUT, what=f"{self.name}'s ops socket answering")

    def _answers(self) -> bool:
        try:
            self.stats()
        except opsclient.OpsClientError:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"instance {self.name} exited with {self.proc.returncode}") from None
            return False
        return True

    def terminate(self) -> None:
        """SIGTERM, once: a second one after the hub has stopped would meet
        the default handler and turn a clean exit into death by signal."""
        if self.proc is not None and self.proc.poll() is None and not self._terminated:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self) -> int | None:
        """SIGTERM, SIGKILL if it outstays STOP_TIMEOUT; its exit status."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        shutil.rmtree(self._sock_dir, ignore_errors=True)
        return None if proc is None else proc.returncode

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    # -- the ops socket --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return opsclient.get_stats(self.ops)

    def metrics(self) -> dict[str, float]:
        """GET /metrics: each unlabelled sample's value by name."""
        status, body = opsclient.fetch(self.ops, "/metrics")
        assert status == 200, body
        return {sample.name: sample.value for family in text_string_to_metric_families(body.decode())
                for sample in family.samples if not sample.labels}

    def refresh_tokens(self) -> None:
        opsclient.refresh_tokens(self.ops)

    def keys(self, upstream: str) -> dict[str, dict[str, Any]]:
        """The key ring of `upstream` as this instance holds it, by label."""
        return {key["label"]: key for key in self.stats()["keys"][upstream]}

    # -- the proxy port --------------------------------------------------------------

    def post(self, token: str, headers: dict[str, str] | None = None,
             timeout: float = 30) -> tuple[int, dict[str, str], dict[str, Any]]:
        """One POST /v1/messages: (status, headers, JSON body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", "/v1/messages", BODY, {
                "x-api-key": token, "content-type": "application/json", "anthropic-version": "2023-06-01",
                **(headers or {}),
            })
            response = conn.getresponse()
            head = {name.lower(): value for name, value in response.getheaders()}
            return response.status, head, orjson.loads(response.read())
        finally:
            conn.close()


class Instances:
    """`count` instances started at once (their migrations race, as a
    deploy's do), stopped by close()."""

    def __init__(self, root: Path, count: int, database: PgDatabase, redis_url: str, vendor_url: str,
                 upstreams: Iterable[Upstream], shared: dict[str, Any]) -> None:
        upstreams = list(upstreams)
        self.members = [
            Instance(chr(ord("a") + i), root / chr(ord("a") + i), database, redis_url, vendor_url, upstreams, shared)
            for i in range(count)
        ]

    def __iter__(self) -> Any:
        return iter(self.members)

    def __getitem__(self, index: int) -> Instance:
        return self.members[index]

    def __len__(self) -> int:
        return len(self.members)

    def start(self) -> None:
        try:
            for instance in self.members:
                instance.start()
            for instance in self.members:
                instance.wait_ready()
        except BaseException as e:
            self.close()
            e.add_note(self.logs())
            raise

    def close(self) -> list[int | None]:
        # SIGTERM to all first: they drain side by side.
        for instance in self.members:
            instance.terminate()
        return [instance.stop() for instance in self.members]

    def cli(self, *args: str) -> str:
        """`hubcore ARGS --config <the first instance's>`; its stdout (the
        command must succeed and print no database password)."""
        done = subprocess.run(hubcore_cmd(*args, "--config", str(self.members[0].config)), capture_output=True,
                              text=True, env=child_env(), cwd=self.members[0].home, timeout=60)
        assert done.returncode == 0, f"hubcore {' '.join(args)}: {done.stderr.strip()}"
        assert PASSWORD not in done.stdout + done.stderr
        return done.stdout

    def mint(self, user: str, *limits: str) -> tuple[int, str]:
        """`hubcore token create --user USER LIMITS... --json`, then every
        instance told to reload: (token id, token), usable on all of them."""
        made = orjson.loads(self.cli("token", "create", "--user", user, "--json", *limits))
        for instance in self.members:
            instance.refresh_tokens()
        return made["id"], made["token"]

    def exited(self) -> list[str]:
        """"<name> exited with <status>" for each instance no longer running."""
        return [f"{i.name} exited with {i.proc.returncode}" for i in self.members
                if i.proc is not None and i.proc.poll() is not None]

    def logs(self, tail: int = 25) -> str:
        parts = []
        for instance in self.members:
            lines = instance.log_text().splitlines()[-tail:]
            parts.append(f"--- instance {instance.name} ({instance.log}), last {len(lines)} lines ---")
            parts.extend(lines)
        return "\n".join(parts)


