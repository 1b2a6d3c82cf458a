"""The ``v4serve`` command line."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from server.inventory import WeightSource, serving_entry, weight_sources, weights_present
from server.registry import SHIPPED_REGISTRY, RegisteredModel, Registry, RegistryError, load_registry
from server.registry.operator import load_serving_registry, operator_file
from server.settings import LOOPBACK, Option, Settings, options
from server.telemetry.logs import configure_logging
from server.weights import BUILTIN_PREFIX, HubError, HubUnreachableError, hub, local_dir

logger = logging.getLogger("server")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="v4serve", description="Serve the /v4/completions API from open models on your own hardware."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the HTTP server. Every flag has an environment twin, named in its help; "
        "V4SERVE_API_KEYS has no flag.",
    )
    _add_settings(serve, *(option.name for option in options()))
    check = commands.add_parser("check", help="validate the merged registry without weights; exit 1 on problems")
    _add_settings(check, "registry_files")
    listing = commands.add_parser("models", help="list the registered models and whether their weights are here")
    _add_settings(listing, "registry_files", "home")
    pull = commands.add_parser(
        "pull", help="download models' weights into the Hugging Face cache (HF_TOKEN for gated repos)"
    )
    pull.add_argument("model_ids", nargs="+", metavar="ID", help="model ID or alias")
    _add_settings(pull, "registry_files")
    usage = commands.add_parser(
        "usage",
        help="print token usage from the ledger (what GET /v4/usage answers), read directly",
        description="Totals and the newest records of the usage ledger: SQLite under --home, or --ledger-url.",
    )
    usage.add_argument("--account-id", help="only this account's records")
    usage.add_argument("--model", help="only this model's records")
    usage.add_argument("--since", help="from this time on: ISO 8601 (UTC unless zoned) or seconds since the epoch")
    usage.add_argument("--until", help="before this time: ISO 8601 or seconds since the epoch")
    usage.add_argument("--limit", type=int, default=100, help="rows to print at most (default 100)")
    usage.add_argument("--json", action="store_true", help="print the JSON body GET /v4/usage answers with")
    _add_settings(usage, "home", "ledger_url")
    batch = commands.add_parser(
        "batch",
        help="run a JSONL file of OpenAI batch requests on this machine's engines (resumable)",
        description="Run every line of INPUT (OpenAI batch requests to /v1/completions, /v1/chat/completions, "
        "/v4/completions or /v4/chat-completions) and append one result line per input line to OUTPUT. "
        "Running it again skips the lines OUTPUT already holds. Exit 0 when every line is answered.",
    )
    batch.add_argument("input", type=Path, metavar="INPUT.jsonl", help="the requests, one JSON object a line")
    batch.add_argument("output", type=Path, metavar="OUTPUT.jsonl", help="where results are appended")
    batch.add_argument(
        "--no-ledger",
        action="store_true",
        help="do not record the lines in the usage ledger (by default each line that runs is recorded there, "
        "as the server records a request)",
    )
    _add_settings(
        batch,
        "registry_files",
        "home",
        "ledger_url",
        "memory_budget",
        "load_timeout",
        "sleep_mode",
        "log_level",
        *_IMAGE_SETTINGS,
        *_RAY_BATCH_SETTINGS,
    )
    return parser


# Where a batch runs across a Ray cluster (server.batch.ray_job): the cluster, and how its hosts are placed.
_RAY_BATCH_SETTINGS = ("ray_address", "ray_replica_resources", "ray_replica_gpus")
# What a batch line's images are read under, as a server reads them.
_IMAGE_SETTINGS = (
    "image_fetch_timeout",
    "image_max_bytes",
    "image_max_pixels",
    "image_decoded_pixels",
    "image_formats",
    "image_allowed_domains",
    "image_allow_private_networks",
    "image_file_root",
)


def _add_settings(parser: argparse.ArgumentParser, *names: str) -> None:
    """The flags of these settings (those that have one), generated from ``Settings``."""
    for option in options():
        if option.name in names and option.flag is not None:
            _add_setting(parser, option.flag, option)


def _add_setting(parser: argparse.ArgumentParser, flag: str, option: Option) -> None:
    """Every flag defaults to None, meaning not given: the environment variable or the
    setting's default then applies."""
    notes = ["repeatable"] if option.repeatable else []
    notes.append(f"env {option.env}")
    if option.default is not None and not option.switch:
        hint = f" = {option.default_hint}" if option.default_hint else ""
        notes.append(f"default {option.default}{hint}")
    # Descriptions mark code with backticks for the docs; argparse formats help with %.
    description = option.description.replace("`", "")
    help_text = f"{description} ({'; '.join(notes)})".replace("%", "%%")
    if option.switch:
        parser.add_argument(flag, dest=option.name, action="store_true", default=None, help=help_text)
        return
    parser.add_argument(
        flag,
        dest=option.name,
        action="append" if option.repeatable else "store",
        type=option.kind,
        choices=option.choices or None,
        metavar=None if option.choices else option.metavar,
        help=help_text,
    )


