"""The systemd unit and the example config: directives, systemd-analyze, and MDWE safety."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "hubcore.service"
EXAMPLE = REPO / "deploy" / "hubcore.example.toml"
INSTALLED_EXEC = "/opt/hubcore/bin/hubcore"
MAX_EXPOSURE = 2.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                           reason="systemd-analyze is not installed")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of directives; a directive may repeat (LoadCredential=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line}"
        assert "=" in line, f"not a directive: {line}"
        name, value = line.split("=", 1)
        current.setdefault(name.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def one(service: dict[str, list[str]], name: str) -> str:
    assert name in service, f"{name}= missing"
    assert len(service[name]) == 1, f"{name}= given {len(service[name])} times"
    return service[name][0]


def test_lifecycle_directives(service: dict[str, list[str]]) -> None:
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert one(service, "WatchdogSec") == "30"
    assert one(service, "ExecStart") == f"{INSTALLED_EXEC} serve --config /etc/hubcore/hubcore.toml"
    assert one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(service, "Restart") == "on-failure"
    assert one(service, "LimitNOFILE") == "65536"
    assert "multi-user.target" in parse_unit(UNIT.read_text())["Install"]["WantedBy"]


def test_user_and_directories(service: dict[str, list[str]]) -> None:
    assert one(service, "User") == "hubcore"
    assert "DynamicUser" not in service
    assert one(service, "StateDirectory") == "hubcore"
    assert one(service, "RuntimeDirectory") == "hubcore"
    assert one(service, "RuntimeDirectoryMode") == "0750"
    assert one(service, "ConfigurationDirectory") == "hubcore"
    assert one(service, "UMask") == "0027"


@pytest.mark.parametrize("name, value", [
    ("NoNewPrivileges", "yes"),
    ("CapabilityBoundingSet", ""),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("PrivateUsers", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectClock", "yes"),
    ("ProtectHostname", "yes"),
    ("ProtectProc", "invisible"),
    ("ProcSubset", "pid"),
    ("RestrictNamespaces", "yes"),
    ("RestrictRealtime", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("LockPersonality", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("RemoveIPC", "yes"),
    ("SystemCallArchitectures", "native"),
])
def test_hardening_directive(service: dict[str, list[str]], name: str, value: str) -> None:
    assert one(service, name) == value


def test_network_and_syscall_filters(service: dict[str, list[str]]) -> None:
    assert one(service, "RestrictAddressFamilies").split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert "IPAddressDeny" not in service           # the hub must reach the vendors
    filters = service["SystemCallFilter"]
    assert filters[0] == "@system-service"
    assert set(filters[1].removeprefix("~").split()) == {"@privileged", "@resources"}


def test_credentials_match_the_example_config(service: dict[str, list[str]]) -> None:
    credentials = {}
    for entry in service["LoadCredential"]:
        name, _, source = entry.partition(":")
        assert source.startswith("/etc/hubcore/keys/"), entry
        credentials[name] = source
    config = tomllib.loads(EXAMPLE.read_text())
    referenced = set()
    for upstream in config["upstream"]:
        for key in upstream["keys"]:
            match = re.fullmatch(r"file:\$\{CREDENTIALS_DIRECTORY\}/([\w.-]+)", key["key"])
            assert match, f"{key['label']}: not a credential reference: {key['key']}"
            referenced.add(match.group(1))
            assert key["label"], "every key carries a label"
    assert referenced == set(credentials)


def test_example_config_fits_the_unit(service: dict[str, list[str]]) -> None:
    server = tomllib.loads(EXAMPLE.read_text())["server"]
    state = "/var/lib/" + one(service, "StateDirectory") + "/"
    runtime = "/run/" + one(service, "RuntimeDirectory") + "/"
    assert server["database"].startswith(state)
    assert server["ops_socket"].startswith(runtime)
    assert server["ops_socket_group"] == one(service, "Group")
    assert float(server["drain_timeout"]) < float(one(service, "TimeoutStopSec"))
    assert one(service, "ExecStart").endswith("--config /etc/hubcore/hubcore.toml")


def test_example_config_loads(tmp_path: Path) -> None:
    from hubcore import config as hubconfig

    for name in ("anthropic-key-a", "anthropic-key-b", "openai-key-a"):
        (tmp_path / name).write_text(f"sk-test-{name}\n")
    cfg = hubconfig.load(str(EXAMPLE), env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert [u.name for u in cfg.upstreams] == ["anthropic", "openai"]
    assert cfg.server.ops_socket == "/run/hubcore/ops.sock"
    keys = {k.label: k for u in cfg.upstreams for k in u.keys}
    assert keys["a"].secret == "sk-test-anthropic-key-a"
    assert keys["b"].workspace == "ws-b" and keys["b"].org == "org-2"


@needs_systemd_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists: stand one in for the
    # installed entry point, leave every other line as shipped.
    fake = tmp_path / "bin" / "hubcore"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(INSTALLED_EXEC) == 1
    unit = tmp_path / "hubcore.service"
    unit.write_text(text.replace(INSTALLED_EXEC, str(fake)))
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "hubcore.service:" not in output, output


@needs_systemd_analyze
def test_systemd_analyze_security_score() -> None:
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}",
         "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    match = re.search(r"Overall exposure level for hubcore\.service: (\d+(?:\.\d+)?)", output)
    assert match, output
    assert float(match.group(1)) <= MAX_EXPOSURE, output
    assert proc.returncode == 0, output


# Under MemoryDenyWriteExecute=yes no code may map memory writable and
# executable (a JIT, libffi closures, text relocations). The kernel's
# PR_SET_MDWE (Linux 6.3+) applies the same rule to a process and survives
# execve, so the stack below runs from interpreter start-up under it.
# prctl numbers from <linux/prctl.h>: PR_SET_MDWE 65, PR_GET_MDWE 66,
# PR_MDWE_REFUSE_EXEC_GAIN 1.

MDWE_WORKLOAD = textwrap.dedent("""
    import ctypes, glob, importlib, mmap, os, sqlite3, ssl, sys, tempfile

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(66, 0, 0, 0, 0) & 1, "MDWE is not in force"
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        pass
    else:
        raise AssertionError("a W+X mapping was allowed: the check proves nothing")

    import asyncio, h11, httptools, orjson, uvloop
    for mod in ("hubcore.ops.metrics", "hubcore.ops.server", "hubcore.ops.client", "hubcore.ops.sdnotify"):
        importlib.import_module(mod)
    here = os.path.dirname(importlib.import_module("hubcore").__file__)
    for so in glob.glob(os.path.join(here, "*.so")):
        importlib.import_module("hubcore." + os.path.basename(so).split(".")[0])

    assert orjson.loads(orjson.dumps({"a": [1, 2.5, None]})) == {"a": [1, 2.5, None]}
    assert sqlite3.connect(":memory:").execute("select 40 + 2").fetchone() == (42,)
    ssl.create_default_context()

    class Req:
        def __init__(self): self.url = None
        def on_url(self, url): self.url = url
    req = Req()
    httptools.HttpRequestParser(req).feed_data(b"GET /v1/models HTTP/1.1\\r\\nhost: x\\r\\n\\r\\n")
    assert req.url == b"/v1/models"

    async def main():
        async def echo(reader, writer):
            writer.write(await reader.read(100))
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        assert await reader.read(100) == b"ping"
        writer.close()
        server.close()
        await server.wait_closed()
        # SQLite on a thread of its own, as the usage writer runs it.
        from hubcore.accounting.sqlitewriter import BatchConnection
        with tempfile.TemporaryDirectory() as directory:
            conn = await asyncio.get_running_loop().run_in_executor(
                None, BatchConnection, os.path.join(directory, "hub.db"), 100)
            await asyncio.get_running_loop().run_in_executor(None, conn.close)
    uvloop.run(main())
    print("mdwe-ok")
""")

MDWE_LAUNCHER = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:
        sys.exit(77)                       # kernel without PR_SET_MDWE
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
""")


def test_stack_runs_under_memory_deny_write_execute() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_MDWE is Linux-only")
    env = {k: v for k, v in os.environ.items() if k != "HUBCORE_NO_EXTENSIONS"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", MDWE_LAUNCHER, MDWE_WORKLOAD],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env)
    if proc.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("mdwe-ok")
