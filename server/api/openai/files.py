"""``/v1/files``: the inputs and results of batches (``server.batch``), as OpenAI's Files API.

Only ``purpose: batch`` can be uploaded (multipart, as OpenAI's SDK sends ``files.create``);
a batch's results are files of purpose ``batch_output``. A file belongs to the account of
the key that uploaded it (``server.batch.store``). An upload is a request body, so the
server's body limit (``--max-body-bytes``) bounds it: past it, 413.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Response, UploadFile

from server.api.auth import Caller, current_caller
from server.api.errors import error_responses
from server.api.openai.routes import OpenAIRoute
from server.api.state import State
from server.batch.manager import INPUT_PURPOSE, BatchManager
from server.batch.objects import FileList, FileObject
from server.errors import InvalidRequestError, UnavailableError

router = APIRouter(route_class=OpenAIRoute)


def batch_manager(state: State) -> BatchManager:
    """The application's batch jobs (``server.batch.manager``); 503 if it runs none."""
    if state.batches is None:
        raise UnavailableError("this server runs no batch jobs")
    return state.batches


Batches = Annotated[BatchManager, Depends(batch_manager)]


@router.post("/v1/files", response_model=FileObject, responses=error_responses(400, 401, 413, 503))
async def upload_file(
    file: Annotated[UploadFile, File(description="The JSONL file of batch requests")],
    purpose: Annotated[str, Form(description="What the file is for; this server takes `batch`")],
    caller: Annotated[Caller, Depends(current_caller)],
    batches: Batches,
) -> FileObject:
    if purpose != INPUT_PURPOSE:
        raise InvalidRequestError(
            f"purpose {purpose!r} is not served here; upload batch inputs with purpose '{INPUT_PURPOSE}'",
            param="purpose",
        )
    data = await file.read()
    if not data.strip():
        raise InvalidRequestError("the file is empty; a batch input holds one request a line", param="file")
    # Off the event loop: the file is written and synced before it is answered for.
    return await asyncio.to_thread(
        batches.store.add_file, data, file.filename or "upload.jsonl", purpose, caller.account
    )


@router.get("/v1/files", response_model=FileList, responses=error_responses(401, 503))
async def list_files(caller: Annotated[Caller, Depends(current_caller)], batches: Batches) -> FileList:
    files = batches.store.files(caller.account)
    return FileList(data=files, first_id=files[0].id if files else None, last_id=files[-1].id if files else None)


@router.get("/v1/files/{file_id}", response_model=FileObject, responses=error_responses(401, 404, 503))
async def retrieve_file(
    file_id: str, caller: Annotated[Caller, Depends(current_caller)], batches: Batches
) -> FileObject:
    return batches.store.file(file_id, caller.account)


@router.get(
    "/v1/files/{file_id}/content",
    response_class=Response,
    responses={200: {"content": {"application/jsonl": {}}}, **error_responses(401, 404, 503)},
)
async def file_content(file_id: str, caller: Annotated[Caller, Depends(current_caller)], batches: Batches) -> Response:
    """The file's bytes; a running batch's result file as far as its last whole line."""
    file = batches.store.file(file_id, caller.account)
    data = await asyncio.to_thread(batches.store.content, file)
    return Response(data, media_type="application/jsonl")
