"""The usage ledger: one durable record per generation request, however it ended.

SQLite under the server's home by default, or PostgreSQL when given a
``postgresql://`` URL, so several servers share one ledger. Writes never block the
event loop: records go to a writer thread through a queue, which commits whatever has
gathered in one transaction (a burst of requests costs one commit, not one each). Each
``write`` returns a future resolved once its record is committed: the HTTP layer holds a
response's last byte until then, so a request whose answer a client has in full is in
the ledger, even if the server is killed (``kill -9``) a moment later.

SQLite runs in WAL mode with ``synchronous=FULL``: a commit is on disk when it returns,
which survives the process being killed and the machine losing power too (``NORMAL``
would survive ``kill -9`` but could lose the last commits on a power cut; the batching
already amortises the fsync). Readers (``GET /v4/usage``, ``v4serve usage``) open their own
connections and never wait on the writer.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# Records one commit takes at most; more wait for the next.
MAX_BATCH = 500
# Rows a query returns at most (the totals cover every matching record).
MAX_ROWS = 10_000
SQLITE_FILE = "usage.sqlite3"
SQLITE_SCHEME = "sqlite://"
SOURCE_COLUMN = "source TEXT NOT NULL DEFAULT 'http'"


@dataclass(frozen=True, slots=True)
class UsageRecord:
    time: float  # seconds since the epoch, when the request arrived
    request_id: str
    account: str | None
    key_name: str | None  # where the key was configured, never the key
    model: str
    route: str
    prompt_tokens: int
    completion_tokens: int
    status: int  # the HTTP status; 499 when the client left before the answer
    duration: float  # seconds
    # What sent it: ``http`` (a request to the API) or ``batch`` (a line of a batch job,
    # ``v4serve batch`` or ``/v1/batches``, which never crosses the HTTP layer).
    source: str = "http"


COLUMNS = tuple(field.name for field in fields(UsageRecord))


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class UsageReport:
    totals: UsageTotals
    rows: list[UsageRecord]


@dataclass(frozen=True, slots=True)
class UsageFilter:
    account: str | None = None
    key_name: str | None = None
    model: str | None = None
    since: float | None = None  # inclusive, seconds since the epoch
    until: float | None = None  # exclusive
    source: str | None = None
    limit: int = 1000


class _Connection(Protocol):
    """The DB-API 2.0 connection both backends are written against."""

    def cursor(self) -> Any: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...


class _Dialect:
    """What differs between SQLite and PostgreSQL: placeholders and the table's DDL."""

    def __init__(self, placeholder: str, schema: Sequence[str], add_column: str):
        self.placeholder = placeholder
        self.schema = schema
        # How a column a table made by an earlier version lacks is added (on PostgreSQL,
        # harmlessly again when several servers sharing the ledger start at once).
        self.add_column = add_column


_SQLITE = _Dialect(
    "?",
    (
        "CREATE TABLE IF NOT EXISTS usage (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, "
        "request_id TEXT NOT NULL, account TEXT, key_name TEXT, model TEXT NOT NULL, route TEXT NOT NULL, "
        "prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, status INTEGER NOT NULL, "
        f"duration REAL NOT NULL, {SOURCE_COLUMN})",
        "CREATE INDEX IF NOT EXISTS usage_time ON usage (time)",
    ),
    "ALTER TABLE usage ADD COLUMN",
)
_POSTGRES = _Dialect(
    "%s",
    (
        "CREATE TABLE IF NOT EXISTS usage (id BIGSERIAL PRIMARY KEY, time DOUBLE PRECISION NOT NULL, "
        "request_id TEXT NOT NULL, account TEXT, key_name TEXT, model TEXT NOT NULL, route TEXT NOT NULL, "
        "prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, status INTEGER NOT NULL, "
        f"duration DOUBLE PRECISION NOT NULL, {SOURCE_COLUMN})",
        "CREATE INDEX IF NOT EXISTS usage_time ON usage (time)",
    ),
    "ALTER TABLE usage ADD COLUMN IF NOT EXISTS",
)


