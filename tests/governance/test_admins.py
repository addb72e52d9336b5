"""Operator accounts on a real database (SQLite and PostgreSQL): scrypt password hashes in their
self-describing form, sign-in checks (a missing name costs a hash too), admin
API tokens stored by hash, sign-in times."""
from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator

import pytest

from hubcore import store
from hubcore.governance import admins
from hubcore.governance.tokens import hash_token

PASSWORD = "correct horse battery"


@pytest.fixture
def conn(database: str) -> Iterator[sqlite3.Connection]:
    c = store.connect(database)
    yield c
    c.close()


def test_a_password_hash_names_its_parameters_and_a_random_salt() -> None:
    first, second = admins.hash_password(PASSWORD), admins.hash_password(PASSWORD)
    scheme, n, r, p, salt, key = first.split("$")
    assert (scheme, int(n), int(r), int(p)) == ("scrypt", 2**15, 8, 1)
    assert len(admins.b64decode(salt)) == 16 and len(admins.b64decode(key)) == 32
    assert first != second  # salted
    expected = hashlib.scrypt(PASSWORD.encode(), salt=admins.b64decode(salt), n=2**15, r=8, p=1,
                              maxmem=admins.SCRYPT_MAXMEM, dklen=32)
    assert admins.b64decode(key) == expected
    assert admins.check_hash(first, PASSWORD) and not admins.check_hash(first, PASSWORD + "x")


def test_a_hash_is_checked_with_its_own_parameters() -> None:
    # A hash made with lower (older) parameters still verifies: they are read from it.
    weak = admins.hash_password(PASSWORD, n=2**10, r=8, p=1)
    assert weak.startswith("scrypt$1024$8$1$")
    assert admins.check_hash(weak, PASSWORD)
    assert not admins.check_hash(weak, "wrong password!")


@pytest.mark.parametrize("stored", ["", "bcrypt$x", "scrypt$a$8$1$AA$AA", "scrypt$1024$8$1$!!$AA"])
def test_an_unreadable_hash_verifies_nothing(stored: str) -> None:
    assert not admins.check_hash(stored, PASSWORD)


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "semi;colon", "ünïcode", "slash/"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        admins.check_name(name)


def test_names_may_use_letters_digits_and_dot_at_dash_underscore() -> None:
    admins.check_name("ops.admin@example-1_x")
    admins.check_name("a" * 64)


def test_short_passwords_are_refused_with_the_minimum() -> None:
    with pytest.raises(ValueError, match="at least 12 characters"):
        admins.check_password("elevenchars")
    admins.check_password("twelve chars")


def test_add_verify_change_remove(conn: sqlite3.Connection) -> None:
    admins.add(conn, "alice", PASSWORD, now=100.0)
    assert admins.verify_password(conn, "alice", PASSWORD)
    assert not admins.verify_password(conn, "alice", PASSWORD + "!")
    assert not admins.verify_password(conn, "bob", PASSWORD)
    with pytest.raises(admins.AdminExists):
        admins.add(conn, "alice", PASSWORD, now=101.0)
    assert admins.set_password(conn, "alice", "another long password", now=102.0)
    assert not admins.verify_password(conn, "alice", PASSWORD)
    assert admins.verify_password(conn, "alice", "another long password")
    assert not admins.set_password(conn, "bob", "another long password", now=102.0)
    assert admins.remove(conn, "alice")
    assert not admins.remove(conn, "alice")
    assert not admins.verify_password(conn, "alice", "another long password")


def test_a_missing_name_costs_a_hash_too(conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    admins.add(conn, "alice", PASSWORD, now=100.0)
    checked: list[str] = []
    real = admins.check_hash

    def spy(stored: str, password: str) -> bool:
        checked.append(stored)
        return real(stored, password)

    monkeypatch.setattr(admins, "check_hash", spy)
    assert not admins.verify_password(conn, "nobody", PASSWORD)
    # One scrypt over the dummy hash, with the same parameters as a real one.
    assert checked == [admins.dummy_hash()]
    assert checked[0].split("$")[:4] == ["scrypt", str(2**15), "8", "1"]
    assert admins.verify_password(conn, "alice", PASSWORD)
    assert checked[1] != admins.dummy_hash()


def test_list_shows_creation_and_last_sign_in(conn: sqlite3.Connection) -> None:
    admins.add(conn, "bob", PASSWORD, now=200.0)
    admins.add(conn, "alice", PASSWORD, now=100.0)
    admins.record_sign_in(conn, "alice", 300.0)
    listed = admins.list_admins(conn)
    assert [(a.name, a.created_at, a.last_sign_in_at) for a in listed] == [("alice", 100.0, 300.0), ("bob", 200.0, None)]
    assert listed[0].to_dict() == {"name": "alice", "created_at": 100.0, "last_sign_in_at": 300.0, "tokens": 0}


def test_api_tokens_are_stored_hashed_and_name_their_admin(conn: sqlite3.Connection) -> None:
    admins.add(conn, "alice", PASSWORD, now=100.0)
    token_id, token = admins.create_token(conn, "alice", now=110.0)
    assert token.startswith(admins.ADMIN_TOKEN_PREFIX)
    assert admins.verify_api_token(conn, token) == "alice"
    assert admins.verify_api_token(conn, token + "x") is None
    assert admins.verify_api_token(conn, "") is None
    stored = conn.execute("SELECT hash FROM admin_tokens WHERE id = ?", (token_id,)).fetchone()[0]
    assert bytes(stored) == hash_token(token)
    with pytest.raises(LookupError):
        admins.create_token(conn, "bob", now=110.0)
    # Removing the admin takes its tokens with it.
    admins.remove(conn, "alice")
    assert admins.verify_api_token(conn, token) is None
    assert conn.execute("SELECT count(*) FROM admin_tokens").fetchone()[0] == 0
