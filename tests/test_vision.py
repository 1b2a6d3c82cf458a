"""Vision models end to end: images in a request reach the real vLLM engine, safely.

A permissive server (the operator's switch for trusted networks, tight limits, only
127.0.0.1 among allowed hosts, and a folder for file: URLs) serves the tiny LLaVA with
images from a test HTTP server on loopback and from data URIs. Every refusal is one
request answered with a JSON error, followed by a good request: refusing an image must
never cost the server. A second server with default settings shows that the address
guard is on by default: it refuses a loopback URL before connecting and before loading
any model, without saying where a name points, and a host name no resolver could look
up is the caller's 400, not the server's 500.

Prompt building (placeholders, chat templates) is checked without a server, with the
tiny LLaVA's own tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest
from PIL import Image as PILImage
from pydantic import ValidationError
from scale_gp import APIStatusError, SGPClient

from server.engines.rules import render_chat
from server.errors import InvalidRequestError
from server.registry import ModelEntry, VisionSettings, load_registry
from server.service.prompts import build_prompt
from server.weights.tiny import CHAT_TEMPLATE, ensure_builtin
from tests.conftest import API_KEY, FIXTURES, TEST_HOME, RunningServer, start_server
from tests.test_images import NOISY_PNG, ImageServer, LoopbackProbe, data_uri, encode

MODEL = "tiny-llava"
OVERLAY = FIXTURES / "vision_overlay.yaml"
PROMPT = "What is in this picture?"
GREEDY = {"temperature": 0, "max_tokens": 8}
IMAGE_TOKENS = 16  # the tiny LLaVA's 56x56 images in 14-pixel patches
MAX_IMAGES = 3  # the overlay's vision.max_images
FETCH_TIMEOUT = 2.0
MAX_BYTES = 100_000
MAX_PIXELS = 1_000_000

RED = encode(PILImage.new("RGB", (64, 48), (220, 30, 30)))
BLUE = encode(PILImage.new("RGB", (64, 48), (30, 30, 220)))
GREEN = encode(PILImage.new("RGB", (48, 64), (30, 200, 30)))


# --- servers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web() -> Iterator[ImageServer]:
    server = ImageServer()
    server.files.update(
        {
            "red.png": RED,
            "blue.png": BLUE,
            "huge.png": encode(PILImage.new("RGB", (1200, 1000), "white")),  # 1.2 M pixels, a few KiB
            "notes.txt": b"these are not the pixels you are looking for",
            "broken.png": NOISY_PNG[: len(NOISY_PNG) // 2],
        }
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("vision"),
        registry_files=[OVERLAY],
        preload=[MODEL],
        extra_env={
            "V4SERVE_IMAGE_ALLOW_PRIVATE_NETWORKS": "true",
            "V4SERVE_IMAGE_ALLOWED_DOMAINS": '["127.0.0.1"]',
            "V4SERVE_IMAGE_FETCH_TIMEOUT": str(FETCH_TIMEOUT),
            "V4SERVE_IMAGE_MAX_BYTES": str(MAX_BYTES),
            "V4SERVE_IMAGE_MAX_PIXELS": str(MAX_PIXELS),
            "V4SERVE_IMAGE_FILE_ROOT": str(tmp_path_factory.mktemp("image-files")),
        },
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(vision_server: RunningServer) -> SGPClient:
    return SGPClient(api_key=API_KEY, base_url=vision_server.base_url, max_retries=0, timeout=600)


def complete(client: SGPClient, urls: Sequence[str], prompt: str = PROMPT, model: str = MODEL) -> dict[str, Any]:
    return client.completions.create(
        model=model, prompt=prompt, images=[{"image_url": url} for url in urls], model_parameters=GREEDY
    ).model_dump()


def text_tokens(client: SGPClient, prompt: str) -> int:
    return complete(client, [], prompt)["token_usage"]["prompt"]


# --- images reach the model -----------------------------------------------------------


@pytest.mark.slow
def test_an_image_from_a_url_or_a_data_uri_is_the_same_image(client: SGPClient, web: ImageServer) -> None:
    fetched = complete(client, [web.url("/img/red.png")])
    inline = complete(client, [data_uri(RED)])
    assert fetched["completion"]["text"] == inline["completion"]["text"]
    # One placeholder line ("<image>\n") in the prompt, expanded into the image's tokens.
    assert fetched["token_usage"]["prompt"] == text_tokens(client, "<image>\n" + PROMPT) + IMAGE_TOKENS - 1


@pytest.mark.slow
def test_the_image_changes_the_output(client: SGPClient) -> None:
    red = complete(client, [data_uri(RED)])["completion"]["text"]
    blue = complete(client, [data_uri(BLUE)])["completion"]["text"]
    assert red != blue
    assert complete(client, [data_uri(RED)])["completion"]["text"] == red


@pytest.mark.slow
def test_several_images_in_one_prompt(client: SGPClient, web: ImageServer) -> None:
    urls = [web.url("/img/red.png"), data_uri(BLUE), data_uri(GREEN)]
    automatic = complete(client, urls)
    lines = "<image>\n" * len(urls) + PROMPT
    assert automatic["token_usage"]["prompt"] == text_tokens(client, lines) + len(urls) * (IMAGE_TOKENS - 1)
    assert complete(client, urls, prompt=lines) == automatic
    # Placeholders the caller placed stay where they are.
    inline = "Compare <image> with <image> and <image>."
    placed = complete(client, urls, prompt=inline)
    assert placed["token_usage"]["prompt"] == text_tokens(client, inline) + len(urls) * (IMAGE_TOKENS - 1)
    # The order of the images matters to the model.
    assert complete(client, urls[::-1])["completion"]["text"] != automatic["completion"]["text"]


@pytest.mark.slow
def test_an_image_refused_after_rendering_is_served_next_time(client: SGPClient) -> None:
    """vLLM's renderer caches a processed image on the assumption that the engine will
    receive it; a request refused after rendering (here: too long for the context) never
    reaches the engine, so the next request with that image must still carry it."""
    image = data_uri(encode(PILImage.new("RGB", (40, 40), (120, 60, 200))))
    with pytest.raises(APIStatusError) as caught:
        client.completions.create(
            model=MODEL, prompt=PROMPT, images=[{"image_url": image}], model_parameters={"max_tokens": 5000}
        )
    assert caught.value.status_code == 400
    assert "exceeds the context length" in caught.value.body["error"]["message"]
    served = complete(client, [image])
    assert served["completion"]["finish_reason"] == "length"
    assert served["token_usage"]["completion"] == GREEDY["max_tokens"]


@pytest.mark.slow
def test_streaming_with_an_image(client: SGPClient) -> None:
    expected = complete(client, [data_uri(BLUE)])
    chunks = [
        chunk.model_dump()
        for chunk in client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            images=[{"image_url": data_uri(BLUE)}],
            model_parameters=GREEDY,
            stream=True,
        )
    ]
    assert "".join(c["completion"]["text"] for c in chunks) == expected["completion"]["text"]
    assert chunks[-1]["token_usage"] == expected["token_usage"]


@pytest.mark.slow
def test_a_hosted_vision_id_aliased_to_the_tiny_llava(client: SGPClient) -> None:
    # The overlay's top-level `aliases: {gpt-4o: tiny-llava}`, as the README shows operators.
    assert complete(client, [data_uri(RED)], model="gpt-4o") == complete(client, [data_uri(RED)])


@pytest.mark.slow
def test_a_chat_entry_has_its_template_place_the_images(client: SGPClient) -> None:
    chat = complete(client, [data_uri(RED), data_uri(BLUE)], model="tiny-llava-chat")
    # The template's rendering, without the BOS that raw prompting adds itself.
    rendered = f"<|user|>\n<image>\n<image>\n{PROMPT}\n<|assistant|>\n"
    assert chat == complete(client, [data_uri(RED), data_uri(BLUE)], prompt=rendered)


# --- refusals: one request each, a JSON error, and the server keeps serving -------------


Refusal = tuple[dict[str, Any], int, str, str]  # request fields, status, param, words of the message


def images(*urls: str) -> dict[str, Any]:
    return {"images": [{"image_url": url} for url in urls]}


REFUSALS: dict[str, Callable[[ImageServer, LoopbackProbe], Refusal]] = {
    # Each hop is checked again: this redirect names a loopback host the operator did not allow.
    "redirect into loopback": lambda web, probe: (
        images(web.url(f"/redirect?to=http://localhost:{probe.port}/img/red.png")),
        400,
        "images[0].image_url",
        "'localhost' is not among the domains",
    ),
    "oversize body": lambda web, _: (
        images(web.url("/stream/200000")),
        413,
        "images[0].image_url",
        f"limit of {MAX_BYTES} bytes",
    ),
    "too many pixels": lambda web, _: (images(web.url("/img/huge.png")), 413, "images[0].image_url", "1200x1000"),
    "not an image": lambda web, _: (images(web.url("/img/notes.txt")), 400, "images[0].image_url", "not a PNG"),
    "broken image": lambda web, _: (
        images(data_uri(RED), web.url("/img/broken.png")),
        400,
        "images[1].image_url",
        "broken or truncated",
    ),
    "too many images": lambda web, _: (
        images(*[data_uri(RED)] * (MAX_IMAGES + 1)),
        400,
        "images",
        f"at most {MAX_IMAGES} image(s)",
    ),
    "slow server": lambda web, _: (images(web.url("/slow")), 400, "images", f"{FETCH_TIMEOUT:g} s limit"),
    "placeholders and images differ": lambda web, _: (
        {"prompt": "<image> and <image>", **images(data_uri(RED))},
        400,
        "prompt",
        "holds 2 image placeholder(s) (<image>) but 1 image(s)",
    ),
    "images for a text model": lambda web, _: (
        {"model": "tiny-llama", **images(data_uri(RED))},
        400,
        "images",
        "does not accept images",
    ),
    "NUL in a file: URL": lambda web, _: (
        images("file:///red%00.png"),
        400,
        "images[0].image_url",
        "must not hold a NUL character",
    ),
    "raw NUL in a file: URL": lambda web, _: (
        images("file:///red\0.png"),
        400,
        "images[0].image_url",
        "must not hold a NUL character",
    ),
}


@pytest.fixture(scope="module")
def probe() -> Iterator[LoopbackProbe]:
    listener = LoopbackProbe()
    yield listener
    listener.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_images_leave_the_server_serving(
    name: str, vision_server: RunningServer, client: SGPClient, web: ImageServer, probe: LoopbackProbe
) -> None:
    fields, status, param, says = REFUSALS[name](web, probe)
    body = {"model": MODEL, "prompt": PROMPT, "model_parameters": GREEDY, **fields}
    with vision_server.client() as http:
        response = http.post("/v4/completions", json=body)
        models = {m["id"]: m for m in http.get("/v4/models").json()["models"]}
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert says in error["message"], error["message"]
    assert probe.connections() == 0
    # Images are read before an engine is leased: not even the text model was loaded.
    assert models["tiny-llama"]["state"] == "not_loaded"
    assert complete(client, [data_uri(GREEN)])["completion"]["text"]


@pytest.mark.slow
def test_refusals_surface_in_the_sdk_as_api_errors(client: SGPClient) -> None:
    with pytest.raises(APIStatusError) as caught:
        complete(client, ["file:///etc/passwd"])
    assert caught.value.status_code == 400
    assert caught.value.body["error"]["param"] == "images[0].image_url"


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The vision models with every image setting at its default; no model is loaded."""
    running = start_server(tmp_path_factory.mktemp("default"), registry_files=[OVERLAY])
    yield running
    running.stop()