def _settings(args: argparse.Namespace) -> Settings:
    given = {option.name: value for option in options() if (value := getattr(args, option.name, None)) is not None}
    return Settings(**given)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings) -> int:
    import uvicorn

    from server.api import create_app, state_of
    from server.api.admin import reload_on_sighup

    # The operator file holds what the admin API changed: it outlives a restart.
    registry = load_serving_registry(settings.registry_files, operator_file(settings.home))
    if settings.ray_address is not None:
        # Ray is imported only here: a server on one machine never imports it.
        from server.cluster.ingress import create_cluster_app

        app = create_cluster_app(settings, registry)
    else:
        app = create_app(settings, registry)
    reload_on_sighup(app)
    keys_enabled = state_of(app).keys.enabled
    host = settings.host or ("0.0.0.0" if keys_enabled else LOOPBACK)
    if not keys_enabled:
        if _is_loopback(host):
            logger.warning(
                "no API keys configured (V4SERVE_API_KEYS or --api-keys-file): serving without "
                "authentication, bound to %s only",
                host,
            )
        else:
            logger.warning(
                "no API keys configured: serving WITHOUT authentication on %s, as asked; anyone "
                "who can reach this address can use every model",
                host,
            )
    logger.info("serving %d models from the registry on http://%s:%d", len(registry), host, settings.port)
    # On SIGTERM uvicorn stops accepting connections, gives running requests
    # shutdown_timeout seconds, cancels the rest (which aborts them in their engines),
    # then the app's lifespan shuts every engine down.
    uvicorn.run(
        app,
        host=host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout,
        timeout_keep_alive=settings.connection_keep_alive,
        # JSON lines: uvicorn's own loggers write through the root handler too.
        **({"log_config": None} if settings.log_format == "json" else {}),
    )
    return 0


def usage(settings: Settings, args: argparse.Namespace) -> int:
    """Print the ledger's totals and newest rows, filtered as ``GET /v4/usage`` filters."""
    from server.telemetry import Ledger, UsageFilter
    from server.telemetry.report import as_json, as_text, parse_moment

    location = Ledger.location_for(settings.home, settings.ledger_url)
    if "://" not in location and not Path(location).exists():
        print(f"v4serve: no usage ledger at {location} (has a server run with this --home?)", file=sys.stderr)
        return 1
    wanted = UsageFilter(
        account=args.account_id,
        model=args.model,
        since=parse_moment(args.since) if args.since else None,
        until=parse_moment(args.until) if args.until else None,
        limit=args.limit,
    )
    report = Ledger(location, writable=False).query(wanted)
    print(as_json(report) if args.json else as_text(report))
    return 0


