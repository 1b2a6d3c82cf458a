"""Results appended to JSONL files exactly once per input line, across crashes.

Each result is one line, written with one ``write`` to a file opened for appending and
handed to the kernel at once, so a result is either in the file whole or, if the process
was killed in the middle of that write, a torn last line without its newline. Opening the
files again cuts such a torn tail off and reads which lines are already answered; the job
then runs only the others. So a job re-run after ``kill -9`` ends with every input line
answered exactly once. An exclusive lock on each file keeps a second job from writing
into the same output at the same time (which would break that).

Output lines are OpenAI's batch output: ``{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}``. A line that ran has a ``response`` (its status may be
an error, as the HTTP route would have answered); a line that could not run at all
(``LineFault``) has ``response: null`` and ``error: {"code", "message", "line"}``, the line
number telling it apart on a re-run, as its ``custom_id`` may be missing or repeated.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.batch.endpoints import Outcome
from server.batch.lines import BatchLine, LineFault


class OutputBusyError(RuntimeError):
    """Another job holds the output file."""


def result_record(line: BatchLine, outcome: Outcome) -> dict[str, Any]:
    return {
        "id": _record_id(),
        "custom_id": line.custom_id,
        "response": {"status_code": outcome.status, "request_id": outcome.request_id, "body": outcome.body},
        "error": None,
    }


def fault_record(fault: LineFault) -> dict[str, Any]:
    return {
        "id": _record_id(),
        "custom_id": fault.custom_id,
        "response": None,
        "error": {"code": fault.code, "message": fault.message, "line": fault.number},
    }


def _record_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


@dataclass
class Answered:
    """What a set of output files already holds: the custom_ids that ran (with how many
    ran fine), and the line numbers answered with a fault."""

    ran: set[str] = field(default_factory=set)
    faults: set[int] = field(default_factory=set)
    ok: int = 0
    failed: int = 0

    def holds(self, line: BatchLine | LineFault) -> bool:
        if isinstance(line, BatchLine):
            return line.custom_id in self.ran
        return line.number in self.faults

    def count(self, record: dict[str, Any]) -> None:
        error = record.get("error")
        response = record.get("response")
        if isinstance(response, dict):
            self.ran.add(str(record.get("custom_id")))
            if response.get("status_code") == 200:
                self.ok += 1
            else:
                self.failed += 1
        elif isinstance(error, dict) and isinstance(error.get("line"), int):
            self.faults.add(error["line"])
            self.failed += 1


class ResultFile:
    """One JSONL output file, locked, its torn tail cut, appended to a line at a time."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise OutputBusyError(f"{path} is being written by another batch job") from None
        except BaseException:
            os.close(self._fd)
            raise

    def read(self, into: Answered) -> None:
        """Count the records already here into ``into``, after cutting off a torn last line
        (one a kill interrupted: it has no newline). A complete line that is not a record
        (written by something else) is left as it is and not counted."""
        end = 0  # where the last complete line ends
        with open(self._fd, "rb", closefd=False) as file:
            file.seek(0)
            for raw in file:  # a line at a time: an output may be far larger than memory
                if not raw.endswith(b"\n"):
                    break
                end += len(raw)
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    into.count(record)
        if end < os.fstat(self._fd).st_size:
            os.ftruncate(self._fd, end)

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        written = os.write(self._fd, data)
        while written < len(data):  # a regular file takes it whole; this is for completeness
            written += os.write(self._fd, data[written:])

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class ResultLog:
    """Where a job's results go: one file, or (the HTTP batch API) successes in one and
    everything else in another, as OpenAI's ``output_file_id`` and ``error_file_id``."""

    def __init__(self, output: Path, errors: Path | None = None):
        self.answered = Answered()
        self._output = ResultFile(output)
        self._errors: ResultFile | None = None
        try:
            self._output.read(self.answered)
            if errors is not None:
                self._errors = ResultFile(errors)
                self._errors.read(self.answered)
        except BaseException:
            self.close()
            raise

    def write(self, record: dict[str, Any]) -> None:
        response = record.get("response")
        ok = isinstance(response, dict) and response.get("status_code") == 200
        target = self._output if ok or self._errors is None else self._errors
        target.append(record)
        self.answered.count(record)

    def close(self) -> None:
        for file in (self._output, self._errors):
            if file is not None:
                file.sync()
                file.close()