def post_images(server: RunningServer, *urls: str) -> tuple[httpx.Response, dict[str, Any]]:
    """One request with ``urls``, and the models' states right after it."""
    with server.client() as http:
        response = http.post("/v4/completions", json={"model": MODEL, "prompt": PROMPT, **images(*urls)})
        models = {m["id"]: m for m in http.get("/v4/models").json()["models"]}
    return response, models


@pytest.mark.slow
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_default_settings_refuse_loopback_without_connecting_or_loading(
    default_server: RunningServer, probe: LoopbackProbe, host: str
) -> None:
    response, models = post_images(default_server, f"http://{host}:{probe.port}/img/red.png")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "images[0].image_url"
    # Refused, without saying what the name resolved to.
    assert error["message"] == (
        f"image URL host '{host}' is not allowed: this server fetches images only from public addresses"
    )
    assert probe.connections() == 0
    # Images are read before an engine is leased: the refusal loaded no model.
    assert models[MODEL]["state"] == "not_loaded"


@pytest.mark.slow
@pytest.mark.parametrize("host", ["a..example", "a" * 64 + ".example"], ids=["empty-label", "label-over-63"])
def test_host_names_the_resolver_cannot_encode_are_400(default_server: RunningServer, host: str) -> None:
    response, models = post_images(default_server, f"http://{host}/x.png")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "images[0].image_url"
    assert error["message"] == f"image URL host '{host}' is not a valid host name"
    assert models[MODEL]["state"] == "not_loaded"


