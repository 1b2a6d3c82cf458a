"""A request's ``images`` -> checked bytes, and later -> decoded RGB images.

Reading and decoding are apart on purpose. ``read_images`` runs before the request takes
a place in the model's queue: all images are read concurrently under one deadline for
the whole request, so a slow host costs a caller at most ``fetch_timeout``, however many
images it names; the first image refused fails the request at once and the other reads
are cancelled. What is kept is the bytes and the header's pixel count, never pixels.
``decode_images`` runs once the request holds its engine slot and its share of the
``PixelBudget``. File reads and Pillow run in worker threads, off the event loop that
serves every other request.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Sequence

import httpx
from PIL import Image as PILImage

from server.errors import InvalidRequestError
from server.protocol.v4 import Image
from server.service.images.decode import EncodedImage, decode_image, inspect_image
from server.service.images.fetch import fetch_url
from server.service.images.guard import Resolver, system_resolve
from server.service.images.local import read_data_uri, read_file_url
from server.service.images.policy import ImagePolicy


async def read_images(
    images: Sequence[Image],
    policy: ImagePolicy,
    *,
    max_images: int,
    params: Sequence[str] | None = None,
    count_param: str = "images",
    resolve: Resolver = system_resolve,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[EncodedImage]:
    """``params`` name each image in errors (default ``images[i].image_url``), and
    ``count_param`` what holds them all. ``resolve`` and ``transport`` replace DNS and the
    network, for tests; callers leave them."""
    if len(images) > max_images:
        raise InvalidRequestError(
            f"this model accepts at most {max_images} image(s) per request; {len(images)} were sent",
            param=count_param,
        )
    names = list(params) if params is not None else [_param(index) for index in range(len(images))]
    # trust_env=False: a proxy from the environment would connect where the guard never looked.
    async with httpx.AsyncClient(
        transport=transport, verify=_tls(), trust_env=False, timeout=policy.fetch_timeout
    ) as client:
        reads = [
            asyncio.ensure_future(_read(image.image_url, client, policy, resolve, names[index]))
            for index, image in enumerate(images)
        ]
        try:
            payloads = await asyncio.wait_for(asyncio.gather(*reads), policy.fetch_timeout)
        except asyncio.TimeoutError:
            raise InvalidRequestError(
                f"reading the request's images took longer than this server's {policy.fetch_timeout:g} s limit",
                param=count_param,
            ) from None
        finally:
            for read in reads:
                read.cancel()
            await asyncio.gather(*reads, return_exceptions=True)
    return await asyncio.gather(
        *(asyncio.to_thread(inspect_image, data, policy, param=names[index]) for index, data in enumerate(payloads))
    )


async def decode_images(images: Sequence[EncodedImage], policy: ImagePolicy) -> list[PILImage.Image]:
    """Decode every image, returning (or failing) only once no thread is decoding any.

    A thread cannot be stopped: were this to return on the first failure or on
    cancellation, the caller would give back its pixel budget while threads still fill it.
    """
    decodes = asyncio.gather(
        *(asyncio.to_thread(decode_image, image, policy) for image in images), return_exceptions=True
    )
    try:
        results = await asyncio.shield(decodes)
    except asyncio.CancelledError:
        await asyncio.wait([decodes])
        raise
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


@functools.cache
def _tls() -> ssl.SSLContext:
    # Loading the CA bundle takes ~20 ms of event-loop time: once per process, not per request.
    return httpx.create_ssl_context()


def _param(index: int) -> str:
    return f"images[{index}].image_url"


async def _read(url: str, client: httpx.AsyncClient, policy: ImagePolicy, resolve: Resolver, param: str) -> bytes:
    scheme = url.partition(":")[0].lower()
    if scheme in ("http", "https"):
        return await fetch_url(url, client, policy, resolve, param=param)
    if scheme == "data":
        return await asyncio.to_thread(read_data_uri, url, policy, param=param)
    if scheme == "file":
        return await asyncio.to_thread(read_file_url, url, policy, param=param)
    raise InvalidRequestError("image URL must be an http, https or data: URL", param=param)
