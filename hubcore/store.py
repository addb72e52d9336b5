"""The SQLite database: connection settings, the versioned schema and its migrations.

Every process (the server's writer, the token reloader, the CLI) opens the
database through `connect()`, so all of them agree on WAL mode and on the
schema version; `migrate()` upgrades an older database in place.
"""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from hubcore.database import is_postgres

# Each entry upgrades the schema from version i to i + 1 (PRAGMA user_version).
# Append only: a released migration is never edited, so every database that
# exists in the field can be brought to the current version step by step.
MIGRATIONS: list[str] = [
    # 1: hub tokens (only their SHA-256 is stored) and usage rows.
    """
    CREATE TABLE tokens (
        id          INTEGER PRIMARY KEY,
        prefix      TEXT NOT NULL,
        hash        BLOB NOT NULL UNIQUE,
        user        TEXT NOT NULL,
        project     TEXT,
        note        TEXT,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL,
        revoked_at  REAL
    );
    CREATE TABLE generation (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    INSERT INTO generation (name, value) VALUES ('tokens', 0);
    CREATE TRIGGER tokens_gen_insert AFTER INSERT ON tokens BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    CREATE TRIGGER tokens_gen_update AFTER UPDATE ON tokens BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    CREATE TRIGGER tokens_gen_delete AFTER DELETE ON tokens BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    CREATE TABLE usage (
        id                   INTEGER PRIMARY KEY,
        ts                   REAL NOT NULL,
        request_id           TEXT NOT NULL UNIQUE,
        token_id             INTEGER,
        user                 TEXT,
        project              TEXT,
        upstream             TEXT,
        key_label            TEXT,
        endpoint             TEXT NOT NULL,
        model                TEXT,
        status               INTEGER NOT NULL,
        outcome              TEXT NOT NULL,
        input_tokens         INTEGER NOT NULL DEFAULT 0,
        output_tokens        INTEGER NOT NULL DEFAULT 0,
        cache_write_5m       INTEGER NOT NULL DEFAULT 0,
        cache_write_1h       INTEGER NOT NULL DEFAULT 0,
        cache_read           INTEGER NOT NULL DEFAULT 0,
        reasoning_tokens     INTEGER NOT NULL DEFAULT 0,
        server_tool_requests INTEGER NOT NULL DEFAULT 0,
        stop_reason          TEXT,
        error_type           TEXT,
        cost_micros          INTEGER,
        ttfb_ms              REAL,
        total_ms             REAL NOT NULL,
        attempts             INTEGER NOT NULL DEFAULT 0,
        session_id           TEXT,
        user_agent           TEXT
    );
    CREATE INDEX usage_ts ON usage (ts);
    CREATE INDEX usage_user_ts ON usage (user, ts);
    CREATE INDEX usage_token_ts ON usage (token_id, ts);
    """,
    # 2: limits (a JSON object, see hubcore/limits.py) on tokens, users and
    # projects. Users and projects need no row unless they carry limits; any
    # change bumps the tokens generation so running servers reload limits too.
    # The token index gains cost_micros so that rebuilding spend counters at
    # start reads the index alone, in token order, with no sort (1M rows: a
    # fraction of a second rather than seconds).
    """
    ALTER TABLE tokens ADD COLUMN limits TEXT;
    DROP INDEX usage_token_ts;
    CREATE INDEX usage_token_ts_cost ON usage (token_id, ts, cost_micros);
    CREATE TABLE users (
        name        TEXT PRIMARY KEY,
        limits      TEXT,
        note        TEXT,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE TABLE projects (
        name        TEXT PRIMARY KEY,
        limits      TEXT,
        note        TEXT,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE TRIGGER users_gen_insert AFTER INSERT ON users BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    CREATE TRIGGER users_gen_update AFTER UPDATE ON users BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    CREATE TRIGGER users_gen_delete AFTER DELETE ON users BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    CREATE TRIGGER projects_gen_insert AFTER INSERT ON projects BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    CREATE TRIGGER projects_gen_update AFTER UPDATE ON projects BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    CREATE TRIGGER projects_gen_delete AFTER DELETE ON projects BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    """,
    # 3: whether a row's output_tokens were estimated (a stream cut before
    # the vendor reported them) rather than reported; 0 or 1.
    """
    ALTER TABLE usage ADD COLUMN output_estimated INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: the operator's `hubcore keys enable|disable`, one row per upstream
    # name and key label, applied at start. What the vendor said of a key
    # (dead after a 401) is not stored: a restart tries the key again. A row
    # whose key left the config does nothing unless the label comes back.
    """
    CREATE TABLE key_switches (
        upstream    TEXT NOT NULL,
        label       TEXT NOT NULL,
        enabled     INTEGER NOT NULL,
        changed_at  REAL NOT NULL,
        PRIMARY KEY (upstream, label)
    );
    """,
    # 5: how a row's cost was set when its model has no price: "estimate",
    # "free", "refused" or "unknown" (accounting.pricing.BASIS_*); NULL: the
    # model's own price. Earlier rows with a model and no cost had no price.
    """
    ALTER TABLE usage ADD COLUMN cost_basis TEXT;
    UPDATE usage SET cost_basis = 'unknown' WHERE cost_micros IS NULL AND model IS NOT NULL;
    """,
    # 6: with several upstreams per kind, which model the upstream was asked
    # for (NULL: the client's own id went as it was) and the attempts a
    # request took ("primary/a:529,backup/c:200"; NULL: the hub answered).
    """
    ALTER TABLE usage ADD COLUMN served_model TEXT;
    ALTER TABLE usage ADD COLUMN route TEXT;
    """,
    # 7: operators of the dashboard (password: a self-describing scrypt hash,
    # hubcore.governance.admins), their API tokens (SHA-256 only, like hub
    # tokens; an operator's removal takes them along) and the audit trail of
    # administrative changes (before/after: JSON, never a secret).
    """
    CREATE TABLE admins (
        name             TEXT PRIMARY KEY,
        password         TEXT NOT NULL,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL,
        last_sign_in_at  REAL
    );
    CREATE TABLE admin_tokens (
        id          INTEGER PRIMARY KEY,
        admin       TEXT NOT NULL REFERENCES admins (name) ON DELETE CASCADE,
        prefix      TEXT NOT NULL,
        hash        BLOB NOT NULL UNIQUE,
        created_at  REAL NOT NULL
    );
    CREATE INDEX admin_tokens_admin ON admin_tokens (admin);
    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY,
        ts      REAL NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        target  TEXT,
        before  TEXT,
        after   TEXT,
        origin  TEXT NOT NULL
    );
    CREATE INDEX audit_ts ON audit (ts);
    """,
    # 8: the dashboard's request list (hubcore.dashboard.views.requests)
    # filters by user, project, model, outcome or status, newest first: one
    # (filter, ts) index each (usage_user_ts serves user), so that a filter
    # and a time range are one index range read in order, whichever value
    # is asked for (with 2 million rows a filter without its index scans
    # them all: about a second for a value no row has). And what usage
    # retention (server.usage_retention_days) removed, summed per token, so
    # that a `total` budget rebuilt at start still counts it.
    """
    CREATE INDEX usage_project_ts ON usage (project, ts);
    CREATE INDEX usage_model_ts ON usage (model, ts);
    CREATE INDEX usage_outcome_ts ON usage (outcome, ts);
    CREATE INDEX usage_status_ts ON usage (status, ts);
    CREATE TABLE usage_carried (
        token_id     INTEGER PRIMARY KEY,
        user         TEXT,
        project      TEXT,
        cost_micros  INTEGER NOT NULL,
        requests     INTEGER NOT NULL,
        through_ts   REAL NOT NULL
    );
    """,
    # 9: spend resets ("reset this window's spend", from the dashboard or
    # `hubcore user|project|token reset-spend`): per scope and budget window,
    # the moment from which its spend counts again; the Limiter's rebuild at
    # start honours it, so a reset outlives a restart. A change bumps the
    # tokens generation, so running hubs reload it with the limits.
    """
    CREATE TABLE spend_resets (
        kind           TEXT NOT NULL,
        name           TEXT NOT NULL,
        budget_window  TEXT NOT NULL,
        reset_at       REAL NOT NULL,
        PRIMARY KEY (kind, name, budget_window)
    );
    CREATE TRIGGER spend_resets_gen_insert AFTER INSERT ON spend_resets BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    CREATE TRIGGER spend_resets_gen_update AFTER UPDATE ON spend_resets BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    CREATE TRIGGER spend_resets_gen_delete AFTER DELETE ON spend_resets BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    """,
    # 10: the rollups of usage (hubcore/accounting/rollup.py): sums per local
    # hour of the reporting zone x user x project x model x served model x
    # upstream x key label x token; per local day x model x served model, x
    # upstream x key label and x user x project x token (apart: their
    # product is what makes rollups big); a histogram of time to first byte
    # per hour. A trigger keeps them on every usage row actually inserted (a
    # duplicate request_id that ON CONFLICT DO NOTHING skips fires nothing);
    # deletes never touch them, so reports outlive raw rows.
    # usage_rollup_zone: the reporting zone's UTC offset from each `start`
    # on (UTC here; set at each start of the hub). A dimension that is NULL
    # is stored as '' (a token as 0): NULLs are never equal in a key.
    # usage_ttfb_bins: the histogram's lower bounds, 8 to a doubling from
    # 1 ms (bin 0: below 1 ms). Unix times are positive, so CAST, % and / on
    # them round down.
    """
    CREATE TABLE usage_rollup_zone (
        start       INTEGER PRIMARY KEY,
        utc_offset  INTEGER NOT NULL
    );
    INSERT INTO usage_rollup_zone (start, utc_offset) VALUES (-9223372036854775808, 0);
    CREATE TABLE usage_ttfb_bins (
        lower_ms  REAL PRIMARY KEY,
        bin       INTEGER NOT NULL UNIQUE
    ) WITHOUT ROWID;
    WITH RECURSIVE edges (bin, lower_ms) AS (
        SELECT 1, 1.0
        UNION ALL
        SELECT bin + 1, lower_ms * 1.0905077326652577 FROM edges WHERE bin < 160
    )
    INSERT INTO usage_ttfb_bins (bin, lower_ms) SELECT 0, 0.0 UNION ALL SELECT bin, lower_ms FROM edges;
    CREATE TABLE usage_hourly (
        hour            INTEGER NOT NULL,
        user            TEXT NOT NULL,
        project         TEXT NOT NULL,
        model           TEXT NOT NULL,
        served_model    TEXT NOT NULL,
        upstream        TEXT NOT NULL,
        key_label       TEXT NOT NULL,
        token_id        INTEGER NOT NULL,
        requests        INTEGER NOT NULL,
        errors          INTEGER NOT NULL,
        input           INTEGER NOT NULL,
        output          INTEGER NOT NULL,
        cache_write_5m  INTEGER NOT NULL,
        cache_write_1h  INTEGER NOT NULL,
        cache_read      INTEGER NOT NULL,
        reasoning       INTEGER NOT NULL,
        cost_micros     INTEGER NOT NULL,
        unpriced        INTEGER NOT NULL,
        estimated       INTEGER NOT NULL,
        ttfb_count      INTEGER NOT NULL,
        ttfb_ms         REAL NOT NULL,
        PRIMARY KEY (hour, user, project, model, served_model, upstream, key_label, token_id)
    ) WITHOUT ROWID;
    CREATE TABLE usage_daily_models (
        day             INTEGER NOT NULL,
        model           TEXT NOT NULL,
        served_model    TEXT NOT NULL,
        requests        INTEGER NOT NULL,
        errors          INTEGER NOT NULL,
        input           INTEGER NOT NULL,
        output          INTEGER NOT NULL,
        cache_write_5m  INTEGER NOT NULL,
        cache_write_1h  INTEGER NOT NULL,
        cache_read      INTEGER NOT NULL,
        reasoning       INTEGER NOT NULL,
        cost_micros     INTEGER NOT NULL,
        unpriced        INTEGER NOT NULL,
        estimated       INTEGER NOT NULL,
        ttfb_count      INTEGER NOT NULL,
        ttfb_ms         REAL NOT NULL,
        PRIMARY KEY (day, model, served_model)
    ) WITHOUT ROWID;
    CREATE TABLE usage_daily_keys (
        day             INTEGER NOT NULL,
        upstream        TEXT NOT NULL,
        key_label       TEXT NOT NULL,
        requests        INTEGER NOT NULL,
        errors          INTEGER NOT NULL,
        input           INTEGER NOT NULL,
        output          INTEGER NOT NULL,
        cache_write_5m  INTEGER NOT NULL,
        cache_write_1h  INTEGER NOT NULL,
        cache_read      INTEGER NOT NULL,
        reasoning       INTEGER NOT NULL,
        cost_micros     INTEGER NOT NULL,
        unpriced        INTEGER NOT NULL,
        estimated       INTEGER NOT NULL,
        ttfb_count      INTEGER NOT NULL,
        ttfb_ms         REAL NOT NULL,
        PRIMARY KEY (day, upstream, key_label)
    ) WITHOUT ROWID;
    CREATE TABLE usage_daily_principals (
        day             INTEGER NOT NULL,
        user            TEXT NOT NULL,
        project         TEXT NOT NULL,
        token_id        INTEGER NOT NULL,
        requests        INTEGER NOT NULL,
        errors          INTEGER NOT NULL,
        input           INTEGER NOT NULL,
        output          INTEGER NOT NULL,
        cache_write_5m  INTEGER NOT NULL,
        cache_write_1h  INTEGER NOT NULL,
        cache_read      INTEGER NOT NULL,
        reasoning       INTEGER NOT NULL,
        cost_micros     INTEGER NOT NULL,
        unpriced        INTEGER NOT NULL,
        estimated       INTEGER NOT NULL,
        ttfb_count      INTEGER NOT NULL,
        ttfb_ms         REAL NOT NULL,
        PRIMARY KEY (day, user, project, token_id)
    ) WITHOUT ROWID;
    CREATE TABLE usage_ttfb_hourly (
        hour      INTEGER NOT NULL,
        bin       INTEGER NOT NULL,
        requests  INTEGER NOT NULL,
        PRIMARY KEY (hour, bin)
    ) WITHOUT ROWID;
    CREATE TRIGGER usage_rollup AFTER INSERT ON usage BEGIN
        INSERT INTO usage_hourly VALUES (
            CAST(NEW.ts AS INTEGER) - (CAST(NEW.ts AS INTEGER) + COALESCE((
                SELECT utc_offset FROM usage_rollup_zone WHERE start <= NEW.ts ORDER BY start DESC LIMIT 1
            ), 0)) % 3600,
            COALESCE(NEW.user, ''), COALESCE(NEW.project, ''), COALESCE(NEW.model, ''),
            COALESCE(NEW.served_model, ''), COALESCE(NEW.upstream, ''), COALESCE(NEW.key_label, ''),
            COALESCE(NEW.token_id, 0),
            1, NEW.outcome != 'ok', NEW.input_tokens, NEW.output_tokens, NEW.cache_write_5m,
            NEW.cache_write_1h, NEW.cache_read, NEW.reasoning_tokens, COALESCE(NEW.cost_micros, 0),
            NEW.cost_basis IS NOT NULL OR (NEW.cost_micros IS NULL AND NEW.model IS NOT NULL),
            COALESCE(NEW.cost_basis = 'estimate', 0), NEW.ttfb_ms IS NOT NULL, COALESCE(NEW.ttfb_ms, 0)
        )
        ON CONFLICT (hour, user, project, model, served_model, upstream, key_label, token_id) DO UPDATE SET
            requests = requests + 1, errors = errors + excluded.errors, input = input + excluded.input,
            output = output + excluded.output, cache_write_5m = cache_write_5m + excluded.cache_write_5m,
            cache_write_1h = cache_write_1h + excluded.cache_write_1h,
            cache_read = cache_read + excluded.cache_read, reasoning = reasoning + excluded.reasoning,
            cost_micros = cost_micros + excluded.cost_micros, unpriced = unpriced + excluded.unpriced,
            estimated = estimated + excluded.estimated, ttfb_count = ttfb_count + excluded.ttfb_count,
            ttfb_ms = ttfb_ms + excluded.ttfb_ms;
        INSERT INTO usage_daily_models VALUES (
            (CAST(NEW.ts AS INTEGER) + COALESCE((
                SELECT utc_offset FROM usage_rollup_zone WHERE start <= NEW.ts ORDER BY start DESC LIMIT 1
            ), 0)) / 86400,
            COALESCE(NEW.model, ''), COALESCE(NEW.served_model, ''),
            1, NEW.outcome != 'ok', NEW.input_tokens, NEW.output_tokens, NEW.cache_write_5m,
            NEW.cache_write_1h, NEW.cache_read, NEW.reasoning_tokens, COALESCE(NEW.cost_micros, 0),
            NEW.cost_basis IS NOT NULL OR (NEW.cost_micros IS NULL AND NEW.model IS NOT NULL),
            COALESCE(NEW.cost_basis = 'estimate', 0), NEW.ttfb_ms IS NOT NULL, COALESCE(NEW.ttfb_ms, 0)
        )
        ON CONFLICT (day, model, served_model) DO UPDATE SET
            requests = requests + 1, errors = errors + excluded.errors, input = input + excluded.input,
            output = output + excluded.output, cache_write_5m = cache_write_5m + excluded.cache_write_5m,
            cache_write_1h = cache_write_1h + excluded.cache_write_1h,
            cache_read = cache_read + excluded.cache_read, reasoning = reasoning + excluded.reasoning,
            cost_micros = cost_micros + excluded.cost_micros, unpriced = unpriced + excluded.unpriced,
            estimated = estimated + excluded.estimated, ttfb_count = ttfb_count + excluded.ttfb_count,
            ttfb_ms = ttfb_ms + excluded.ttfb_ms;
        INSERT INTO usage_daily_keys VALUES (
            (CAST(NEW.ts AS INTEGER) + COALESCE((
                SELECT utc_offset FROM usage_rollup_zone WHERE start <= NEW.ts ORDER BY start DESC LIMIT 1
            ), 0)) / 86400,
            COALESCE(NEW.upstream, ''), COALESCE(NEW.key_label, ''),
            1, NEW.outcome != 'ok', NEW.input_tokens, NEW.output_tokens, NEW.cache_write_5m,
            NEW.cache_write_1h, NEW.cache_read, NEW.reasoning_tokens, COALESCE(NEW.cost_micros, 0),
            NEW.cost_basis IS NOT NULL OR (NEW.cost_micros IS NULL AND NEW.model IS NOT NULL),
            COALESCE(NEW.cost_basis = 'estimate', 0), NEW.ttfb_ms IS NOT NULL, COALESCE(NEW.ttfb_ms, 0)
        )
        ON CONFLICT (day, upstream, key_label) DO UPDATE SET
            requests = requests + 1, errors = errors + excluded.errors, input = input + excluded.input,
            output = output + excluded.output, cache_write_5m = cache_write_5m + excluded.cache_write_5m,
            cache_write_1h = cache_write_1h + excluded.cache_write_1h,
            cache_read = cache_read + excluded.cache_read, reasoning = reasoning + excluded.reasoning,
            cost_micros = cost_micros + excluded.cost_micros, unpriced = unpriced + excluded.unpriced,
            estimated = estimated + excluded.estimated, ttfb_count = ttfb_count + excluded.ttfb_count,
            ttfb_ms = ttfb_ms + excluded.ttfb_ms;
        INSERT INTO usage_daily_principals VALUES (
            (CAST(NEW.ts AS INTEGER) + COALESCE((
                SELECT utc_offset FROM usage_rollup_zone WHERE start <= NEW.ts ORDER BY start DESC LIMIT 1
            ), 0)) / 86400,
            COALESCE(NEW.user, ''), COALESCE(NEW.project, ''), COALESCE(NEW.token_id, 0),
            1, NEW.outcome != 'ok', NEW.input_tokens, NEW.output_tokens, NEW.cache_write_5m,
            NEW.cache_write_1h, NEW.cache_read, NEW.reasoning_tokens, COALESCE(NEW.cost_micros, 0),
            NEW.cost_basis IS NOT NULL OR (NEW.cost_micros IS NULL AND NEW.model IS NOT NULL),
            COALESCE(NEW.cost_basis = 'estimate', 0), NEW.ttfb_ms IS NOT NULL, COALESCE(NEW.ttfb_ms, 0)
        )
        ON CONFLICT (day, user, project, token_id) DO UPDATE SET
            requests = requests + 1, errors = errors + excluded.errors, input = input + excluded.input,
            output = output + excluded.output, cache_write_5m = cache_write_5m + excluded.cache_write_5m,
            cache_write_1h = cache_write_1h + excluded.cache_write_1h,
            cache_read = cache_read + excluded.cache_read, reasoning = reasoning + excluded.reasoning,
            cost_micros = cost_micros + excluded.cost_micros, unpriced = unpriced + excluded.unpriced,
            estimated = estimated + excluded.estimated, ttfb_count = ttfb_count + excluded.ttfb_count,
            ttfb_ms = ttfb_ms + excluded.ttfb_ms;
        INSERT INTO usage_ttfb_hourly (hour, bin, requests)
        SELECT CAST(NEW.ts AS INTEGER) - (CAST(NEW.ts AS INTEGER) + COALESCE((
                   SELECT utc_offset FROM usage_rollup_zone WHERE start <= NEW.ts ORDER BY start DESC LIMIT 1
               ), 0)) % 3600,
               COALESCE((SELECT bin FROM usage_ttfb_bins WHERE lower_ms <= NEW.ttfb_ms ORDER BY lower_ms DESC LIMIT 1), 0),
               1
        WHERE NEW.ttfb_ms IS NOT NULL
        ON CONFLICT (hour, bin) DO UPDATE SET requests = requests + 1;
    END;
    INSERT INTO usage_hourly
    SELECT CAST(ts AS INTEGER) - CAST(ts AS INTEGER) % 3600,
           COALESCE(user, ''), COALESCE(project, ''), COALESCE(model, ''),
           COALESCE(served_model, ''), COALESCE(upstream, ''), COALESCE(key_label, ''),
           COALESCE(token_id, 0),
           COUNT(*), SUM(outcome != 'ok'), SUM(input_tokens), SUM(output_tokens), SUM(cache_write_5m),
           SUM(cache_write_1h), SUM(cache_read), SUM(reasoning_tokens), COALESCE(SUM(cost_micros), 0),
           SUM(cost_basis IS NOT NULL OR (cost_micros IS NULL AND model IS NOT NULL)),
           COALESCE(SUM(cost_basis = 'estimate'), 0), COUNT(ttfb_ms), COALESCE(SUM(ttfb_ms), 0)
    FROM usage
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;
    INSERT INTO usage_daily_models
    SELECT CAST(ts AS INTEGER) / 86400,
           COALESCE(model, ''), COALESCE(served_model, ''),
           COUNT(*), SUM(outcome != 'ok'), SUM(input_tokens), SUM(output_tokens), SUM(cache_write_5m),
           SUM(cache_write_1h), SUM(cache_read), SUM(reasoning_tokens), COALESCE(SUM(cost_micros), 0),
           SUM(cost_basis IS NOT NULL OR (cost_micros IS NULL AND model IS NOT NULL)),
           COALESCE(SUM(cost_basis = 'estimate'), 0), COUNT(ttfb_ms), COALESCE(SUM(ttfb_ms), 0)
    FROM usage
    GROUP BY 1, 2, 3;
    INSERT INTO usage_daily_keys
    SELECT CAST(ts AS INTEGER) / 86400,
           COALESCE(upstream, ''), COALESCE(key_label, ''),
           COUNT(*), SUM(outcome != 'ok'), SUM(input_tokens), SUM(output_tokens), SUM(cache_write_5m),
           SUM(cache_write_1h), SUM(cache_read), SUM(reasoning_tokens), COALESCE(SUM(cost_micros), 0),
           SUM(cost_basis IS NOT NULL OR (cost_micros IS NULL AND model IS NOT NULL)),
           COALESCE(SUM(cost_basis = 'estimate'), 0), COUNT(ttfb_ms), COALESCE(SUM(ttfb_ms), 0)
    FROM usage
    GROUP BY 1, 2, 3;
    INSERT INTO usage_daily_principals
    SELECT CAST(ts AS INTEGER) / 86400,
           COALESCE(user, ''), COALESCE(project, ''), COALESCE(token_id, 0),
           COUNT(*), SUM(outcome != 'ok'), SUM(input_tokens), SUM(output_tokens), SUM(cache_write_5m),
           SUM(cache_write_1h), SUM(cache_read), SUM(reasoning_tokens), COALESCE(SUM(cost_micros), 0),
           SUM(cost_basis IS NOT NULL OR (cost_micros IS NULL AND model IS NOT NULL)),
           COALESCE(SUM(cost_basis = 'estimate'), 0), COUNT(ttfb_ms), COALESCE(SUM(ttfb_ms), 0)
    FROM usage
    GROUP BY 1, 2, 3, 4;
    INSERT INTO usage_ttfb_hourly (hour, bin, requests)
    SELECT CAST(ts AS INTEGER) - CAST(ts AS INTEGER) % 3600,
           COALESCE((SELECT bin FROM usage_ttfb_bins WHERE lower_ms <= ttfb_ms ORDER BY lower_ms DESC LIMIT 1), 0),
           COUNT(*)
    FROM usage
    WHERE ttfb_ms IS NOT NULL
    GROUP BY 1, 2;
    """,
    # 11: a key switched on or off moves the tokens generation, so that
    # every instance on the database follows the operator's switch with the
    # tokens (App.refresh_tokens), not only the one that took the command.
    """
    CREATE TRIGGER key_switches_gen_insert AFTER INSERT ON key_switches BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    CREATE TRIGGER key_switches_gen_update AFTER UPDATE ON key_switches BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    CREATE TRIGGER key_switches_gen_delete AFTER DELETE ON key_switches BEGIN
        UPDATE generation SET value = value + 1 WHERE name = 'tokens';
    END;
    """,
    # 12: the usage rollups are kept per batch, no longer per row: the usage
    # writer sums a batch's rows with INSERT ... SELECT ... GROUP BY ... ON
    # CONFLICT DO UPDATE and adds them to the rollups in the transaction
    # that inserts the batch (accounting.rollup.add). The trigger's five
    # upserts a row, each with its own zone lookup, cost the writer's thread
    # some 77,000 instructions a row (134,000 with them, 57,000 without;
    # python -m bench.hotpath --instructions), on the cores that serve the
    # requests; the sums per batch cost 32,000. What the trigger summed
    # stays; new batches add to it. PostgreSQL keeps its trigger
    # (pgstore.py): it runs in the database server, not in the hub.
    """
    DROP TRIGGER usage_rollup;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

