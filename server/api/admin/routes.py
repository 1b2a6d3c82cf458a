"""The admin API: change what the server serves while it serves (admin keys only).

``/v4/admin/models/{id}`` reads, adds or replaces (PUT, the entry as JSON with the keys a
registry file takes) and removes an entry; ``.../load``, ``unload``, ``pin`` and ``unpin``
act on a model's engine; ``/v4/admin/registry/reload`` reads the registry files again
(as SIGHUP does). How each change reaches the engines without cutting a request short is
``EnginePool.replace_registry``'s to say; how it is validated and persisted,
``server.api.admin.control``'s.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Request, Response
from pydantic import BaseModel, Field

from server.api.admin.control import RegistryControl
from server.api.auth import Caller, current_caller
from server.api.errors import ERROR_DESCRIPTIONS
from server.api.operations import PermissionDeniedError
from server.api.routes import model_info
from server.api.state import State
from server.pool.live import RegistryChanges
from server.protocol.v4 import ErrorResponse, ModelInfo

# Where ``install_admin`` keeps the ``RegistryControl`` on ``app.state``.
CONTROL_ATTRIBUTE = "v4admin"
# The IDs the admin API takes: every ID of the shipped registry has this shape, and a
# path segment holds no slash.
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"


async def require_admin(caller: Annotated[Caller, Depends(current_caller)]) -> None:
    if not caller.admin:
        raise PermissionDeniedError(
            "the admin API needs an admin key: give one the admin role in V4SERVE_API_KEYS or the "
            "keys file ('key:account:admin', or 'key::admin' without an account)"
        )


async def registry_control(request: Request) -> RegistryControl:
    control = getattr(request.app.state, CONTROL_ATTRIBUTE, None)
    if not isinstance(control, RegistryControl):
        raise RuntimeError("this application has no admin API; see server.api.admin.install_admin")
    return control


Control = Annotated[RegistryControl, Depends(registry_control)]
ModelId = Annotated[str, Path(pattern=MODEL_ID_PATTERN, description="The model's registry ID (not an alias)")]

_ERRORS: dict[int, str] = {
    **ERROR_DESCRIPTIONS,
    403: "The key is not an admin key",
    404: "No registry entry of that ID",
    409: "The model's present state forbids it: it serves requests, is pinned, or an adapter or alias depends on it",
    422: "The entry is one a registry file could not hold; the message names the model and the key",
}


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _ERRORS[status]} for status in statuses}


router = APIRouter(prefix="/v4/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class RegistryChangesBody(BaseModel):
    added: list[str] = Field(description="model IDs new to the registry")
    removed: list[str] = Field(description="model IDs gone from it")
    changed: list[str] = Field(description="model IDs whose entry changed")
    restarted: list[str] = Field(
        description="models whose engine is replaced: the old one finishes the requests it holds, then the new "
        "one starts (at once, as the old one was loaded)"
    )
    live_adapters: list[str] = Field(description="LoRA adapters a running engine took without a restart")

    @classmethod
    def of(cls, changes: RegistryChanges) -> RegistryChangesBody:
        return cls(
            added=list(changes.added),
            removed=list(changes.removed),
            changed=list(changes.changed),
            restarted=list(changes.restarted),
            live_adapters=list(changes.live_adapters),
        )


class AdminModel(BaseModel):
    id: str
    origin: str = Field(description="the registry file the entry comes from; the operator file for API changes")
    entry: dict[str, Any] = Field(description="every key of the entry, defaults included")
    status: ModelInfo


class EntryChangeBody(AdminModel):
    created: bool
    warnings: list[str] = Field(description="what `v4serve check` warns about the entry")
    changes: RegistryChangesBody


def _model(state: State, control: RegistryControl, model_id: str) -> AdminModel:
    registered = control.entry(model_id)
    status = next(s for s in state.pool.status() if s.model_id == model_id)
    return AdminModel(
        id=model_id,
        origin=str(registered.origin),
        entry=registered.entry.model_dump(mode="json"),
        status=model_info(status),
    )


@router.get("/models/{model_id}", response_model=AdminModel, responses=_responses(401, 403, 404, 422))
async def get_model(model_id: ModelId, state: State, control: Control) -> AdminModel:
    return _model(state, control, model_id)


@router.put(
    "/models/{model_id}",
    response_model=EntryChangeBody,
    status_code=200,
    responses={201: {"model": EntryChangeBody, "description": "The entry was added"}, **_responses(400, 401, 403, 422)},
)
async def put_model(
    model_id: ModelId,
    entry: Annotated[dict[str, Any], Body(description="The entry, with the keys a registry file's entry takes")],
    state: State,
    control: Control,
    response: Response,
) -> EntryChangeBody:
    """Add or replace an entry. A new LoRA adapter on a loaded base is served at once by the
    base's engine; an entry whose engine keys changed gets a new engine once the old one
    has finished its requests."""
    change = await control.put(model_id, entry)
    response.status_code = 201 if change.created else 200
    model = _model(state, control, model_id)
    return EntryChangeBody(
        **model.model_dump(),
        created=change.created,
        warnings=list(change.warnings),
        changes=RegistryChangesBody.of(change.changes),
    )


@router.delete("/models/{model_id}", response_model=RegistryChangesBody, responses=_responses(401, 403, 404, 409, 422))
async def delete_model(model_id: ModelId, control: Control) -> RegistryChangesBody:
    """Remove an entry; its engine finishes the requests it holds, then shuts down."""
    return RegistryChangesBody.of(await control.delete(model_id))


@router.post("/models/{model_id}/load", response_model=AdminModel, responses=_responses(401, 403, 404, 422, 503))
async def load_model(model_id: ModelId, state: State, control: Control) -> AdminModel:
    """Load the model's engine now (an adapter's: its base's), as a first request would."""
    control.entry(model_id)
    await state.pool.load(model_id)
    return _model(state, control, model_id)


@router.post("/models/{model_id}/unload", response_model=AdminModel, responses=_responses(401, 403, 404, 409, 422))
async def unload_model(model_id: ModelId, state: State, control: Control) -> AdminModel:
    """Unload the model's engine; 409 while it serves requests or is pinned."""
    control.entry(model_id)
    await state.pool.unload(model_id)
    return _model(state, control, model_id)


@router.post("/models/{model_id}/pin", response_model=AdminModel, responses=_responses(401, 403, 404, 409, 422))
async def pin_model(model_id: ModelId, state: State, control: Control) -> AdminModel:
    """Pin the model (persisted): it loads now, in the background, and is never unloaded."""
    await control.set_pinned(model_id, True)
    return _model(state, control, model_id)


@router.post("/models/{model_id}/unpin", response_model=AdminModel, responses=_responses(401, 403, 404, 409, 422))
async def unpin_model(model_id: ModelId, state: State, control: Control) -> AdminModel:
    """Unpin the model (persisted): it may be unloaded again, by keep-alive or for room."""
    await control.set_pinned(model_id, False)
    return _model(state, control, model_id)


@router.post("/registry/reload", response_model=RegistryChangesBody, responses=_responses(401, 403, 422))
async def reload_registry(control: Control) -> RegistryChangesBody:
    """Read the registry files and the operator file again and serve what they say (SIGHUP
    does the same); 422, and nothing changes, when they are invalid."""
    return RegistryChangesBody.of(await control.reload())
