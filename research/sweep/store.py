"""The shared sweep store: which trials exist, who runs them, how they ended.

Three tables in any SQLAlchemy database (SQLite file by default; PostgreSQL etc. for many machines),
next to optuna's own tables when TPE or pruning needs a study. Every state change is one
compare-and-set UPDATE keyed on the row's `attempt` counter, so two workers can never both claim a
trial, on SQLite (writes are serialised) or PostgreSQL (the second UPDATE re-checks its WHERE
after the first commits), and a worker whose claim was taken over finds out at its next write.

A claim is a lease: its worker refreshes `heartbeat` every few seconds. It can be taken over when
the heartbeat is older than the sweep's `lease_s`, or at once when the owner ran on this host and
its pid is gone (a killed local worker). Hosts' clocks must agree to well within `lease_s`.

The tables are created on first use, at `SCHEMA_VERSION`; an older store is brought up to date by
`MIGRATIONS` when it is opened. A lost database (server restart, network blip) is waited out with
exponential backoff for up to `RETRY_S`; a write whose connection broke is checked before it is
retried, since its commit may have landed, so a claim or a result is never applied twice.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import (ArgumentError, DBAPIError, IntegrityError, InterfaceError,
                            NoSuchModuleError, OperationalError, ProgrammingError)

from research.config import ConfigError

FINAL_STATES = ("done", "failed", "pruned")

SCHEMA_VERSION = 1
# MIGRATIONS[v] brings a version-v store to v + 1, inside the schema lock. A version that changes
# the tables adds its step here, so that it reads every store written before it.
MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {}
RETRY_S = 300.0  # how long a worker waits out a lost database before giving up
CHECK_TIMEOUT_S = 5  # how long the first connection of a command may take (check_reachable)
_MAX_BACKOFF_S = 30.0
_SCHEMA_LOCK = 0x7377656570  # PostgreSQL advisory lock that serialises schema changes ("sweep")
# SQLSTATE classes worth waiting for: connection exception, transaction rollback (serialisation,
# deadlock), insufficient resources (too many connections), server shutting down or starting.
_TRANSIENT_SQLSTATES = ("08", "40", "53", "57P")

log = logging.getLogger(__name__)

_metadata = sa.MetaData()
_schema = sa.Table(
    "sweep_schema", _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # always 1: one row
    sa.Column("version", sa.Integer, nullable=False),
)
_sweeps = sa.Table(
    "sweep_sweeps", _metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)
_trials = sa.Table(
    "sweep_trials", _metadata,
    sa.Column("sweep", sa.String(200), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("trial", sa.JSON, nullable=True),  # spec.Trial.record(); TPE: null until asked
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),  # claims so far: the compare-and-set token
    sa.Column("owner", sa.String(300), nullable=True),  # host:pid of the claiming worker
    sa.Column("heartbeat", sa.Float, nullable=True),
    sa.Column("optuna_trial", sa.Integer, nullable=True),  # optuna trial id (TPE, pruning)
    sa.Column("objective", sa.Float, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("updated", sa.Float, nullable=False),
)

T = TypeVar("T")


def retry(fn: Callable[[], T], tries: int = 8) -> T:
    """Run `fn`, retrying the errors of workers creating the same tables at once."""
    for attempt in range(tries):
        try:
            return fn()
        except (OperationalError, IntegrityError, ProgrammingError):
            if attempt == tries - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def differences(stored: dict[str, Any], new: dict[str, Any]) -> str:
    """`train.steps: 7 here, 100 in the store; ...` for flat settings dicts (spec.Sweep.settings)."""
    keys = [k for k in sorted(stored.keys() | new.keys()) if stored.get(k) != new.get(k)]
    if not keys:
        return "sweep file, base experiment or key=value overrides"
    shown = "; ".join(f"{k}: {new.get(k)!r} here, {stored.get(k)!r} in the store" for k in keys[:5])
    return shown + (f"; and {len(keys) - 5} more" if len(keys) > 5 else "")


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str | None) -> bool:
    """False only when `owner` ran on this host and its pid is gone (a pid reused keeps the lease)."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def parse_url(url: str) -> sa.URL:
    """The storage URL, checked without connecting: a known database whose driver is installed."""
    example = "e.g. sqlite:///PATH/sweep.db or postgresql://USER@HOST[:PORT]/DB"
    try:
        parsed = sa.make_url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise ConfigError(f"storage {url!r}: not a database URL; use {example}") from None
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(f"storage {shown!r}: an in-memory SQLite database cannot be shared; "
                          f"use {example}")
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        hint = " (pip install 'research[postgres]')" if dialect.name == "postgresql" else ""
        raise ConfigError(f"storage {shown!r}: its driver {exc.name} is not installed"
                          f"{hint}") from None
    return parsed