# --- prompts, without a server ----------------------------------------------------------


class TemplateOnly:
    """The one engine method prompt building uses, over a real tokenizer."""

    def __init__(self, tokenizer: Any, template: str | None = None):
        self._tokenizer = tokenizer
        self._template = template

    async def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> str:
        return render_chat(self._tokenizer, MODEL, messages, self._template)


# Phi-3-vision's template concatenates the content as a string: a list of parts breaks it.
STRING_ONLY_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\\n{% endif %}"
)
LLAVA = VisionSettings(placeholder="<image>", max_images=3)
NUMBERED = VisionSettings(placeholder="<|image_{n}|>", max_images=3)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_builtin(MODEL, TEST_HOME))


def entry(vision: VisionSettings, prompt_format: str = "raw") -> ModelEntry:
    return ModelEntry(source="builtin:tiny-llava", vision=vision, prompt_format=prompt_format)


async def test_raw_prompts_get_one_placeholder_per_image(tokenizer: Any) -> None:
    engine = TemplateOnly(tokenizer)
    assert (await build_prompt("Hi", entry(LLAVA), engine, images=2)).text == "<image>\n<image>\nHi"
    assert (await build_prompt("Hi", entry(NUMBERED), engine, images=2)).text == "<|image_1|>\n<|image_2|>\nHi"
    assert (await build_prompt("A <|image_1|> B <|image_2|>", entry(NUMBERED), engine, images=2)).text == (
        "A <|image_1|> B <|image_2|>"
    )
    # Without images the prompt is the caller's, placeholders or not.
    assert (await build_prompt("<image> Hi", entry(LLAVA), engine)).text == "<image> Hi"
    with pytest.raises(InvalidRequestError, match=r"holds 1 image placeholder\(s\) \(<\|image_\{n\}\|>\) but 2"):
        await build_prompt("<|image_7|> Hi", entry(NUMBERED), engine, images=2)


