"""The Ray path's parts that need no cluster: the import guard, the autoscaling rule,
the ``--ray`` flags and the KubeRay manifest (parsed; CI has no Kubernetes)."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import tomllib
import yaml

from server.cluster.replica import coalesced, merged
from server.cluster.scaling import ScaleBounds, desired_replicas
from server.engines.base import GenerationDelta, TokenLogprob
from server.registry import load_registry
from server.settings import options

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "docker" / "kuberay-rayservice.yaml"


def test_a_single_machine_server_never_imports_ray() -> None:
    # A fresh interpreter: this one may have imported Ray for other tests.
    code = (
        "import sys, server.cli, server.api, server.pool, server.engines, server.service; "
        "server.cli._parser().parse_args(['serve']); "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("current", "queued", "idle", "expected"),
    [
        (0, 0, 0, 2),  # below the minimum (a replica died): back to it
        (2, 16, 0, 2),  # 8 waiting per replica is the target, not past it
        (2, 17, 0, 3),  # past it: one more
        (4, 100, 0, 4),  # at the maximum
        (3, 0, 1, 2),  # nothing waiting and a replica idle: one fewer
        (3, 1, 1, 3),  # something waits: keep it
        (2, 0, 2, 2),  # never below the minimum
        (5, 0, 0, 4),  # above the maximum (bounds lowered): down to it
    ],
)
def test_replicas_follow_the_queue_within_bounds(current: int, queued: int, idle: int, expected: int) -> None:
    assert desired_replicas(current, queued, idle, ScaleBounds(minimum=2, maximum=4, target_queue=8)) == expected


def test_bounds_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="minimum"):
        ScaleBounds(minimum=3, maximum=2, target_queue=8)


def test_ray_flags_are_serve_flags() -> None:
    flags = {option.flag: option for option in options()}
    assert flags["--ray"].name == "ray_address"
    assert flags["--ray-replica-resource"].repeatable


def test_kuberay_manifest_runs_the_serve_application() -> None:
    manifest = yaml.safe_load(MANIFEST.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    cluster = manifest["spec"]["rayClusterConfig"]
    pinned = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    assert pinned == [f"ray[data,serve]=={cluster['rayVersion']}"]

    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    module, _, attribute = application["import_path"].partition(":")
    serve_app = importlib.import_module(module)
    assert callable(getattr(serve_app, attribute))
    settings = serve_app.settings_from(application["args"])  # valid settings, or this raises
    assert settings.ray_address == "auto"
    registry = load_registry(settings.registry_files)
    assert all(name in registry for name in settings.preload)

    # Each engine replica takes the GPUs one worker pod offers.
    (workers,) = cluster["workerGroupSpecs"]
    gpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert float(workers["rayStartParams"]["num-gpus"]) == float(gpus) == settings.ray_replica_gpus
    assert settings.ray_max_replicas is not None and settings.ray_max_replicas <= workers["maxReplicas"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 8000, "name": "serve"} in head["ports"]


def test_a_whole_answer_crosses_as_one_delta() -> None:
    first = TokenLogprob(5, "He", -0.5)
    deltas = [
        GenerationDelta("He", 3, 1, token_ids=(5,), logprobs=(first,), prompt_logprobs=(TokenLogprob(1, "<s>", None),)),
        GenerationDelta("llo", 3, 2, token_ids=(6,), logprobs=(TokenLogprob(6, "llo", -0.25),)),
        GenerationDelta("", 3, 2, finish_reason="stop"),
    ]
    one = merged(deltas)
    assert (one.text, one.prompt_tokens, one.completion_tokens, one.finish_reason) == ("Hello", 3, 2, "stop")
    assert one.token_ids == (5, 6)
    assert one.logprobs is not None and [entry.token for entry in one.logprobs] == ["He", "llo"]
    assert one.prompt_logprobs == deltas[0].prompt_logprobs
    assert merged([GenerationDelta("x", 1, 1, finish_reason="length")]).logprobs is None


async def test_deltas_waiting_to_be_sent_cross_together() -> None:
    async def engine(fail: bool) -> AsyncIterator[GenerationDelta]:
        for i in range(3):
            yield GenerationDelta(str(i), 1, i + 1)
        if fail:
            raise RuntimeError("engine died")

    # All three are ready before the first is sent: one delta.
    assert [d.text async for d in coalesced(engine(fail=False))] == ["012"]
    sent: list[str] = []
    with pytest.raises(RuntimeError, match="engine died"):
        async for delta in coalesced(engine(fail=True)):
            sent.append(delta.text)
    assert sent == ["012"]  # what came before the failure is sent, then the failure


async def test_interleaved_deltas_lose_nothing() -> None:
    async def engine() -> AsyncIterator[GenerationDelta]:
        for i in range(3):
            await asyncio.sleep(0)  # engine and sender take turns
            yield GenerationDelta(str(i), 1, i + 1)

    sent = []
    async for delta in coalesced(engine()):
        sent.append(delta.text)
        await asyncio.sleep(0)
    assert "".join(sent) == "012"


@pytest.mark.slow
def test_an_address_nothing_answers_at_is_an_error_not_a_wait(tmp_path: Path) -> None:
    from server.testing import free_port

    address = f"127.0.0.1:{free_port()}"
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"custom_id": "a", "url": "/v4/completions", "body": {"model": "tiny-llama", "prompt": "x"}}\n')
    batch = [sys.executable, "-m", "server", "batch", str(lines), str(tmp_path / "out.jsonl"), "--ray", address]
    serve = [sys.executable, "-m", "server", "serve", "--port", "0", "--ray", address]
    for command, status in ((batch, 1), (serve, 2)):
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == status, done.stderr[-2000:]
        assert f"no Ray cluster answers at {address}" in done.stderr
        assert "Traceback" not in done.stderr
