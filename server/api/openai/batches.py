"""``/v1/batches``: OpenAI's Batch API over the server's own engines (``server.batch.manager``).

A batch runs its input file's lines (uploaded with ``POST /v1/files``) behind interactive
requests, writes successes to its output file and failures to its error file, and
survives a restart of the server. A batch belongs to the account of the key that made
it, and its requests' usage is that key's (as its HTTP requests' would be).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from server.api.auth import Caller, current_caller
from server.api.errors import error_responses
from server.api.openai.files import Batches
from server.api.openai.routes import OpenAIRoute
from server.batch.objects import BatchList, BatchObject, CreateBatch
from server.protocol.v4 import ErrorResponse

router = APIRouter(route_class=OpenAIRoute)

_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "The batch has ended; only a running batch can be cancelled"}
}


@router.post("/v1/batches", response_model=BatchObject, responses=error_responses(400, 401, 404, 503))
async def create_batch(
    body: CreateBatch, caller: Annotated[Caller, Depends(current_caller)], batches: Batches
) -> BatchObject:
    """Run the lines of ``input_file_id``, each a request to ``endpoint``."""
    return batches.create(body, caller.account, caller.usage_account(None))


@router.get("/v1/batches", response_model=BatchList, responses=error_responses(401, 503))
async def list_batches(
    caller: Annotated[Caller, Depends(current_caller)],
    batches: Batches,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> BatchList:
    """The caller's batches, newest first; ``after`` a batch ID for the next page."""
    found = batches.batches(caller.account)
    if after is not None:
        ids = [batch.id for batch in found]
        found = found[ids.index(after) + 1 :] if after in ids else []
    page = found[:limit]
    return BatchList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(found) > limit,
    )


@router.get("/v1/batches/{batch_id}", response_model=BatchObject, responses=error_responses(401, 404, 503))
async def retrieve_batch(
    batch_id: str, caller: Annotated[Caller, Depends(current_caller)], batches: Batches
) -> BatchObject:
    return batches.get(batch_id, caller.account)


@router.post(
    "/v1/batches/{batch_id}/cancel",
    response_model=BatchObject,
    responses={**error_responses(401, 404, 503), **_CONFLICT},
)
async def cancel_batch(
    batch_id: str, caller: Annotated[Caller, Depends(current_caller)], batches: Batches
) -> BatchObject:
    """Stop a running batch: lines in flight are aborted; what has finished stays in its files."""
    return await batches.cancel(batch_id, caller.account)
