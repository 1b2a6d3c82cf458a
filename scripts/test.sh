#!/usr/bin/env bash
# The gates, then the tests: what CI runs (.ci/run) and what a contributor runs before
# sending a change. Extra arguments go to pytest (e.g. -m "not slow", -k name).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${V4SERVE_VENV:-.venv}"

"$venv/bin/ruff" format --check .
"$venv/bin/ruff" check .
"$venv/bin/mypy"
"$venv/bin/lint-imports"
"$venv/bin/python" -m pytest "$@"
