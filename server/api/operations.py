"""What operators read: ``GET /metrics`` (Prometheus) and ``GET /v4/usage`` (the ledger).

``/metrics`` needs an API key like every route but the probes, unless the operator opens
it (``--metrics-open``). ``/v4/usage`` shows an admin key every account's usage; any other
key sees only its own: its account's records, or, for a key without an account, the
records made with that key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field

from server.api.auth import Caller, current_caller
from server.api.errors import ERROR_DESCRIPTIONS, error_responses
from server.api.state import State
from server.errors import ServingError
from server.protocol.v4 import ErrorResponse
from server.telemetry import UsageFilter, UsageRecord
from server.telemetry.ledger import MAX_ROWS
from server.telemetry.metrics import CONTENT_TYPE

METRICS_PATH = "/metrics"

router = APIRouter()


class PermissionDeniedError(ServingError):
    status_code = 403
    error_type = "permission_denied"


_FORBIDDEN: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorResponse, "description": "The key may read only its own account's usage"}
}


@router.get(
    METRICS_PATH,
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"},
        401: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[401]},
    },
)
async def metrics(state: State) -> Response:
    """Every metric of this server, in Prometheus' text format (docs/operations.md lists them)."""
    return Response(state.telemetry.metrics.render(), media_type=CONTENT_TYPE)


class UsageRow(BaseModel):
    time: datetime.datetime = Field(description="When the request arrived (UTC)")
    request_id: str
    account_id: str | None
    key_name: str | None = Field(description="Where the key is configured (never the key itself)")
    model: str
    route: str
    source: str = Field(description="`http` for a request to the server, `batch` for a line of a batch job")
    prompt_tokens: int
    completion_tokens: int
    status: int = Field(description="The HTTP status; 499 when the client left before the answer was complete")
    duration_seconds: float


class UsageTotalsBody(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageResponse(BaseModel):
    totals: UsageTotalsBody = Field(description="Over every matching record")
    rows: list[UsageRow] = Field(description="The newest matching records, at most `limit`")


@router.get("/v4/usage", response_model=UsageResponse, responses={**error_responses(401, 422), **_FORBIDDEN})
async def usage(
    caller: Annotated[Caller, Depends(current_caller)],
    state: State,
    account_id: str | None = None,
    model: str | None = None,
    since: Annotated[
        datetime.datetime | None, Query(description="ISO 8601 or seconds since the epoch; inclusive")
    ] = None,
    until: Annotated[
        datetime.datetime | None, Query(description="ISO 8601 or seconds since the epoch; exclusive")
    ] = None,
    limit: Annotated[int, Query(ge=0, le=MAX_ROWS)] = 1000,
) -> UsageResponse:
    """Token usage recorded in the ledger, totals and rows."""
    ledger = state.telemetry.ledger
    if ledger is None:
        raise ServingError("this server keeps no usage ledger")
    wanted = UsageFilter(account=account_id, model=model, since=_epoch(since), until=_epoch(until), limit=limit)
    if not caller.admin:
        wanted = _own(caller, wanted)
    report = await asyncio.to_thread(ledger.query, wanted)
    totals = report.totals
    return UsageResponse(
        totals=UsageTotalsBody(
            requests=totals.requests,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            total_tokens=totals.prompt_tokens + totals.completion_tokens,
        ),
        rows=[_row(record) for record in report.rows],
    )


def _own(caller: Caller, wanted: UsageFilter) -> UsageFilter:
    """``wanted`` narrowed to what a non-admin ``caller`` may see."""
    if caller.account is None:
        return dataclasses.replace(wanted, key_name=caller.key_name)
    if wanted.account is not None and wanted.account != caller.account:
        raise PermissionDeniedError(
            "this key may read only its own account's usage; ask an admin key for others", param="account_id"
        )
    return dataclasses.replace(wanted, account=caller.account)


def _epoch(moment: datetime.datetime | None) -> float | None:
    """Seconds since the epoch, UTC unless ``moment`` names its zone; to the microsecond, as
    records are kept, so a time read from a row selects that row."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return round(moment.timestamp(), 6)


def _row(record: UsageRecord) -> UsageRow:
    return UsageRow(
        time=datetime.datetime.fromtimestamp(record.time, datetime.timezone.utc),
        request_id=record.request_id,
        account_id=record.account,
        key_name=record.key_name,
        model=record.model,
        route=record.route,
        source=record.source,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        status=record.status,
        duration_seconds=record.duration,
    )
