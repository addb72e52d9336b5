"""Which config and database a command uses: `--config`, then
$HUBCORE_CONFIG, then /etc/hubcore/hubcore.toml, the same for `serve` and
for the management commands; the stderr line naming the database; no new
database without `--init`; no vendor key resolved by a database command;
and a database path that cannot work, in one line."""
from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import orjson
import pytest

from hubcore import config as config_mod, store
from hubcore.cli import common
from hubcore.cli.main import build_parser
from tests.cli.test_cli import TOKEN_LINE, _parsers, cli_env, hubcore
from tests.hubharness import free_port, hubcore_cmd, mint, terminate, wait_listening

# Keys only the service can read: under systemd, $CREDENTIALS_DIRECTORY is
# set for the service alone, never for an operator's shell.
CREDENTIAL_KEYS = (
    '[[upstream]]\nname = "anthropic"\nkind = "anthropic"\nbase_url = "https://api.anthropic.com"\n'
    'keys = ["file:${CREDENTIALS_DIRECTORY}/anthropic-key-a"]\n'
)


def write_config(path: Path, database: Path, extra: str = "") -> Path:
    # No dashboard: its default port is one for every test of a run.
    path.write_text(f'[server]\ndatabase = "{database}"\nops_socket = ""\n{extra}\n[dashboard]\nlisten = ""\n')
    return path


def initialised(database: Path) -> Path:
    """A database as `hubcore serve` leaves it."""
    store.connect(database).close()
    return database


def database_line(database: Path, source: str) -> str:
    return f"hubcore: database {database} (config {source})"


# -- discovery -----------------------------------------------------------------------------

def test_locate_prefers_the_option_then_the_environment_then_the_system_file(tmp_path: Path) -> None:
    system = tmp_path / "etc" / "hubcore.toml"
    assert config_mod.locate(None, {}, system=str(system)) is None
    system.parent.mkdir()
    system.write_text("")
    assert config_mod.locate(None, {}, system=str(system)) == str(system)
    assert config_mod.locate(None, {"HUBCORE_CONFIG": "/env.toml"}, system=str(system)) == "/env.toml"
    assert config_mod.locate("/opt.toml", {"HUBCORE_CONFIG": "/env.toml"}, system=str(system)) == "/opt.toml"
    # An empty variable is not a path.
    assert config_mod.locate(None, {"HUBCORE_CONFIG": ""}, system=str(system)) == str(system)


def test_the_system_file_is_where_the_unit_and_the_readme_put_it() -> None:
    assert config_mod.SYSTEM_CONFIG == "/etc/hubcore/hubcore.toml"


def test_load_and_load_server_read_the_system_file(tmp_path: Path) -> None:
    system = write_config(tmp_path / "hubcore.toml", tmp_path / "sys.db", CREDENTIAL_KEYS)
    (tmp_path / "anthropic-key-a").write_text("sk-ant-test\n")
    loaded = config_mod.load(None, {"CREDENTIALS_DIRECTORY": str(tmp_path)}, system=str(system))
    assert loaded.source == str(system) and loaded.server.database == str(tmp_path / "sys.db")
    assert config_mod.load_server(None, {}, system=str(system)).database == str(tmp_path / "sys.db")


@pytest.mark.parametrize("how", ["option-after", "option-before", "environment"])
def test_a_command_from_another_directory_uses_the_configured_database(tmp_path: Path, how: str) -> None:
    (tmp_path / "state").mkdir()
    database = initialised(tmp_path / "state" / "hub.db")
    config = write_config(tmp_path / "hubcore.toml", database)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    words = ["token", "create", "--user", "u", "--json"]
    env: dict[str, str] = {}
    if how == "option-after":
        words += ["--config", str(config)]
    elif how == "option-before":
        words = ["--config", str(config), *words]
    else:
        env["HUBCORE_CONFIG"] = str(config)
    done = hubcore(*words, cwd=elsewhere, **env)
    assert done.returncode == 0, done.stderr
    made = orjson.loads(done.stdout)  # stdout stays clean for scripts
    assert database_line(database, str(config)) in done.stderr.splitlines()
    assert list(elsewhere.iterdir()) == []
    rows = orjson.loads(hubcore("token", "list", "--json", "--config", str(config)).stdout)
    assert [r["id"] for r in rows] == [made["id"]]


def test_serve_and_the_commands_find_the_same_config(tmp_path: Path) -> None:
    """`serve` started with $HUBCORE_CONFIG mints its first token in the
    database that a command run elsewhere with the same variable lists."""
    state = tmp_path / "state"
    state.mkdir()
    port = free_port()
    config = write_config(tmp_path / "hubcore.toml", state / "hub.db", f'listen = "127.0.0.1:{port}"\n')
    proc = subprocess.Popen(hubcore_cmd("serve"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=cli_env(HUBCORE_CONFIG=str(config)), cwd=tmp_path)
    try:
        wait_listening(port, proc)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        listed = hubcore("token", "list", "--json", cwd=elsewhere, HUBCORE_CONFIG=str(config))
        assert listed.returncode == 0, listed.stderr
        token = (state / "first-token").read_text().strip()
        assert [(r["user"], token.startswith(r["prefix"])) for r in orjson.loads(listed.stdout)] == [("admin", True)]
    finally:
        terminate(proc)
    assert proc.returncode == 0


# -- no database made by accident ---------------------------------------------------------------

def test_a_command_without_config_refuses_to_create_a_database_in_the_working_directory(tmp_path: Path) -> None:
    done = hubcore("token", "create", "--user", "u", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"hubcore: no database at {tmp_path / 'hubcore.db'} (config: built-in defaults); "
        "run `hubcore serve` once, or pass --init to create it"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [
    ("token", "create", "--user", "u"), ("token", "list"), ("token", "revoke", "1"),
    ("user", "list"), ("project", "set", "web", "--rpm", "5"), ("usage",), ("usage", "--budgets"),
])
def test_every_database_command_refuses_a_missing_database(tmp_path: Path, command: tuple[str, ...]) -> None:
    config = write_config(tmp_path / "hubcore.toml", tmp_path / "hub.db")
    done = hubcore(*command, "--config", str(config))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"hubcore: no database at {tmp_path / 'hub.db'} (config: {config}); "
        "run `hubcore serve` once, or pass --init to create it"
    ]
    assert not (tmp_path / "hub.db").exists()