def transient(exc: DBAPIError) -> bool:
    """Worth waiting for: a lost or refused connection, a server restarting, a busy SQLite file."""
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    if sqlite_error := getattr(exc.orig, "sqlite_errorname", None):
        return sqlite_error in ("SQLITE_BUSY", "SQLITE_LOCKED")
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return code is None or code.startswith(_TRANSIENT_SQLSTATES)  # None: no server answered


def _database_error(exc: BaseException | None) -> DBAPIError | None:
    """The database error behind `exc`: optuna re-raises them as its own, and when a lost
    connection makes optuna fall back to another query in the same session, SQLAlchemy raises a
    PendingRollbackError while handling the original error (its context, not its cause)."""
    while exc is not None and not isinstance(exc, DBAPIError):
        exc = exc.__cause__ or (exc.__context__ if isinstance(exc, sa.exc.SQLAlchemyError)
                                else None)
    return exc


def _reason(error: DBAPIError) -> str:
    """The driver's message in one line (e.g. "connection refused")."""
    return (str(error.orig).strip().splitlines() or [type(error.orig).__name__])[0]


def patiently(fn: Callable[[], T], label: str, retry_s: float = RETRY_S,
              landed: Callable[[], bool] | None = None) -> T:
    """Run `fn`, waiting out a lost database (`label` names it) with exponential backoff.

    A write whose connection broke may still have committed: when its retry reports no change
    (False), `landed` says whether that earlier try went through.
    """
    deadline, delay, broke = time.monotonic() + retry_s, 0.5, False
    while True:
        try:
            result = fn()
            return landed() if broke and landed is not None and result is False else result
        except Exception as exc:
            error = _database_error(exc)
            if error is None or not transient(error):
                raise
            reason = _reason(error)
            if time.monotonic() + delay > deadline:
                raise ConfigError(f"{label}: database unreachable for {retry_s:.0f}s ({reason})"
                                  ) from None
            broke = True
            log.warning("%s: %s; retrying in %.1fs", label, reason, delay)
            time.sleep(delay)
            delay = min(2 * delay, _MAX_BACKOFF_S)


def _server_connect_args(parsed: sa.URL, timeout_s: int) -> dict[str, Any]:
    """libpq's own limit on one connection attempt, so an unreachable host fails rather than
    hanging (other drivers: their default)."""
    return {"connect_timeout": timeout_s} if parsed.get_driver_name().startswith("psycopg") else {}


def engine_for(url: str) -> sa.Engine:
    """An engine for a checked URL; it connects only when first used."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed, connect_args={"timeout": 60})

        @sa.event.listens_for(engine, "connect")
        def _wal(dbapi_connection: Any, _: Any) -> None:  # readers do not block the writer
            dbapi_connection.execute("PRAGMA journal_mode=WAL")

        return engine
    # a failed connection is retried (patiently): a lost server may come back
    return sa.create_engine(parsed, pool_pre_ping=True,
                            connect_args=_server_connect_args(parsed, 10))


def check_reachable(url: str, timeout_s: int = CHECK_TIMEOUT_S) -> None:
    """Connect once to a database server (a SQLite file needs no check): one that does not
    answer when a sweep starts is a wrong URL or a server not started, not an outage to wait
    out, so it is a ConfigError within seconds, before anything is created. A connection lost
    later is still retried (see `patiently`)."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        return
    engine = sa.create_engine(parsed, poolclass=sa.pool.NullPool,
                              connect_args=_server_connect_args(parsed, timeout_s))
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        raise ConfigError(f"storage {parsed.render_as_string(hide_password=True)!r}: cannot "
                          f"connect ({_reason(exc)}); is the server running and the URL right?"
                          ) from None
    finally:
        engine.dispose()