class Ledger:
    """A ledger at ``location``: a SQLite file path, or a ``postgresql://`` URL.

    ``writable=False`` opens it for queries only (``v4serve usage``): no writer thread.
    """

    def __init__(self, location: str | Path, *, writable: bool = True):
        self.location = str(location)
        self._postgres = self.location.startswith(("postgresql://", "postgres://"))
        self._dialect = _POSTGRES if self._postgres else _SQLITE
        if not self._postgres:
            Path(self.location).parent.mkdir(parents=True, exist_ok=True)
        # Connected (and the table made) here, so a bad location fails at start-up.
        connection = self._connect()
        self._create_schema(connection)
        self._queue: queue.Queue[tuple[UsageRecord, concurrent.futures.Future[None]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._write_loop, args=(connection,), name="usage-ledger", daemon=True)
        self._lock = threading.Lock()
        self._closed = not writable
        if writable:
            self._thread.start()
        else:
            connection.close()

    @staticmethod
    def location_for(home: Path, url: str | None) -> str:
        """Where the server's ledger is: ``url`` when given (``postgresql://...``, or
        ``sqlite:///PATH`` for a SQLite file elsewhere), else SQLite under ``home``."""
        if not url:
            return str(home / SQLITE_FILE)
        return url.removeprefix(SQLITE_SCHEME) if url.startswith(SQLITE_SCHEME) else url

    @classmethod
    def at(cls, home: Path, url: str | None) -> Ledger:
        return cls(cls.location_for(home, url))

    # ----- writing -------------------------------------------------------------------------

    def write(self, record: UsageRecord) -> concurrent.futures.Future[None]:
        """Queue ``record``; the future resolves once it is committed (or fails with why not)."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                done.set_exception(RuntimeError("the usage ledger is closed or read-only"))
                return done
            self._queue.put((record, done))
        return done

    def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _write_loop(self, connection: _Connection) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._commit(connection, batch)
                if stop:
                    return
        finally:
            connection.close()

    def _commit(
        self, connection: _Connection, batch: list[tuple[UsageRecord, concurrent.futures.Future[None]]]
    ) -> None:
        marks = ", ".join([self._dialect.placeholder] * len(COLUMNS))
        statement = f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES ({marks})"
        try:
            cursor = connection.cursor()
            cursor.executemany(statement, [astuple(record) for record, _ in batch])
            connection.commit()
        except Exception as exc:
            logger.exception("usage ledger: %d record(s) could not be written", len(batch))
            try:
                connection.rollback()
            except Exception:
                logger.exception("usage ledger: rollback failed")
            for _, done in batch:
                done.set_exception(exc)
            return
        for _, done in batch:
            done.set_result(None)

    # ----- reading -------------------------------------------------------------------------

    def query(self, wanted: UsageFilter) -> UsageReport:
        """Totals of every matching record, and the newest ``wanted.limit`` of them. Blocks:
        call it off the event loop."""
        where, params = self._where(wanted)
        connection = self._connect()
        try:
            cursor = connection.cursor()
            cursor.execute(
                "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) "
                f"FROM usage{where}",
                params,
            )
            count, prompt, completion = cursor.fetchone()
            limit = max(0, min(wanted.limit, MAX_ROWS))
            cursor.execute(
                f"SELECT {', '.join(COLUMNS)} FROM usage{where} ORDER BY time DESC, id DESC LIMIT {limit}", params
            )
            rows = [UsageRecord(*row) for row in cursor.fetchall()]
        finally:
            connection.close()
        return UsageReport(UsageTotals(int(count), int(prompt), int(completion)), rows)

    def _where(self, wanted: UsageFilter) -> tuple[str, list[Any]]:
        mark = self._dialect.placeholder
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("account", wanted.account),
            ("key_name", wanted.key_name),
            ("model", wanted.model),
            ("source", wanted.source),
        ):
            if value is not None:
                clauses.append(f"{column} = {mark}")
                params.append(value)
        if wanted.since is not None:
            clauses.append(f"time >= {mark}")
            params.append(wanted.since)
        if wanted.until is not None:
            clauses.append(f"time < {mark}")
            params.append(wanted.until)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    # ----- connections ---------------------------------------------------------------------

    def _connect(self) -> _Connection:
        if self._postgres:
            try:
                import psycopg
            except ImportError as exc:
                raise RuntimeError("a PostgreSQL usage ledger needs psycopg: pip install 'v4serve[postgres]'") from exc
            connection: _Connection = psycopg.connect(self.location)
            return connection
        # check_same_thread=False: the writer's connection is made here and used by its thread only.
        sqlite = sqlite3.connect(self.location, timeout=30.0, check_same_thread=False)
        sqlite.execute("PRAGMA journal_mode=WAL")
        sqlite.execute("PRAGMA synchronous=FULL")
        return sqlite

    def _create_schema(self, connection: _Connection) -> None:
        cursor = connection.cursor()
        for statement in self._dialect.schema:
            cursor.execute(statement)
        # A ledger made before records had a ``source`` holds only HTTP requests' records.
        cursor.execute("SELECT * FROM usage LIMIT 0")
        if "source" not in {column[0] for column in cursor.description}:
            cursor.execute(f"{self._dialect.add_column} {SOURCE_COLUMN}")
        connection.commit()