def test_init_creates_the_database(tmp_path: Path) -> None:
    config = write_config(tmp_path / "hubcore.toml", tmp_path / "hub.db")
    done = hubcore("token", "create", "--user", "u", "--init", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert TOKEN_LINE.fullmatch(done.stdout.splitlines()[-1])
    assert database_line(tmp_path / "hub.db", str(config)) in done.stderr.splitlines()
    assert (tmp_path / "hub.db").exists()


def test_every_database_command_takes_init_and_no_other_does() -> None:
    for words, parser in _parsers(build_parser()):
        run = parser.get_default("run")
        if run is None:
            continue
        takes = "--init" in parser._option_string_actions
        assert takes == common.uses_database(run), words


def test_a_relative_database_is_named_by_its_absolute_path(tmp_path: Path) -> None:
    initialised(tmp_path / "rel.db")
    config = write_config(tmp_path / "hubcore.toml", Path("rel.db"))
    done = hubcore("token", "list", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == database_line(tmp_path / "rel.db", str(config))


# -- vendor keys stay unread ------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ("token", "create", "--user", "alice", "--project", "web", "--json"),
    ("token", "list", "--json"),
    ("user", "set", "alice", "--rpm", "10"),
    ("user", "show", "alice", "--json"),
    ("user", "list"),
    ("project", "set", "web", "--budget", "month=100"),
    ("project", "show", "web"),
    ("usage", "--format", "json"),
    ("usage", "--budgets"),
])
def test_database_commands_never_resolve_vendor_keys(tmp_path: Path, command: tuple[str, ...]) -> None:
    database = tmp_path / "hub.db"
    mint(database, "alice", "web")
    config = write_config(tmp_path / "hubcore.toml", database, CREDENTIAL_KEYS)
    assert "CREDENTIALS_DIRECTORY" not in cli_env()
    done = hubcore(*command, "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "CREDENTIALS_DIRECTORY" not in done.stderr
    if "--json" in command or "json" in command:
        orjson.loads(done.stdout)


# -- a database path that cannot work --------------------------------------------------------

def unusable_directory(tmp_path: Path) -> Path:
    """A directory in which this process cannot create a file."""
    if os.geteuid() == 0:
        return Path("/sys")  # sysfs refuses new files even to root
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    return locked


def test_a_database_where_no_file_can_be_made_is_one_line(tmp_path: Path) -> None:
    directory = unusable_directory(tmp_path)
    database = directory / "hub.db"
    config = write_config(tmp_path / "hubcore.toml", database)
    for command in (("token", "create", "--user", "u", "--init"), ("usage", "--init")):
        done = hubcore(*command, "--config", str(config))
        assert done.returncode == 1
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"hubcore: cannot open the database {database}: "), line
        assert str(directory) in line.removeprefix(f"hubcore: cannot open the database {database}: ")
    checked = hubcore("check-config", "--config", str(config))
    assert checked.returncode == 1 and "ok" not in checked.stdout
    (line,) = checked.stderr.splitlines()
    assert line.startswith(f"hubcore: {config}: database {database}: "), line
    assert not database.exists()


def test_check_config_checks_the_database_directory(tmp_path: Path) -> None:
    in_the_way = tmp_path / "file"
    in_the_way.write_text("")
    config = write_config(tmp_path / "hubcore.toml", in_the_way / "hub.db")
    done = hubcore("check-config", "--config", str(config))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"hubcore: {config}: database {in_the_way / 'hub.db'}: {in_the_way} is not a directory"]


def test_check_config_warns_of_a_missing_state_directory(tmp_path: Path) -> None:
    """systemd makes /var/lib/hubcore and /run/hubcore when the service
    starts: before that, a missing directory is a warning, not an error."""
    missing = tmp_path / "not-yet"
    config = write_config(tmp_path / "hubcore.toml", missing / "hub.db")
    done = hubcore("check-config", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert f"hubcore: warning: database {missing / 'hub.db'}: directory {missing} does not exist" in done.stderr


def test_check_config_reads_an_existing_database(tmp_path: Path) -> None:
    not_a_database = tmp_path / "hub.db"
    not_a_database.write_text("this is not SQLite, " * 100)
    config = write_config(tmp_path / "hubcore.toml", not_a_database)
    done = hubcore("check-config", "--config", str(config))
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"hubcore: {config}: database {not_a_database}: ") and "not a database" in line


def test_the_database_line_is_said_once_after_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    database = initialised(tmp_path / "hub.db")
    config = write_config(tmp_path / "hubcore.toml", database)
    args = argparse.Namespace(config=str(config))

    def body(args: argparse.Namespace, ctx: common.Context) -> int:
        print("output")
        return 0

    assert common.on_database(body)(args) == 0
    out = capsys.readouterr()
    assert out.out == "output\n"
    assert out.err == database_line(database, str(config)) + "\n"