# How long a connection waits for another writer's lock before it gives up
# with "database is locked"; the usage writer spools rather than wait longer.
BUSY_TIMEOUT_MS = 5000


class SchemaTooNew(RuntimeError):
    """The database was written by a newer hubcore than this one."""


class CannotOpen(sqlite3.OperationalError):
    """The database file cannot be opened or set up; the message names the
    file and, when it can tell, what about its directory is wrong."""


def connect(path: str | Path, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open the database, set the pragmas every hubcore connection uses, migrate.

    A PostgreSQL URL (a PgTarget from the config) opens a pgstore.PgConnection
    instead, which offers the part of sqlite3.Connection that hubcore uses."""
    if is_postgres(path):
        from hubcore import pgstore

        return cast(sqlite3.Connection, pgstore.connect(cast(str, path)))
    try:
        conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=check_same_thread
        )
    except sqlite3.Error as e:
        raise _cannot_open(path, e) from e
    try:
        # WAL mode creates the -wal and -shm files beside the database: a
        # read-only directory fails here rather than in sqlite3.connect().
        configure(conn)
    except sqlite3.Error as e:
        conn.close()
        raise _cannot_open(path, e) from e
    migrate(conn)
    return conn


def _cannot_open(path: str | Path, error: sqlite3.Error) -> CannotOpen:
    # SQLite says only "unable to open database file"; the path says why.
    return CannotOpen(f"cannot open the database {path}: {path_problem(path) or error}")


def directory_problem(path: str | Path) -> str | None:
    """Why no file can be created beside `path` (missing, not a directory,
    not writable by this process), or None when its directory is usable."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(directory):
        return f"directory {directory} does not exist"
    if not os.path.isdir(directory):
        return f"{directory} is not a directory"
    # Effective ids: what the kernel checks when the file is created. A
    # read-only mount fails this even for root.
    if not os.access(directory, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return f"directory {directory} is not writable"
    return None


def path_problem(path: str | Path) -> str | None:
    """Why the database (or spool) `path` cannot be opened for writing by
    this process, or None when it looks usable. Beyond directory_problem:
    an existing file this user may not write, and a directory that refuses
    new files although its mode allows them (sysfs, procfs)."""
    problem = directory_problem(path)
    if problem is not None:
        return problem
    if os.path.lexists(path):
        if os.path.isdir(path):
            return f"{path} is a directory"
        if not os.access(path, os.R_OK | os.W_OK, effective_ids=os.access in os.supports_effective_ids):
            # The usual case: an operator's own user on the service's
            # database (SQLite needs write access even to read a WAL database).
            return f"{path} is not readable and writable by this user; run the command as the hub's user"
        return None
    # A probe file, not `path` itself: a hub may create the database meanwhile.
    probe = f"{os.path.abspath(path)}.probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        return f"cannot create files in directory {os.path.dirname(probe)}: {e.strerror}"
    os.close(fd)
    os.unlink(probe)
    return None


def database_problem(path: str | Path) -> str | None:
    """Why `path` would not serve as the hub's database (path_problem, a
    file that is not SQLite, a schema newer than this hubcore), read without
    creating, changing or migrating anything; None when it would."""
    problem = path_problem(path)
    if problem is not None or not os.path.exists(path):
        return problem
    try:
        conn = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True)
        try:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as e:
        return str(e)
    if found > SCHEMA_VERSION:
        return f"schema version {found} is newer than this hubcore's {SCHEMA_VERSION}; upgrade hubcore"
    return None


# What every hubcore connection to SQLite sets, in order (the usage
# writer's compiled connection, accounting/_sqlite_batch.pyx, too).
PRAGMAS: tuple[tuple[str, str], ...] = (
    ("busy_timeout", str(BUSY_TIMEOUT_MS)),
    ("journal_mode", "WAL"),
    # NORMAL is durable against process crashes in WAL mode; only a power cut
    # can lose the last transactions, which the spool cannot help with either.
    ("synchronous", "NORMAL"),
    ("foreign_keys", "ON"),
)


def configure(conn: sqlite3.Connection, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
    for name, value in PRAGMAS:
        if name == "busy_timeout":
            value = str(int(busy_timeout_ms))
        conn.execute(f"PRAGMA {name} = {value}")


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes the database's write lock at once
    (BEGIN IMMEDIATE: a read inside it never has to be upgraded, which can
    fail under another writer), committed at the end of the block, rolled
    back if it raises. For connections made by connect() (autocommit)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION; return the version found before."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"database schema version {found} is newer than this hubcore's "
            f"{SCHEMA_VERSION}; upgrade hubcore"
        )
    for version in range(found, SCHEMA_VERSION):
        # BEGIN IMMEDIATE so two processes starting at once do not both migrate.
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current == version:
                for statement in _split(MIGRATIONS[version]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return int(found)


def _split(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                statements.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()[:80]}")
    return statements
