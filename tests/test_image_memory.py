"""Decoded images are held late and within a budget, so memory stays bounded under load.

A 4,896-byte PNG of 6300 x 6300 one-bit pixels passes every per-image limit and decodes
to 119 MB of RGB. The real server gets 300 of them at once and its resident memory must
stay a small multiple of the budget, not 300 x 119 MB.

When the decoding happens is staged with the real ``EnginePool`` and ``CompletionService``
around a stand-in engine (as in tests/test_pool_gpu_paths.py): holding a request in the
model's queue, or inside the engine's processing, takes an engine the test can hold, which
the real one is not. Everything is decided by events and counters, never by timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image as PILImage

from server.engines.base import AdapterRef, LaunchOptions, PreparedRequest, SamplingOptions
from server.errors import InvalidRequestError, OverloadedError, PayloadTooLargeError
from server.pool import EnginePool
from server.protocol.v4 import CompletionRequest
from server.registry import ModelEntry, RegisteredModel, Registry, VisionSettings
from server.service import CompletionService, ImagePolicy
from server.service.images import decode_images, read_images
from tests.conftest import API_KEY, FIXTURES, RunningServer, start_server
from tests.test_images import data_uri, encode
from tests.test_pool_gpu_paths import StandInGpuEngine

BOMB = encode(PILImage.new("1", (6300, 6300)))
BOMB_PIXELS = 6300 * 6300
RGB_BYTES = 3
# Small enough to decode quickly in the staged tests, large enough to matter to a budget.
IMAGE = encode(PILImage.new("1", (1000, 1000)))
IMAGE_PIXELS = 1000 * 1000


# --- staged: the real pool and service around an engine the test can hold -------------------


class HeldEngine(StandInGpuEngine):
    """Takes a request's images in ``prepare``, which waits with them while ``hold`` is clear."""

    def __init__(self, model_id: str, launch: LaunchOptions):
        super().__init__(model_id, launch)
        self.hold = asyncio.Event()
        self.hold.set()
        self.preparing = asyncio.Event()
        self.refuse = False
        self.images: list[list[tuple[int, int]]] = []

    async def prepare(
        self, prompt: str, sampling: SamplingOptions, *, images: Sequence[PILImage.Image] = (), **_: Any
    ) -> PreparedRequest:
        self.images.append([(image.size, image.mode) for image in images])
        if images:
            self.preparing.set()
            await self.hold.wait()
        if self.refuse:
            raise InvalidRequestError("the engine refused the prompt", param="prompt")
        return PreparedRequest(prompt_tokens=1, sampling=sampling, engine_input=None)


class Stage:
    """A service over a pool of one vision model served by a ``HeldEngine``."""

    def __init__(self, tmp_path: Path, *, decoded_pixels: int, max_running: int):
        self.engine: HeldEngine | None = None
        entry = ModelEntry(
            source=str(tmp_path),
            vision=VisionSettings(placeholder="<image>", max_images=2),
            max_running=max_running,
            max_queued=4,
        )
        registry = Registry({"m": RegisteredModel("m", entry, tmp_path / "ops.yaml")})
        self.pool = EnginePool(registry, home=tmp_path, starters={"vllm": self._start})
        self.service = CompletionService(self.pool, ImagePolicy(decoded_pixels=decoded_pixels))

    async def _start(
        self, model_id: str, entry: ModelEntry, weights: str, adapters: Sequence[AdapterRef], launch: LaunchOptions
    ) -> HeldEngine:
        self.engine = HeldEngine(model_id, launch)
        return self.engine

    async def complete(self, *images: bytes) -> None:
        """One request through ``prepare``; its lease is given back at once."""
        pending = await self.service.prepare(request(*images))
        pending.close()

    def queued(self) -> int:
        return next(s.queued for s in self.pool.status() if s.model_id == "m")

    def state(self) -> str:
        return next(s.state.value for s in self.pool.status() if s.model_id == "m")