def check(settings: Settings) -> int:
    """Print one line per registry problem; 1 if any is an error."""
    from server.registry.check import check_registry

    # vLLM is imported only for its list of architectures; its start-up chatter would
    # bury the problems.
    logging.getLogger("vllm").setLevel(logging.ERROR)
    files = ", ".join(str(path) for path in [SHIPPED_REGISTRY, *settings.registry_files])
    try:
        registry = load_registry(settings.registry_files)
    except RegistryError as exc:
        print(exc)
        return 1
    problems = check_registry(registry)
    for problem in problems:
        print(problem)
    errors = sum(not problem.warning for problem in problems)
    counts = f"{errors} error(s), {len(problems) - errors} warning(s)"
    if errors:
        print(f"{files}: {counts}")
        return 1
    print(f"ok: {len(registry)} models in {files}; {counts}")
    return 0


def models(settings: Settings) -> int:
    """Print the registered models as a table, with whether their weights are here: what
    a server with this home serves, the admin API's changes included."""
    registry = load_serving_registry(settings.registry_files, operator_file(settings.home))
    rows: list[tuple[str, ...]] = [("ID", "SOURCE", "ARCHITECTURE", "ENGINE", "CONTEXT", "GPUS", "LOCAL")]
    rows += [_model_row(registered, registry, settings.home) for registered in registry]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _model_row(registered: RegisteredModel, registry: Registry, home: Path) -> tuple[str, ...]:
    """A LoRA entry shows its base's facts: the base's engine is the one that serves it."""
    entry = registered.entry
    source = f"{entry.base} + {entry.adapter}" if entry.is_adapter else entry.source or ""
    serving = serving_entry(registered, registry)
    facts = ("?",) * 4
    if serving is not None:
        facts = (
            serving.architecture or "?",
            serving.engine,
            str(serving.max_model_len or "config"),
            str(serving.tensor_parallel_size),
        )
    present = "yes" if weights_present(registered, registry, home) else "no"
    return (registered.model_id, source, *facts, present)


def pull(settings: Settings, names: Sequence[str]) -> int:
    """Download what the Hugging Face cache lacks of each named model's weights."""
    registry = load_registry(settings.registry_files)
    repos: dict[str, WeightSource] = {}
    failed = False
    for name in names:
        registered = registry.resolve(name)
        if registered is None:
            hosted = name in registry.hosted_vendor_ids
            reason = "a hosted vendor model with no open weights" if hosted else "not in the registry"
            print(f"v4serve: model '{name}' is {reason}", file=sys.stderr)
            failed = True
            continue
        for weights in weight_sources(registered, registry):
            if weights.source.startswith(BUILTIN_PREFIX):
                print(f"{name}: {weights.source} is generated on first use; nothing to download")
            elif local_dir(weights.source) is not None:
                print(f"{name}: {weights.source} is a local directory; nothing to download")
            else:
                repos.setdefault(weights.source, weights)
    gated = [repo for repo, weights in repos.items() if weights.gated]
    if gated and not hub.has_token():
        print(
            f"v4serve: HF_TOKEN is not set, and these repos are gated: {', '.join(gated)}; accept "
            "each licence on the hub and set HF_TOKEN, or their downloads will be refused",
            file=sys.stderr,
        )
    for repo, weights in repos.items():
        try:
            folder = hub.ensure_snapshot(repo, weights.revision)
        except HubUnreachableError as exc:
            # Every other repo would wait on the same unreachable hub.
            print(f"v4serve: {exc}", file=sys.stderr)
            return 1
        except HubError as exc:
            print(f"v4serve: {exc}", file=sys.stderr)
            failed = True
            continue
        print(f"{repo}: {folder}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        print(f"v4serve: invalid setting: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        if args.command == "serve":
            return serve(settings)
        if args.command == "check":
            return check(settings)
        if args.command == "models":
            return models(settings)
        if args.command == "pull":
            return pull(settings, args.model_ids)
        if args.command == "usage":
            return usage(settings, args)
        if args.command == "batch":
            from server.batch.command import run_batch

            return run_batch(settings, args.input, args.output, ledger=not args.no_ledger)
    except (RegistryError, ValueError, OSError) as exc:
        print(f"v4serve: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
