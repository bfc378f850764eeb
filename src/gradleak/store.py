"""The results store: one SQLite file (stdlib `sqlite3`, WAL), one row per run, keyed by the run's spec.

A row is written in its own transaction as soon as its run finishes, so a sweep killed at any moment
(even with SIGKILL) loses at most the runs still in flight, and re-running it skips every run whose
row says `done` or `refused`. A run whose attack declined the scenario (a `gradleak.errors.Refusal`:
one of its assumptions fails) is a result, stored as `refused` with the refusal as its error, and not
run again; a run that failed any other way (a crash) is stored as `failed` with its error, and a
re-run tries it again.

Schema (version `SCHEMA`):

- `meta(key, value)`: `application = gradleak` marks the file as a gradleak store; `schema` is its
  version; `created` the time it was made.
- `runs`: `key` (sha256 of the canonical spec, the primary key), `kind` (`attack`, or `train` for a
  training run), `spec` (canonical JSON: sorted keys, tuples as lists), `status` (`done`, `refused`
  or `failed`), `record` (the full record JSON of a done run), `error` (one line: the refusal of a
  refused run, the error of a failed one), `started` / `finished` (Unix seconds), `version` (the
  gradleak version that ran it).

Schema 1 allowed only `done` and `failed`; a schema-1 store is migrated in place to schema 2 when it
is opened (the runs table is rebuilt with the wider status check, rows unchanged). Refusals stored by
schema-1 gradleak are `failed` rows and stay so (a re-run tries them again and stores them right).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
import typing
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields, is_dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from gradleak.errors import GradleakError

log = logging.getLogger(__name__)

SCHEMA = 2
APPLICATION = "gradleak"
STATUSES = ("done", "refused", "failed")
RESULTS = ("done", "refused")  # statuses a re-run skips: the run's outcome, not a crash

_RUNS = f"""
CREATE TABLE IF NOT EXISTS {{table}} (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN {STATUSES!r}),
    record TEXT,
    error TEXT,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    version TEXT NOT NULL
);
"""
_CREATE = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
{_RUNS.format(table="runs")}
CREATE INDEX IF NOT EXISTS runs_kind ON runs (kind);
"""


@cache
def _float_fields(cls: type) -> frozenset[str]:
    hints = typing.get_type_hints(cls)
    return frozenset(k for k, h in hints.items() if h is float or h == float | None)


def canonical(spec: Any) -> str:
    """The canonical JSON of a spec (a dataclass or a dict): sorted keys, no spaces, tuples as lists,
    and a float field's value always a float (`time_budget=5` and `5.0` are one spec)."""
    if is_dataclass(spec) and not isinstance(spec, type):
        payload = asdict(spec)
        for f in fields(spec):  # fields added later stay out of the key while at their default
            if f.metadata.get("keyed_when_set") and payload.get(f.name) == f.default:
                del payload[f.name]
            elif f.metadata.get("keyed_if") and not getattr(spec, f.metadata["keyed_if"])():
                del payload[f.name]  # set, but read by no part of this run
        for k in _float_fields(type(spec)):
            if isinstance(payload.get(k), int) and not isinstance(payload[k], bool):
                payload[k] = float(payload[k])
    else:
        payload = dict(spec)
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def run_key(kind: str, spec: Any) -> str:
    """The store key of a run: sha256 of its kind and canonical spec."""
    return hashlib.sha256(f"{kind}\n{canonical(spec)}".encode()).hexdigest()


def gradleak_version() -> str:
    try:
        return metadata.version("gradleak")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


@dataclass(frozen=True)
class StoredRun:
    """One row of the store: a finished run, done (with its record), refused (the attack declined the
    scenario; the refusal is its error) or failed (with its error)."""

    key: str
    kind: str
    spec: dict[str, Any]
    status: str
    record: dict[str, Any] | None
    error: str | None
    started: float
    finished: float
    version: str

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def refused(self) -> bool:
        return self.status == "refused"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def seconds(self) -> float:
        return self.finished - self.started


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)  # explicit transactions
    except sqlite3.DatabaseError as exc:
        raise GradleakError(f"{path} is not a gradleak store ({exc})") from None
    return conn


