"""The shared sweep store: which trials exist, who runs them, how they ended.

Two tables in any SQLAlchemy database (SQLite file by default; PostgreSQL etc. for many machines),
next to optuna's own tables when TPE or pruning needs a study. Every state change is one
compare-and-set UPDATE keyed on the row's `attempt` counter, so two workers can never both claim a
trial, on SQLite (writes are serialised) or PostgreSQL (the second UPDATE re-checks its WHERE
after the first commits), and a worker whose claim was taken over finds out at its next write.

A claim is a lease: its worker refreshes `heartbeat` every few seconds. It can be taken over when
the heartbeat is older than the sweep's `lease_s`, or at once when the owner ran on this host and
its pid is gone (a killed local worker). Hosts' clocks must agree to well within `lease_s`.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from research.config import ConfigError

STATES = ("pending", "running", "done", "failed", "pruned")
FINAL_STATES = ("done", "failed", "pruned")

_metadata = sa.MetaData()
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
    """Run `fn`, retrying the transient errors of concurrent schema creation and busy SQLite."""
    for attempt in range(tries):
        try:
            return fn()
        except (OperationalError, IntegrityError, ProgrammingError):
            if attempt == tries - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


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


def engine_for(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 60})

        @sa.event.listens_for(engine, "connect")
        def _wal(dbapi_connection: Any, _: Any) -> None:  # readers do not block the writer
            dbapi_connection.execute("PRAGMA journal_mode=WAL")

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


@dataclass(frozen=True)
class Claim:
    """A trial this worker holds; `attempt` is the token every later write must match."""

    number: int
    attempt: int
    trial: dict[str, Any] | None
    optuna_trial: int | None


class Store:
    """One sweep's rows in a (possibly shared) database."""

    def __init__(self, url: str, sweep: str, lease_s: float = 60.0):
        self.url, self.sweep, self.lease_s = url, sweep, lease_s
        self.engine = engine_for(url)
        self.owner = this_worker()
        retry(lambda: _metadata.create_all(self.engine))

    # ------------------------------------------------------------------ creation

    def create(self, fingerprint: str, spec: dict[str, Any], trials: list[dict[str, Any]]) -> bool:
        """Register the sweep and its planned trials once; True if this call created them.

        A store that already holds this sweep is attached to if it was made from the same settings,
        else refused (nothing is written).
        """
        now = time.time()
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
            pass
        with self.engine.connect() as conn:
            stored = conn.execute(sa.select(_sweeps.c.fingerprint)
                                  .where(_sweeps.c.name == self.sweep)).scalar_one()
        if stored != fingerprint:
            raise ConfigError(f"{self.url}: already holds a sweep named {self.sweep!r} made from "
                              "other settings (sweep file, base experiment or key=value overrides); "
                              "use the same ones, or a new --sweep-dir / name")
        return False

    def exists(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(_sweeps.c.name)
                                .where(_sweeps.c.name == self.sweep)).first() is not None

    # ------------------------------------------------------------------ reading

    def rows(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            result = conn.execute(sa.select(_trials).where(_trials.c.sweep == self.sweep)
                                  .order_by(_trials.c.number))
            return [dict(row._mapping) for row in result]

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

    def _swap(self, number: int, attempt: int, expect: str, /, **values: Any) -> bool:
        """Compare-and-set on (number, attempt, state): the only way rows change after creation."""
        where = [_trials.c.sweep == self.sweep, _trials.c.number == number,
                 _trials.c.attempt == attempt, _trials.c.state == expect]
        with self.engine.begin() as conn:
            done = conn.execute(_trials.update().where(*where).values(updated=time.time(), **values))
            return done.rowcount == 1

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
                if retry(lambda: self._swap(row["number"], row["attempt"], row["state"],
                                            state="running", attempt=attempt, owner=self.owner,
                                            heartbeat=now, error=None)):
                    return Claim(row["number"], attempt, row["trial"], row["optuna_trial"])
            if len(rows) >= budget:
                return None
            try:  # a new TPE trial: the unique (sweep, number) key lets exactly one worker add it
                with self.engine.begin() as conn:
                    conn.execute(_trials.insert().values(
                        sweep=self.sweep, number=len(rows), trial=None, state="running", attempt=1,
                        owner=self.owner, heartbeat=now, updated=now))
                return Claim(len(rows), 1, None, None)
            except IntegrityError:
                continue  # another worker added that number first: look again

    def heartbeat(self, claim: Claim) -> bool:
        """Refresh the lease; False means another worker has taken the trial over."""
        return retry(lambda: self._swap(claim.number, claim.attempt, "running",
                                        heartbeat=time.time()))

    def assign(self, claim: Claim, trial: dict[str, Any], optuna_trial: int | None) -> Claim:
        """Record what a claimed trial is (its TPE params, its optuna trial)."""
        if not retry(lambda: self._swap(claim.number, claim.attempt, "running", trial=trial,
                                        optuna_trial=optuna_trial)):
            raise LostClaim(claim.number)
        return Claim(claim.number, claim.attempt, trial, optuna_trial)

    def finish(self, claim: Claim, state: str, objective: float | None, error: str | None) -> bool:
        assert state in FINAL_STATES
        return retry(lambda: self._swap(claim.number, claim.attempt, "running", state=state,
                                        objective=objective, error=error, owner=None))

    def release(self, claim: Claim) -> bool:
        """Hand an interrupted trial back, to be resumed by the next worker at once."""
        return retry(lambda: self._swap(claim.number, claim.attempt, "running", state="pending",
                                        owner=None, heartbeat=None))


class LostClaim(RuntimeError):
    """Another worker took over a trial this worker held (its lease had expired)."""
