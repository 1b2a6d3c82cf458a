"""One batch line answered as its HTTP route answers it, without HTTP.

The body is validated with the route's own protocol model and refused with the route's
own status and error body (``server.service.error_bodies``); a valid one goes through the
route's service call, and its response is the route's JSON. Only streaming differs: a
batch line has nobody to stream to, so ``stream: true`` is refused (400).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from server.errors import InvalidRequestError, ServingError
from server.protocol import openai as oa
from server.protocol import v4
from server.service import CompletionService, PendingCompletion, PendingGeneration
from server.service import openai as service_openai
from server.service.chat import ChatCompletions, PendingChat
from server.service.error_bodies import (
    FieldErrors,
    error_body,
    openai_validation_error,
    serving_error_body,
    v4_validation_error,
)
from server.telemetry.request_ids import RequestId, bind, current_request_id, new_request_id, unbind

logger = logging.getLogger(__name__)

NO_STREAM = "stream is not available in a batch: each line's answer is one JSON body; leave stream unset"


@dataclass(frozen=True, slots=True)
class Outcome:
    """A line's answer: what its HTTP route would have answered, and its token counts."""

    status: int
    body: dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # The line's own request ID (``Endpoints.call`` sets it), as an HTTP request's ``x-request-id``.
    request_id: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


class Busy(Exception):
    """The line's model cannot take it now (429 or 503): ``outcome`` says so, should the
    runner give up waiting."""

    def __init__(self, outcome: Outcome, retry_after: float | None):
        super().__init__(outcome.status)
        self.outcome, self.retry_after = outcome, retry_after


class _Refused(Exception):
    """A body its route's protocol model refuses, with the route's status and error body."""

    def __init__(self, status: int, body: dict[str, Any]):
        self.status, self.body = status, body


def _validate(
    model: type[Any], body: dict[str, Any], refuse: Callable[[FieldErrors], tuple[int, dict[str, Any]]]
) -> Any:
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        raise _Refused(*refuse(exc.errors())) from None
    if parsed.stream:
        raise InvalidRequestError(NO_STREAM, param="stream")
    return parsed


class Endpoints:
    """The batch side of the routes ``server.batch.lines.ENDPOINTS`` names."""

    def __init__(self, service: CompletionService, chat: ChatCompletions):
        self._service = service
        self._chat = chat
        self._routes: dict[str, Callable[[dict[str, Any], str | None], Awaitable[Outcome]]] = {
            "/v1/completions": self._v1_completion,
            "/v1/chat/completions": self._v1_chat,
            "/v4/completions": self._v4_completion,
            "/v4/chat-completions": self._v4_chat,
        }

    async def call(self, url: str, body: dict[str, Any], account_id: str | None = None) -> Outcome:
        """``body`` answered as ``POST url`` answers it; never raises for a bad request.

        ``account_id`` is the account usage goes to when the batch's owner is bound to one
        (it wins over the body's, as ``server.api.auth.Caller.usage_account`` decides).
        Overload (429) and unavailability (503) raise ``Busy``: the runner waits and
        retries those instead of writing a line that only says "later".
        """
        # Each line is a request of its own: its ID is on its log lines, its error body,
        # its engine request and the output line's ``request_id``, as an HTTP request's.
        # A metered line (``Telemetry.track``) has one already: its usage record's.
        request_id = current_request_id() or new_request_id()
        token = bind(RequestId(request_id, supplied=False))
        try:
            return dataclasses.replace(await self._routes[url](body, account_id), request_id=request_id)
        except _Refused as exc:
            return Outcome(exc.status, exc.body, request_id=request_id)
        except ServingError as exc:
            outcome = Outcome(exc.status_code, serving_error_body(exc), request_id=request_id)
            if exc.status_code in (429, 503):
                raise Busy(outcome, exc.retry_after) from exc
            return outcome
        except Exception:
            logger.exception("batch request to %s failed", url)
            return Outcome(500, error_body("internal server error", "internal_error", 500), request_id=request_id)
        finally:
            unbind(token)

    async def _v1_completion(self, body: dict[str, Any], account_id: str | None) -> Outcome:
        request: oa.TextCompletionRequest = _validate(oa.TextCompletionRequest, body, openai_validation_error)
        pending = await self._service.prepare_generation(service_openai.completion_generation(request), account_id)
        return await _generate(pending, lambda result: service_openai.completion_response(pending, result))

    async def _v1_chat(self, body: dict[str, Any], account_id: str | None) -> Outcome:
        request: oa.ChatCompletionRequest = _validate(oa.ChatCompletionRequest, body, openai_validation_error)
        pending = await self._service.prepare_generation(service_openai.chat_generation(request), account_id)
        return await _generate(pending, lambda result: service_openai.chat_response(pending, result, request))

    async def _v4_completion(self, body: dict[str, Any], account_id: str | None) -> Outcome:
        request: v4.CompletionRequest = _validate(v4.CompletionRequest, body, v4_validation_error)
        return await _v4_outcome(await self._service.prepare(request, account_id or request.account_id))

    async def _v4_chat(self, body: dict[str, Any], account_id: str | None) -> Outcome:
        request: v4.ChatCompletionRequest = _validate(v4.ChatCompletionRequest, body, v4_validation_error)
        return await _v4_outcome(await self._chat.prepare(request, account_id or request.account_id))


async def _v4_outcome(pending: PendingCompletion | PendingChat) -> Outcome:
    try:
        response = await pending.result()
    finally:
        pending.close()
    usage = response.token_usage
    prompt, completion = (usage.prompt, usage.completion) if usage is not None else (0, 0)
    return Outcome(200, response.model_dump(mode="json"), prompt, completion)


async def _generate(pending: PendingGeneration, shape: Callable[[Any], BaseModel]) -> Outcome:
    try:
        result = await pending.result()
    finally:
        pending.close()
    return Outcome(200, shape(result).model_dump(mode="json"), result.prompt_tokens, result.completion_tokens)
