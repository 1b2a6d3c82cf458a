"""Starting a vLLM engine leaves the event loop free.

vLLM's first import takes seconds (7-10 s on two cores); made on the event loop, it froze
the whole server, health checks and other models' requests included, whenever a model's
first engine started. The proof here does not depend on time: in a fresh interpreter, an
import hook records which thread imports vLLM while the real pool starts the real engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import TEST_HOME

REPOSITORY = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.abc, json, sys, threading
    from pathlib import Path

    importers = []

    class WatchVLLM(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "vllm":
                importers.append(threading.current_thread() is threading.main_thread())
            return None

    sys.meta_path.insert(0, WatchVLLM())

    from server.pool import EnginePool
    from server.registry import load_registry

    async def main():
        assert "vllm" not in sys.modules
        pool = EnginePool(load_registry([]), home=Path(sys.argv[1]))
        try:
            lease = await pool.lease("tiny-llama")
            lease.release()
        finally:
            await pool.shutdown()

    if __name__ == "__main__":
        asyncio.run(main())
        print(json.dumps({"imported_on_the_loop_thread": importers}))
    """
)


def test_the_first_engine_start_imports_vllm_off_the_event_loop() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(TEST_HOME)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # vLLM was imported once, by the engine start, from a worker thread.
    assert result == {"imported_on_the_loop_thread": [False]}
