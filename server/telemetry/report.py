"""``v4serve usage``: the ledger read directly, printed as ``GET /v4/usage`` reports it."""

from __future__ import annotations

import datetime
import json

from server.telemetry.ledger import UsageRecord, UsageReport

COLUMNS = (
    "TIME",
    "REQUEST ID",
    "ACCOUNT",
    "KEY",
    "MODEL",
    "ROUTE",
    "SOURCE",
    "PROMPT",
    "COMPLETION",
    "STATUS",
    "SECONDS",
)


def parse_moment(text: str) -> float:
    """Seconds since the epoch, or an ISO 8601 time (UTC unless it names its zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither seconds since the epoch nor an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _iso(seconds: float, timespec: str = "auto") -> str:
    """UTC as ``GET /v4/usage`` writes it (pydantic): ``...T12:00:00.123456Z``."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


def _cells(record: UsageRecord) -> tuple[str, ...]:
    return (
        _iso(record.time, "milliseconds"),
        record.request_id,
        record.account or "-",
        record.key_name or "-",
        record.model,
        record.route,
        record.source,
        str(record.prompt_tokens),
        str(record.completion_tokens),
        str(record.status),
        f"{record.duration:.3f}",
    )


def as_text(report: UsageReport) -> str:
    """The totals line, then a table of the rows, newest first."""
    totals = report.totals
    lines = [
        f"requests={totals.requests} prompt_tokens={totals.prompt_tokens} "
        f"completion_tokens={totals.completion_tokens} total_tokens={totals.prompt_tokens + totals.completion_tokens}"
    ]
    if report.rows:
        rows = [COLUMNS, *(_cells(record) for record in report.rows)]
        widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
        lines += [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
    return "\n".join(lines)


def as_json(report: UsageReport) -> str:
    """The body ``GET /v4/usage`` answers with."""
    totals = report.totals
    body = {
        "totals": {
            "requests": totals.requests,
            "prompt_tokens": totals.prompt_tokens,
            "completion_tokens": totals.completion_tokens,
            "total_tokens": totals.prompt_tokens + totals.completion_tokens,
        },
        "rows": [
            {
                "time": _iso(record.time),
                "request_id": record.request_id,
                "account_id": record.account,
                "key_name": record.key_name,
                "model": record.model,
                "route": record.route,
                "source": record.source,
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "status": record.status,
                "duration_seconds": record.duration,
            }
            for record in report.rows
        ],
    }
    return json.dumps(body, indent=2)
