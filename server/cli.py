"""The ``v4serve`` command line."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from server.registry import RegistryError, load_registry
from server.settings import LOOPBACK, Settings

logger = logging.getLogger("server")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="v4serve", description="Serve the /v4/completions API from open models on your own hardware."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="address to bind (default: loopback unless API keys are set)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument(
        "--registry", action="append", type=Path, dest="registry_files", metavar="FILE",
        help="operator registry file laid over the shipped one (repeatable)",
    )
    serve.add_argument(
        "--preload", action="append", metavar="ID", help="load this model at start-up (repeatable)"
    )
    serve.add_argument("--api-keys-file", type=Path, help="file of API keys, one 'key' or 'key:account' a line")
    serve.add_argument("--home", type=Path, help="where builtin models are generated (default ~/.cache/v4serve)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    given = {
        name: value
        for name in ("host", "port", "registry_files", "preload", "api_keys_file", "home", "log_level")
        if (value := getattr(args, name, None)) is not None
    }
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

    from server.api import create_app

    registry = load_registry(settings.registry_files)
    app = create_app(settings, registry)
    keys_enabled = app.state.v4.keys.enabled
    host = settings.host or ("0.0.0.0" if keys_enabled else LOOPBACK)
    if not keys_enabled:
        if _is_loopback(host):
            logger.warning(
                "no API keys configured (V4SERVE_API_KEYS or --api-keys-file): serving without "
                "authentication, bound to %s only", host
            )
        else:
            logger.warning(
                "no API keys configured: serving WITHOUT authentication on %s, as asked; anyone "
                "who can reach this address can use every model", host
            )
    logger.info("serving %d models from the registry on http://%s:%d", len(registry), host, settings.port)
    uvicorn.run(app, host=host, port=settings.port, log_level=settings.log_level, access_log=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        print(f"v4serve: invalid setting: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "serve":
            return serve(settings)
    except (RegistryError, ValueError, OSError) as exc:
        print(f"v4serve: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