def request(*images: bytes) -> CompletionRequest:
    return CompletionRequest.model_validate(
        {
            "model": "m",
            "prompt": "Hi",
            "images": [{"image_url": data_uri(image)} for image in images],
            "model_parameters": {"max_tokens": 1},
        }
    )


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The modes Pillow converts images to: decoding is ``convert("RGB")``, header reads are not."""
    seen: list[str] = []
    convert = PILImage.Image.convert

    def counted(self: PILImage.Image, mode: str | None = None, *args: Any, **kwargs: Any) -> PILImage.Image:
        seen.append(str(mode))
        return convert(self, mode, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "convert", counted)
    return seen


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def test_a_queued_request_holds_its_images_encoded(tmp_path: Path, conversions: list[str]) -> None:
    stage = Stage(tmp_path, decoded_pixels=IMAGE_PIXELS, max_running=1)
    held = await stage.pool.lease("m")  # the one running slot: the next request must queue
    waiting = asyncio.create_task(stage.complete(IMAGE))
    await asyncio.wait_for(until(lambda: stage.queued() == 1), 30)
    # It was read and checked, yet not one pixel was decoded while it waits.
    assert conversions == []
    held.release()
    await asyncio.wait_for(waiting, 30)
    assert conversions == ["RGB"]
    assert stage.engine is not None and stage.engine.images == [[((1000, 1000), "RGB")]]
    await stage.pool.shutdown()


async def test_the_budget_is_held_until_the_engine_has_the_images(tmp_path: Path) -> None:
    stage = Stage(tmp_path, decoded_pixels=IMAGE_PIXELS, max_running=4)
    await stage.complete()  # loads the engine
    engine = stage.engine
    assert engine is not None
    engine.hold.clear()
    first = asyncio.create_task(stage.complete(IMAGE))
    await asyncio.wait_for(engine.preparing.wait(), 30)
    # While the engine processes the first image, the budget holds no room for another.
    with pytest.raises(OverloadedError) as refused:
        await asyncio.wait_for(stage.complete(IMAGE), 30)
    assert refused.value.status_code == 429 and refused.value.param == "images"
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    await asyncio.wait_for(stage.complete(), 30)  # a request without images needs no budget
    engine.hold.set()
    await asyncio.wait_for(first, 30)
    # Given back once the engine has the images, and after every way a request can fail.
    await stage.complete(IMAGE)
    engine.refuse = True
    with pytest.raises(InvalidRequestError, match="the engine refused"):
        await stage.complete(IMAGE)
    engine.refuse = False
    broken = IMAGE[: len(IMAGE) // 2]  # a whole header, half the pixels: fails only when decoded
    with pytest.raises(InvalidRequestError, match="broken or truncated"):
        await stage.complete(broken)
    await stage.complete(IMAGE)
    await stage.pool.shutdown()


async def test_images_larger_than_the_whole_budget_are_413_without_loading_the_model(tmp_path: Path) -> None:
    stage = Stage(tmp_path, decoded_pixels=2 * IMAGE_PIXELS - 1, max_running=1)
    with pytest.raises(PayloadTooLargeError) as refused:
        await stage.complete(IMAGE, IMAGE)
    assert refused.value.param == "images"
    assert str(2 * IMAGE_PIXELS) in refused.value.message
    assert stage.state() == "not_loaded"
    await stage.complete(IMAGE)  # one image fits
    await stage.pool.shutdown()


async def test_cancelled_decoding_waits_for_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoding thread cannot be stopped: its caller keeps the budget until it ends."""
    started, finish = threading.Event(), threading.Event()
    convert = PILImage.Image.convert

    def slow(self: PILImage.Image, *args: Any, **kwargs: Any) -> PILImage.Image:
        started.set()
        finish.wait(60)
        return convert(self, *args, **kwargs)

    policy = ImagePolicy()
    encoded = await read_images(request(IMAGE).images or [], policy, max_images=1)
    assert encoded[0].pixels == IMAGE_PIXELS
    monkeypatch.setattr(PILImage.Image, "convert", slow)
    decoding = asyncio.create_task(decode_images(encoded, policy))
    await asyncio.wait_for(asyncio.to_thread(started.wait, 60), 30)
    decoding.cancel()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not decoding.done()  # still waiting for the thread
    finish.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(decoding, 30)


# --- the real server: 300 decompression bombs at once ---------------------------------------

REQUESTS = 300
# Room for two bombs at once: some requests are served while the rest are refused.
BUDGET_PIXELS = 2 * BOMB_PIXELS


@pytest.fixture(scope="module")
def bounded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("image-memory"),
        registry_files=[FIXTURES / "vision_overlay.yaml"],
        preload=["tiny-llava"],
        extra_env={"V4SERVE_IMAGE_DECODED_PIXELS": str(BUDGET_PIXELS)},
    )
    yield running
    running.stop()


def peak_rss(pid: int) -> int:
    """The process's resident high-water mark (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


@pytest.mark.slow
async def test_many_tiny_images_that_decode_large_keep_memory_bounded(bounded_server: RunningServer) -> None:
    assert len(BOMB) < 5000
    body = {
        "model": "tiny-llava",
        "prompt": "What is in this picture?",
        "images": [{"image_url": data_uri(BOMB)}],
        "model_parameters": {"temperature": 0, "max_tokens": 1},
    }

    def client() -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
        return httpx.AsyncClient(
            base_url=bounded_server.base_url, headers={"x-api-key": API_KEY}, timeout=120, limits=limits
        )

    # One bomb served first: what stays allocated after one request is the baseline. (Its
    # own client: the burst below opens all its connections at once, none left idle.)
    async with client() as http:
        assert (await http.post("/v4/completions", json=body)).status_code == 200
    pid = bounded_server.process.pid
    reset_peak_rss(pid)
    before = peak_rss(pid)
    async with client() as http:
        responses = await asyncio.gather(*(http.post("/v4/completions", json=body) for _ in range(REQUESTS)))
        growth = peak_rss(pid) - before
        unexpected = {r.status_code: r.text for r in responses if r.status_code not in (200, 429)}
        assert not unexpected, unexpected
        assert any(r.status_code == 200 for r in responses)  # the first request to decode always finds the budget free
        for response in responses:
            if response.status_code == 429:
                assert response.json()["error"]["param"] == "images"
                assert int(response.headers["retry-after"]) >= 1
        # Decoding them all would take REQUESTS x 119 MB (36 GB); before the budget, even 40
        # of them grew the server by 6 GB. The budget allows two bombs' pixels at once;
        # Pillow's and the processor's working copies and the allocator's slack make the
        # peak a few times that (about 760 MB here), bounded at 20 bombs' worth.
        assert growth < 20 * BOMB_PIXELS * RGB_BYTES, f"resident memory grew {growth >> 20} MiB"
        # And the server still serves.
        assert (await http.post("/v4/completions", json=body)).status_code == 200
