"""Uploaded files and batches, kept under the batch directory so they outlive the server.

::

    DIR/files/ID.json      a FileObject, and who owns it
    DIR/files/ID.jsonl     its bytes
    DIR/batches/ID.json    a BatchObject, who owns it, and its result files

Metadata files are replaced whole (written beside, then renamed), so a crash leaves the
old version or the new one, never half of one. Result files are appended to by the job
(``server.batch.results``). An object belongs to the account of the key that made it
(``None`` for keys without one and for an open server): another account cannot see it.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, Field

from server.batch.objects import BatchObject, FileObject
from server.errors import ServingError

# What IDs look like; anything else is not looked up on disk (no path tricks).
_FILE_ID = re.compile(r"file-[0-9a-f]{32}")
_BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")


# The purpose of a batch's result files (its output and its errors), as OpenAI names it.
RESULT_PURPOSE = "batch_output"


class NotFoundError(ServingError):
    status_code = 404
    error_type = "not_found_error"


class StoredFile(BaseModel):
    file: FileObject
    owner: str | None
    created_ns: int = Field(default_factory=time.time_ns)


class StoredBatch(BaseModel):
    batch: BatchObject
    owner: str | None
    # When it was made, to the nanosecond: batches made within one second keep their order.
    created_ns: int = Field(default_factory=time.time_ns)
    # The account usage is logged against (the creating key's, as for its HTTP requests).
    account_id: str | None
    # Where results go, whether or not the batch names them yet (OpenAI names a result
    # file once the batch ends, and only if it holds lines).
    output_file: str
    error_file: str


_Stored = TypeVar("_Stored", StoredFile, StoredBatch)


class BatchStore:
    def __init__(self, root: Path):
        self.root = root
        self._files = root / "files"
        self._batches = root / "batches"
        self._files.mkdir(parents=True, exist_ok=True)
        self._batches.mkdir(parents=True, exist_ok=True)

    # ----- files -----------------------------------------------------------------------

    def add_file(self, data: bytes, filename: str, purpose: str, owner: str | None) -> FileObject:
        file = FileObject(
            id=f"file-{uuid.uuid4().hex}",
            bytes=len(data),
            created_at=int(time.time()),
            filename=filename,
            purpose=purpose,
        )
        _replace(self.content_path(file.id), data)
        _replace(self._files / f"{file.id}.json", StoredFile(file=file, owner=owner).model_dump_json().encode())
        return file

    def file(self, file_id: str, owner: str | None, *, param: str = "file_id") -> FileObject:
        """The file, refreshed with its size now (a result file grows while its batch runs);
        404 for an unknown ID or another account's, naming ``param``."""
        stored = self._read(self._files, _FILE_ID, file_id, StoredFile, owner, param)
        file = stored.file
        return file.model_copy(update={"bytes": self.content_path(file_id).stat().st_size})

    def files(self, owner: str | None) -> list[FileObject]:
        """The owner's files, newest first."""
        stored = [StoredFile.model_validate_json(path.read_bytes()) for path in self._files.glob("*.json")]
        mine = sorted((item for item in stored if item.owner == owner), key=lambda item: item.created_ns, reverse=True)
        return [self.file(item.file.id, owner) for item in mine]

    def content_path(self, file_id: str) -> Path:
        return self._files / f"{file_id}.jsonl"

    def content(self, file: FileObject) -> bytes:
        """The file's bytes. A batch's result file may be growing: only its whole lines,
        never the start of one being appended."""
        data = self.content_path(file.id).read_bytes()
        if file.purpose == RESULT_PURPOSE:
            data = data[: data.rfind(b"\n") + 1]
        return data

    # ----- batches ---------------------------------------------------------------------

    def save_batch(self, stored: StoredBatch) -> None:
        _replace(self._batches / f"{stored.batch.id}.json", stored.model_dump_json().encode())

    def batch(self, batch_id: str, owner: str | None) -> StoredBatch:
        return self._read(self._batches, _BATCH_ID, batch_id, StoredBatch, owner, "batch_id")

    def all_batches(self) -> list[StoredBatch]:
        """Every batch of every owner, oldest first."""
        found = [StoredBatch.model_validate_json(path.read_bytes()) for path in self._batches.glob("*.json")]
        return sorted(found, key=lambda stored: stored.created_ns)

    # ----- reading ---------------------------------------------------------------------

    def _read(
        self, folder: Path, pattern: re.Pattern[str], object_id: str, kind: type[_Stored], owner: str | None, param: str
    ) -> _Stored:
        what = "file" if kind is StoredFile else "batch"
        missing = NotFoundError(f"no {what} with ID '{object_id}'", param=param)
        if not pattern.fullmatch(object_id):
            raise missing
        try:
            stored = kind.model_validate_json((folder / f"{object_id}.json").read_bytes())
        except FileNotFoundError:
            raise missing from None
        if stored.owner != owner:
            raise missing
        return stored


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: beside it first, then renamed over it."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
