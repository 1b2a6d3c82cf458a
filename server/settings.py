"""The one settings object: everything about this server that is not a model.

Read from ``V4SERVE_*`` environment variables, with command-line flags laid over them by
``v4serve serve``. Models live in the registry, never here.

A setting is declared once, here, and gets everything else from that declaration: its
environment variable (``V4SERVE_`` + the name in capitals), its ``serve`` flag (the name in
kebab case; see :func:`options`), its help text and its rows in the docs (the
``description``, rendered by ``scripts/gen_reference.py``). Field metadata in
``json_schema_extra`` adjusts the flag:

- ``"cli": False``: no flag, environment only (``api_keys``: a key on the command line
  would show in the process list and in shell history);
- ``"flag": "--name"``: another flag name (``registry_files`` is ``--registry``; a list's
  flag is named for one item, as it is given once per item);
- ``"metavar": "WORD"``: the placeholder of the flag's value in help and docs.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ByteSize, Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK = "127.0.0.1"
ENV_PREFIX = "V4SERVE_"

LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: str | None = Field(
        default=None,
        description="Address to bind; unset means loopback (`127.0.0.1`) when no API keys are set, else `0.0.0.0`.",
    )
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    registry_files: list[Path] = Field(
        default_factory=list,
        description="Operator registry files laid over the shipped one, in order; a later file's entry "
        "replaces an earlier entry of the same ID whole.",
        json_schema_extra={"flag": "--registry", "metavar": "FILE"},
    )
    preload: list[str] = Field(
        default_factory=list,
        description="Models (IDs or aliases) to load at start-up.",
        json_schema_extra={"metavar": "ID"},
    )
    api_keys: str = Field(
        default="",
        description="API keys: comma-separated `key`, `key:account` or `key:account:admin` items (an admin "
        "key reads every account's usage). No flag: a key on the command line would show in the process list.",
        json_schema_extra={"cli": False},
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="File of API keys, one `key`, `key:account` or `key:account:admin` a line, `#` comments; keys are printable "
        "ASCII without spaces, and a file without keys is refused.",
        json_schema_extra={"metavar": "FILE"},
    )
    home: Path = Field(
        default=Path("~/.cache/v4serve").expanduser(),
        description="Where builtin models are generated, and where the admin API keeps its registry changes "
        "(`operator_registry.yaml`).",
        json_schema_extra={"metavar": "DIR"},
    )
    load_timeout: float = Field(
        default=900.0,
        gt=0,
        description="Seconds a request waits for its model to load; then 503 with `Retry-After` while the load goes on.",
        json_schema_extra={"metavar": "SECONDS"},
    )
    memory_budget: ByteSize | None = Field(
        default=None,
        description="Memory engines may use on each device (each GPU, or RAM without GPUs), e.g. `70GiB`; "
        "unset: 90% of each device.",
        json_schema_extra={"metavar": "SIZE"},
    )
    keep_alive: float | None = Field(
        default=None,
        gt=0,
        description="Seconds an unused model stays loaded (an entry's `keep_alive` overrides it); unset: "
        "until its memory is needed.",
        json_schema_extra={"metavar": "SECONDS"},
    )
    sleep_mode: bool = Field(
        default=False,
        description="On GPUs, put idle models to sleep (weights to host memory) instead of unloading them; "
        "they wake in seconds.",
    )
    shutdown_timeout: float = Field(
        default=30.0,
        ge=0,
        description="Seconds running requests get to finish after SIGTERM; the rest are aborted.",
        json_schema_extra={"metavar": "SECONDS"},
    )
    connection_keep_alive: float = Field(
        default=75.0,
        gt=0,
        description="Seconds an idle client connection is kept open for its next request. Longer than "
        "clients keep idle connections themselves (httpx and the SDKs built on it: 5 s), so a client never "
        "sends a request on a connection the server is closing at that moment.",
        json_schema_extra={"metavar": "SECONDS"},
    )
    max_body_bytes: int = Field(
        default=32 << 20,
        gt=0,
        description="Largest request body in bytes; a larger one gets 413.",
        json_schema_extra={"metavar": "BYTES"},
    )
    # Images for vision models (server.service.images): deny by default, see ImagePolicy.
    image_fetch_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds to read all of one request's images (fetched in parallel under one deadline).",
        json_schema_extra={"metavar": "SECONDS"},
    )
    image_max_bytes: int = Field(
        default=20 << 20,
        gt=0,
        description="Largest image body in bytes; a larger one is refused with 413 while being read, and a "
        "bigger `Content-Length` before reading.",
        json_schema_extra={"metavar": "BYTES"},
    )
    image_max_pixels: int = Field(
        default=40_000_000,
        gt=0,
        description="Width x height of one image, checked from its header before any pixel is decoded "
        "(decompression bombs); past it, 413.",
        json_schema_extra={"metavar": "PIXELS"},
    )
    image_decoded_pixels: int = Field(
        default=400_000_000,
        gt=0,
        description="Decoded image pixels (3 bytes each in RGB) all requests may hold at once; a request "
        "that finds them in use gets 429 with `Retry-After`, one whose images alone exceed them 413. "
        "The default holds two requests of four images at the largest `image_max_pixels`, about 1.2 GB of RGB.",
        json_schema_extra={"metavar": "PIXELS"},
    )
    image_formats: list[str] = Field(
        default_factory=lambda: ["PNG", "JPEG", "GIF", "WEBP", "BMP"],
        description="The only image formats Pillow may try to open.",
        json_schema_extra={"flag": "--image-format", "metavar": "FORMAT"},
    )
    image_allowed_domains: list[str] = Field(
        default_factory=list,
        description="If set, the only host names image URLs (and each redirect) may name; empty means any public host.",
        json_schema_extra={"flag": "--image-allowed-domain", "metavar": "HOST"},
    )
    image_allow_private_networks: bool = Field(
        default=False,
        description="Turn the address guard off: also fetch images from loopback, private and link-local "
        "hosts. Only for servers that face trusted networks.",
    )
    image_file_root: Path | None = Field(
        default=None,
        description="The one folder `file://` image URLs may read; unset refuses `file://` URLs.",
        json_schema_extra={"metavar": "DIR"},
    )
    # The HTTP batch API (server.batch.manager): /v1/files and /v1/batches.
    batch_dir: Path | None = Field(
        default=None,
        description="Where `/v1/files` uploads, `/v1/batches` jobs and their results are kept; unset: "
        "`batches` under `--home`.",
        json_schema_extra={"metavar": "DIR"},
    )
    batch_max_running: int = Field(
        default=32,
        ge=1,
        description="Batch API requests running at once, over all batches; a new one starts only while "
        "no interactive request waits in its model's queue.",
        json_schema_extra={"metavar": "N"},
    )
    log_level: LogLevel = Field(default="info", description="The least severe log messages written.")
    # Telemetry (server.telemetry, docs/operations.md): logs, metrics, the usage ledger, tracing.
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`json`: one JSON object a log line (time, level, logger, message, request_id).",
    )
    metrics_open: bool = Field(
        default=False,
        description="Serve `GET /metrics` without an API key (for a Prometheus that holds none); by default "
        "it needs one, as every route but the probes.",
    )
    ledger_url: str | None = Field(
        default=None,
        description="A `postgresql://` URL for the usage ledger, shared by several servers, or "
        "`sqlite:///PATH` for a SQLite file elsewhere; unset: SQLite in `usage.sqlite3` under `--home`.",
        json_schema_extra={"metavar": "URL"},
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP collector to send a trace of each request to (e.g. `http://localhost:4318`); "
        "unset: the standard `OTEL_EXPORTER_OTLP_*` variables, else no tracing.",
        json_schema_extra={"metavar": "URL"},
    )
    # Serving on a Ray cluster (server.cluster, docs/cluster.md); unset, Ray is never imported.
    ray_address: str | None = Field(
        default=None,
        description="Run on this Ray cluster (`auto`, or the head's `HOST:PORT`): `serve` runs the HTTP ingress "
        "here and the engines in replicas on the cluster's nodes, each model routed to the replica that holds it; "
        "`batch` shards each model's lines over one engine host per node. Unset: this machine alone, without Ray.",
        json_schema_extra={"flag": "--ray", "metavar": "ADDRESS"},
    )
    ray_replica_resources: list[str] = Field(
        default_factory=list,
        description="Custom Ray resources that place engine hosts (serve's replicas, batch's hosts), one name per "
        "node or GPU set: each takes one unit of a name no other holds. Empty: serve spreads its replicas over the "
        "nodes, batch puts one host on each node with `--ray-replica-gpus` GPUs.",
        json_schema_extra={"flag": "--ray-replica-resource", "metavar": "NAME"},
    )
    ray_replica_gpus: float = Field(
        default=0.0,
        ge=0,
        description="GPUs each replica or batch host takes (a node's, or a GPU set's); 0 on CPU-only clusters.",
        json_schema_extra={"metavar": "COUNT"},
    )
    ray_min_replicas: int = Field(
        default=1,
        ge=1,
        description="Replicas always running; one that dies is replaced.",
        json_schema_extra={"metavar": "N"},
    )
    ray_max_replicas: int | None = Field(
        default=None,
        ge=1,
        description="Most replicas the queue may scale up to; unset: one per `--ray-replica-resource`, else "
        "`--ray-min-replicas`.",
        json_schema_extra={"metavar": "N"},
    )
    ray_target_queue: int = Field(
        default=8,
        ge=1,
        description="Requests queued per replica past which one more replica starts; a replica holding no model "
        "and serving nothing is stopped again.",
        json_schema_extra={"metavar": "N"},
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, value: Any) -> Any:
        # V4SERVE_LOG_LEVEL=DEBUG means what it says; uvicorn takes lower-case names only.
        return value.lower() if isinstance(value, str) else value


@dataclass(frozen=True)
class Option:
    """How one setting is spelled outside Python: its environment variable and ``serve`` flag."""

    name: str
    env: str
    # None: the setting is read from the environment only.
    flag: str | None
    metavar: str
    # What argparse converts one value with; pydantic validates the result.
    kind: type[Any]
    # A list setting: its flag is given once per item, and replaces the default list.
    repeatable: bool
    # A boolean: its flag takes no value and turns the setting on.
    switch: bool
    choices: tuple[str, ...]
    description: str
    # The default as an operator would write it; None when it is unset or empty.
    default: str | None
    # The default in other words (a byte count in MiB), or None.
    default_hint: str | None


def options() -> list[Option]:
    """Every setting's spelling, in declaration order."""
    return [_option(name, field) for name, field in Settings.model_fields.items()]