class Store:
    """A gradleak results store. Open with `Store.open(path, create=...)`; use as a context manager."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn

    @classmethod
    def open(cls, path: str | Path, create: bool = False) -> Store:
        """Open a store; with `create`, make it if the file is missing or empty. Any other SQLite file
        (or any other file) is refused with a one-line error."""
        path = Path(path)
        if path.is_dir():
            raise GradleakError(f"{path} is a directory, not a gradleak store")
        if not path.exists() and not create:
            raise GradleakError(f"no store at {path}")
        if not path.exists() and not path.parent.exists():
            raise GradleakError(f"cannot create a store at {path}: folder {path.parent} does not exist")
        conn = _connect(path)
        try:
            cls._check_or_init(path, conn, create)  # before any pragma: never touch a foreign file
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        except BaseException:
            conn.close()
            raise
        return cls(path, conn)

    @staticmethod
    def _check_or_init(path: Path, conn: sqlite3.Connection, create: bool) -> None:
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise GradleakError(f"{path} is not a gradleak store ({exc})") from None
        if not tables:
            if not create:
                raise GradleakError(f"{path} is not a gradleak store (it is empty)")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_CREATE)
            with _transaction(conn):
                conn.executemany(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    [("application", APPLICATION), ("schema", str(SCHEMA)), ("created", str(time.time()))],
                )
            log.info("created store %s", path)
            return
        meta: dict[str, str] = {}
        if "meta" in tables:
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            except sqlite3.DatabaseError:
                meta = {}
        if meta.get("application") != APPLICATION or "runs" not in tables:
            raise GradleakError(f"{path} is not a gradleak store (an SQLite file without gradleak's tables)")
        version = meta.get("schema", "")
        if not version.isdigit() or int(version) > SCHEMA:
            raise GradleakError(
                f"{path} is a gradleak store of schema {version!r}; this gradleak reads schema {SCHEMA}"
            )
        if int(version) < 2:
            _migrate_1_to_2(path, conn)

    # ------------------------------------------------------------------ writing

    def put(self, run: StoredRun) -> None:
        """Write one finished run in its own transaction (replacing an earlier row of the same key)."""
        if run.status not in STATUSES:
            raise GradleakError(f"unknown run status {run.status!r}")
        row = (
            run.key,
            run.kind,
            json.dumps(run.spec, sort_keys=True, separators=(",", ":")),
            run.status,
            None if run.record is None else json.dumps(run.record),
            run.error,
            run.started,
            run.finished,
            run.version,
        )
        with _transaction(self._conn):
            self._conn.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    # ------------------------------------------------------------------ reading

    def finished_keys(self) -> set[str]:
        """Keys of the runs stored as done or refused (a re-run skips them; failed runs run again)."""
        sql = f"SELECT key FROM runs WHERE status IN ({', '.join('?' * len(RESULTS))})"
        return {r[0] for r in self._conn.execute(sql, RESULTS)}

    def runs(self, kind: str | None = None, keys: Iterable[str] | None = None) -> list[StoredRun]:
        """Stored runs in the order they finished, optionally of one kind or among some keys."""
        sql = "SELECT * FROM runs" + (" WHERE kind = ?" if kind is not None else "") + " ORDER BY finished"
        rows = self._conn.execute(sql, () if kind is None else (kind,)).fetchall()
        wanted = None if keys is None else set(keys)
        return [_row(r) for r in rows if wanted is None or r[0] in wanted]

    def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _migrate_1_to_2(path: Path, conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2: the runs table's status check admits `refused`. SQLite cannot alter a check, so
    the table is rebuilt (rows copied unchanged) in one transaction. A store this process may not
    write stays at schema 1: it reads as before, and a refused run cannot be written to it."""
    try:
        with _transaction(conn):
            conn.execute("DROP TABLE IF EXISTS runs_v2")
            conn.execute(_RUNS.format(table="runs_v2"))
            conn.execute("INSERT INTO runs_v2 SELECT * FROM runs")
            conn.execute("DROP TABLE runs")
            conn.execute("ALTER TABLE runs_v2 RENAME TO runs")
            conn.execute("CREATE INDEX IF NOT EXISTS runs_kind ON runs (kind)")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA),))
    except sqlite3.OperationalError as exc:  # read-only file or folder
        log.warning("store %s stays at schema 1 (cannot migrate: %s)", path, exc)
        return
    log.info("migrated store %s to schema %d", path, SCHEMA)


def _row(r: tuple[Any, ...]) -> StoredRun:
    key, kind, spec, status, record, error, started, finished, version = r
    try:
        return StoredRun(
            key=key,
            kind=kind,
            spec=json.loads(spec),
            status=status,
            record=None if record is None else json.loads(record),
            error=error,
            started=started,
            finished=finished,
            version=version,
        )
    except json.JSONDecodeError as exc:
        raise GradleakError(f"a stored run ({key[:12]}) has malformed JSON: {exc}") from None


def iter_records(runs: Iterable[StoredRun], kind: str) -> Iterator[tuple[StoredRun, dict[str, Any]]]:
    """(run, record) of the done runs of one kind."""
    for run in runs:
        if run.kind == kind and run.done and run.record is not None:
            yield run, run.record
