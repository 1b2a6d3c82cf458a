"""Recompute the shipped registry's ``memory`` figures from one formula.

Each figure is ``server.registry.memory.entry_memory``: weights (``parameters_b`` at
``weight_bits`` or the dtype's width) + KV bytes a full-length sequence x
``CONCURRENCY`` + the engine overhead, rounded up to whole GiB, with the KV shape of
the entry's repo from ``server/registry/kv_shapes.py``. Nothing in ``memory`` is typed
by hand.

    .venv/bin/python scripts/gen_memory.py           # rewrite model_registry.yaml in place
    .venv/bin/python scripts/gen_memory.py --check   # exit 1 and list the figures that differ

Only the ``memory:`` line of each entry is rewritten; comments and layout stay.
"""

from __future__ import annotations

import argparse
import re
import sys

from server.registry import load_registry
from server.registry.kv_shapes import KV_SHAPES
from server.registry.loader import SHIPPED_REGISTRY
from server.registry.memory import GiB, entry_memory


def expected_figures() -> dict[str, int]:
    """Model ID -> the ``memory`` its entry should state, for every entry the formula covers."""
    figures = {}
    for registered in load_registry([], shipped=SHIPPED_REGISTRY):
        entry = registered.entry
        shape = KV_SHAPES.get(entry.source or "")
        if shape is not None:
            figures[registered.model_id] = entry_memory(entry, shape)
    return figures


def rewrite(text: str, figures: dict[str, int]) -> str:
    """``text`` (the registry file) with each listed entry's ``memory:`` line set."""
    for model_id, memory in figures.items():
        # The entry's block: from "  <id>:" to the next line indented two spaces or less.
        block = re.compile(rf"(^  {re.escape(model_id)}:\n(?:(?:    .*|\s*)\n)*?    memory: )\S+$", re.MULTILINE)
        text, count = block.subn(rf"\g<1>{memory // GiB}GiB", text, count=1)
        if count != 1:
            raise SystemExit(f"{SHIPPED_REGISTRY}: model '{model_id}' has no memory line to rewrite")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report differences instead of rewriting")
    args = parser.parse_args()
    figures = expected_figures()
    shipped = {m.model_id: m.entry.memory for m in load_registry([], shipped=SHIPPED_REGISTRY)}
    wrong = {i: f for i, f in figures.items() if shipped[i] != f}
    if args.check:
        for model_id, figure in wrong.items():
            stated = shipped[model_id]
            print(f"{model_id}: memory {stated and stated // GiB}GiB, formula {figure // GiB}GiB")
        return 1 if wrong else 0
    SHIPPED_REGISTRY.write_text(rewrite(SHIPPED_REGISTRY.read_text(encoding="utf-8"), figures), encoding="utf-8")
    print(f"{len(wrong)} memory figures rewritten in {SHIPPED_REGISTRY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