@dataclass(frozen=True)
class Claim:
    """A trial this worker holds; `attempt` is the token every later write must match."""

    number: int
    attempt: int
    trial: dict[str, Any] | None
    optuna_trial: int | None


class Store:
    """One sweep's rows in a (possibly shared) database.

    Making one checks the URL and connects to nothing; the first read or write connects and brings
    the tables to `SCHEMA_VERSION` (only `create` makes them where there are none).
    """

    def __init__(self, url: str, sweep: str, lease_s: float = 60.0, retry_s: float = RETRY_S):
        self.url, self.sweep, self.lease_s, self.retry_s = url, sweep, lease_s, retry_s
        self.engine = engine_for(url)
        self.label = self.engine.url.render_as_string(hide_password=True)
        self.owner = this_worker()
        self._ready = False

    # ------------------------------------------------------------------ connection and schema

    def _patiently(self, fn: Callable[[], T], landed: Callable[[], bool] | None = None) -> T:
        return patiently(fn, self.label, self.retry_s, landed)

    def _prepare(self, create: bool) -> bool:
        """Bring the tables to SCHEMA_VERSION, making them only if `create`; False: none exist."""
        if self._ready:
            return True

        def upgrade() -> bool:
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":  # workers starting together: one at a time
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
                existed = sa.inspect(conn).has_table(_trials.name)
                if not (existed or create):
                    return False
                _metadata.create_all(conn)
                version = conn.execute(sa.select(_schema.c.version)).scalar()
                if version is None:  # a new store, or one from before versions were recorded (1)
                    version = 1 if existed else SCHEMA_VERSION
                    conn.execute(_schema.insert().values(id=1, version=version))
                if version > SCHEMA_VERSION:
                    raise ConfigError(f"{self.label}: the sweep store has schema version "
                                      f"{version}, this research reads up to {SCHEMA_VERSION}; "
                                      "upgrade research")
                for step in range(version, SCHEMA_VERSION):
                    MIGRATIONS[step](conn)
                if version != SCHEMA_VERSION:
                    conn.execute(_schema.update().values(version=SCHEMA_VERSION))
            return True

        self._ready = self._patiently(lambda: retry(upgrade))
        return self._ready

    # ------------------------------------------------------------------ creation

    def create(self, fingerprint: str, spec: dict[str, Any], trials: list[dict[str, Any]]) -> bool:
        """Register the sweep and its planned trials once; True if this call created them.

        A store that already holds this sweep is attached to if it was made from the same settings,
        else refused (nothing is written).
        """
        self._prepare(create=True)
        now = time.time()

        def insert() -> bool:
            try:
                with self.engine.begin() as conn:
                    conn.execute(_sweeps.insert().values(name=self.sweep, fingerprint=fingerprint,
                                                         spec=spec, created=now))
                    if trials:
                        conn.execute(_trials.insert(), [
                            dict(sweep=self.sweep, number=t["number"], trial=t, state="pending",
                                 attempt=0, updated=now) for t in trials])
                return True
            except IntegrityError:
                return False

        def stored() -> tuple[str, dict[str, Any]]:
            with self.engine.connect() as conn:
                return tuple(conn.execute(sa.select(_sweeps.c.fingerprint, _sweeps.c.spec)
                                          .where(_sweeps.c.name == self.sweep)).one())

        if self._patiently(insert):
            return True
        stored_fingerprint, stored_spec = self._patiently(stored)
        if stored_fingerprint != fingerprint:
            raise ConfigError(f"{self.label}: already holds a sweep named {self.sweep!r} made from "
                              f"other settings ({differences(stored_spec, spec)}); use the same "
                              "ones, or a new --sweep-dir / name")
        return False

    def exists(self) -> bool:
        """Whether the store holds this sweep; never creates anything."""
        if not self._prepare(create=False):
            return False

        def read() -> bool:
            with self.engine.connect() as conn:
                return conn.execute(sa.select(_sweeps.c.name)
                                    .where(_sweeps.c.name == self.sweep)).first() is not None

        return self._patiently(read)

    # ------------------------------------------------------------------ reading

    def rows(self) -> list[dict[str, Any]]:
        if not self._prepare(create=False):
            return []

        def read() -> list[dict[str, Any]]:
            with self.engine.connect() as conn:
                result = conn.execute(sa.select(_trials).where(_trials.c.sweep == self.sweep)
                                      .order_by(_trials.c.number))
                return [dict(row._mapping) for row in result]

        return self._patiently(read)

    def claimable(self, row: dict[str, Any], now: float) -> bool:
        if row["state"] == "pending":
            return True
        return row["state"] == "running" and (
            (row["heartbeat"] or 0) < now - self.lease_s or not owner_alive(row["owner"]))

    def settled(self, budget: int) -> bool:
        """All `budget` trials exist and have ended."""
        rows = self.rows()
        return len(rows) >= budget and all(r["state"] in FINAL_STATES for r in rows)

    # ------------------------------------------------------------------ claiming

    def _holds(self, number: int, values: dict[str, Any]) -> bool:
        """Whether trial `number`'s row has `values` (timestamps aside): our write has landed."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(_trials).where(_trials.c.sweep == self.sweep,
                                                        _trials.c.number == number)).first()
        return row is not None and all(row._mapping[key] == value for key, value in values.items()
                                       if key not in ("heartbeat", "updated"))

    def _swap(self, number: int, attempt: int, expect: str, /, **values: Any) -> bool:
        """Compare-and-set on (number, attempt, state): the only way rows change after creation.

        Only the holder of (number, attempt) writes with that attempt, so a row that reads back as
        this write's values after a broken connection was written by this call.
        """
        where = [_trials.c.sweep == self.sweep, _trials.c.number == number,
                 _trials.c.attempt == attempt, _trials.c.state == expect]

        def write() -> bool:
            with self.engine.begin() as conn:
                done = conn.execute(_trials.update().where(*where)
                                    .values(updated=time.time(), **values))
                return done.rowcount == 1

        return self._patiently(write, lambda: self._holds(number, {"attempt": attempt, **values}))

    def claim(self, budget: int) -> Claim | None:
        """Take the lowest pending or abandoned trial; TPE sweeps (no planned rows) add a row.

        Returns None when nothing is left to start (others may still be running).
        """
        while True:
            now = time.time()
            rows = self.rows()
            for row in rows:
                if not self.claimable(row, now):
                    continue
                attempt = row["attempt"] + 1
                if self._swap(row["number"], row["attempt"], row["state"], state="running",
                              attempt=attempt, owner=self.owner, heartbeat=now, error=None):
                    return Claim(row["number"], attempt, row["trial"], row["optuna_trial"])
            if len(rows) >= budget:
                return None
            # A new TPE trial: the unique (sweep, number) key lets exactly one worker add it.
            new = dict(sweep=self.sweep, number=len(rows), trial=None, state="running",
                       attempt=1, owner=self.owner, heartbeat=now, updated=now)

            def insert() -> bool:
                try:
                    with self.engine.begin() as conn:
                        conn.execute(_trials.insert().values(**new))
                    return True
                except IntegrityError:
                    return False  # another worker added that number first (or our lost commit)

            if self._patiently(insert, lambda: self._holds(new["number"], new)):
                return Claim(new["number"], 1, None, None)

    def heartbeat(self, claim: Claim) -> bool:
        """Refresh the lease; False means another worker has taken the trial over."""
        return self._swap(claim.number, claim.attempt, "running", heartbeat=time.time())

    def assign(self, claim: Claim, trial: dict[str, Any], optuna_trial: int | None) -> Claim:
        """Record what a claimed trial is (its TPE params, its optuna trial)."""
        if not self._swap(claim.number, claim.attempt, "running", trial=trial,
                          optuna_trial=optuna_trial):
            raise LostClaim(claim.number)
        return Claim(claim.number, claim.attempt, trial, optuna_trial)

    def finish(self, claim: Claim, state: str, objective: float | None, error: str | None) -> bool:
        """Record a trial's end; it is committed (or found taken over) before this returns."""
        assert state in FINAL_STATES
        return self._swap(claim.number, claim.attempt, "running", state=state,
                          objective=objective, error=error, owner=None)

    def release(self, claim: Claim) -> bool:
        """Hand an interrupted trial back, to be resumed by the next worker at once."""
        return self._swap(claim.number, claim.attempt, "running", state="pending", owner=None,
                          heartbeat=None)


class LostClaim(RuntimeError):
    """Another worker took over a trial this worker held (its lease had expired)."""