async def test_a_chat_template_that_knows_images_places_them(tokenizer: Any) -> None:
    built = await build_prompt("Hi", entry(LLAVA, "chat"), TemplateOnly(tokenizer), images=2)
    assert built.text == "<s><|user|>\n<image>\n<image>\nHi\n<|assistant|>\n"
    assert not built.add_special_tokens


@pytest.mark.parametrize(
    "template",
    [
        pytest.param(CHAT_TEMPLATE, id="renders-the-list-as-text"),
        pytest.param(STRING_ONLY_TEMPLATE, id="rejects-the-list"),
    ],
)
async def test_a_chat_template_that_does_not_know_images_gets_them_in_the_text(tokenizer: Any, template: str) -> None:
    engine = TemplateOnly(tokenizer, template)
    text = (await build_prompt("Hi", entry(NUMBERED, "chat"), engine, images=2)).text
    assert text == await engine.apply_chat_template([{"role": "user", "content": "<|image_1|>\n<|image_2|>\nHi"}])


async def test_chat_prompts_keep_the_callers_placeholders(tokenizer: Any) -> None:
    text = (await build_prompt("A <image> B", entry(LLAVA, "chat"), TemplateOnly(tokenizer), images=1)).text
    assert text == "<s><|user|>\nA <image> B\n<|assistant|>\n"


# --- the registry's vision keys ---------------------------------------------------------


def test_max_images_sizes_the_engine() -> None:
    from server.engines.vllm_engine import build_engine_args

    vision = entry(LLAVA)
    assert build_engine_args("v", vision, "/m", on_cpu=True, adapters=[]).limit_mm_per_prompt == {"image": 3}
    operator = vision.model_copy(update={"engine_args": {"limit_mm_per_prompt": {"image": 1}}})
    assert build_engine_args("v", operator, "/m", on_cpu=True, adapters=[]).limit_mm_per_prompt == {"image": 1}


def test_vision_is_set_on_a_base_model() -> None:
    with pytest.raises(ValidationError, match="LoRA entries take no images"):
        ModelEntry(base="tiny-llama", adapter="/adapters/a", vision=LLAVA)


def test_shipped_vision_models() -> None:
    registry = load_registry()
    vision = {r.model_id: r.entry.vision for r in registry if r.entry.vision is not None}
    assert set(vision) == {
        "llava-1.5-7b",
        "llava-1.5-13b",
        "llava-v1.6-mistral-7b",
        "phi-3-vision-128k-instruct",
        "qwen2-vl-7b-instruct",
    }
    assert vision["phi-3-vision-128k-instruct"].placeholder == "<|image_{n}|>"
    assert vision["qwen2-vl-7b-instruct"].placeholder == "<|vision_start|><|image_pad|><|vision_end|>"