def _option(name: str, field: FieldInfo) -> Option:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    unknown = sorted(set(extra) - {"cli", "flag", "metavar"})
    if unknown:
        raise TypeError(f"setting '{name}': unknown json_schema_extra keys {unknown}")
    if not field.description:
        raise TypeError(f"setting '{name}' has no description")
    has_flag = extra.get("cli", True) is not False
    try:
        annotation, repeatable = _value_type(name, field.annotation)
    except TypeError:
        if has_flag:
            raise
        annotation, repeatable = str, False
    default = field.get_default(call_default_factory=True)
    choices: tuple[str, ...] = ()
    if get_origin(annotation) is Literal:
        choices = tuple(str(choice) for choice in get_args(annotation))
        annotation = str
    switch = annotation is bool
    # ByteSize (an int) and other parsed types go to pydantic as the string given.
    kind = annotation if annotation in (int, float, Path) else str
    flag = extra.get("flag", "--" + name.replace("_", "-")) if has_flag else None
    metavar = extra.get("metavar", "{" + ",".join(choices) + "}" if choices else name.upper())
    return Option(
        name=name,
        env=ENV_PREFIX + name.upper(),
        flag=str(flag) if flag is not None else None,
        metavar=str(metavar),
        kind=kind,
        repeatable=repeatable,
        switch=switch,
        choices=choices,
        description=field.description,
        default=_shown(default),
        default_hint=f"{default >> 20} MiB" if _whole_mib(name, default) else None,
    )


def _value_type(name: str, annotation: Any) -> tuple[Any, bool]:
    """The type of one value of a setting (Optional taken off), and whether it is a list."""
    if get_origin(annotation) in (Union, types.UnionType):
        present = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(present) == 1:
            return _value_type(name, present[0])
    elif get_origin(annotation) is list:
        inner, nested = _value_type(name, get_args(annotation)[0])
        if not nested:
            return inner, True
    elif get_origin(annotation) is Literal or annotation in (bool, int, float, str, Path, ByteSize):
        return annotation, False
    raise TypeError(f"setting '{name}': no flag for a {annotation}; give it json_schema_extra={{'cli': False}}")


def _whole_mib(name: str, value: Any) -> bool:
    return name.endswith("_bytes") and isinstance(value, int) and value > 0 and value % (1 << 20) == 0


def _shown(value: Any) -> str | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Path):
        # The docs must not depend on who generated them.
        home = Path.home()
        return "~/" + str(value.relative_to(home)) if value.is_relative_to(home) else str(value)
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)
