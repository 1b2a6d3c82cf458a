"""The usage ledger on PostgreSQL: several servers share one ledger.

A throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl`` from this machine's PostgreSQL,
run as the ``postgres`` user when the tests run as root) on a free loopback port; skipped
where PostgreSQL or psycopg is not installed. Slow: it starts a database server.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.telemetry import Ledger, UsageFilter, UsageRecord
from server.testing import free_port
from tests.conftest import ACCOUNT
from tests.in_process import serve_in_process

pytestmark = pytest.mark.slow
pytest.importorskip("psycopg")


def _as_postgres() -> list[str]:
    """The command prefix that runs PostgreSQL's tools: they refuse to run as root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed")
    prefix = _as_postgres()
    data = Path(tempfile.mkdtemp(prefix="v4serve-pg-"))
    if prefix:
        user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
    port = free_port()
    run = lambda *args: subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=300)  # noqa: E731
    run(initdb, "-D", str(data / "db"), "-U", "v4serve", "--auth=trust")
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    run(pg_ctl, "-D", str(data / "db"), "-o", options, "-l", str(data / "log"), "-w", "start")
    try:
        yield f"postgresql://v4serve@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data / "db"), "-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)


def record(n: int, server: str) -> UsageRecord:
    return UsageRecord(float(n), f"{server}-{n}", "acct", "k", "m", "/v4/completions", 2, 3, 200, 0.5)


def test_two_servers_write_one_ledger(postgres_url: str) -> None:
    first, second = Ledger(postgres_url), Ledger(postgres_url)
    futures = [ledger.write(record(n, name)) for n in range(50) for name, ledger in (("a", first), ("b", second))]
    for future in futures:
        future.result(timeout=60)
    report = first.query(UsageFilter(limit=1000))
    ours = [row for row in report.rows if row.request_id[:2] in ("a-", "b-")]
    assert len(ours) == 100
    assert second.query(UsageFilter(since=10.0, until=20.0, model="m")).totals.requests >= 20
    first.close()
    second.close()


async def test_a_server_with_a_postgres_ledger_serves_usage(tmp_path: Path, postgres_url: str) -> None:
    async with serve_in_process(tmp_path, ledger_url=postgres_url) as server:
        async with server.client() as http:
            response = await http.post(
                "/v4/completions", json={"model": "tiny-llama", "prompt": "a b", "model_parameters": {"max_tokens": 4}}
            )
            request_id = response.headers["x-request-id"]
            rows = (await http.get("/v4/usage")).json()["rows"]
    (row,) = [row for row in rows if row["request_id"] == request_id]
    assert (row["account_id"], row["prompt_tokens"], row["completion_tokens"]) == (ACCOUNT, 3, 4)
