"""Images that need no network: ``data:`` URIs and, where the operator allows, ``file:``.

Both are held to the same byte limit as fetched images. A ``data:`` URI is measured
before decoding, so an oversized one costs no decode. ``file:`` reads only inside the
operator's folder: the path is resolved (symlinks followed) before the containment check
and opened without following a last-moment symlink, so no link can lead outside it.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from server.errors import InvalidRequestError
from server.service.images.policy import ImagePolicy


def read_data_uri(uri: str, policy: ImagePolicy, *, param: str) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise InvalidRequestError("a data: image URL must be base64: data:<media type>;base64,<data>", param=param)
    payload = "".join(payload.split())  # line-wrapped base64 is still base64
    if len(payload) // 4 * 3 > policy.max_bytes:
        raise policy.oversize(param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise InvalidRequestError(f"data: image URL holds malformed base64 ({exc})", param=param) from exc
    if len(data) > policy.max_bytes:
        raise policy.oversize(param=param)
    return data


def read_file_url(url: str, policy: ImagePolicy, *, param: str) -> bytes:
    if policy.file_root is None:
        raise InvalidRequestError("file: image URLs are refused: this server names no folder to read from", param=param)
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # a bracketed host that is not one: file://[x/a.png
        raise InvalidRequestError(f"file: image URL is malformed ({exc})", param=param) from exc
    if parts.netloc not in ("", "localhost"):
        raise InvalidRequestError("a file: image URL must name a local path (file:///...)", param=param)
    name = unquote(parts.path)
    if "\0" in name:  # no path holds one, and os calls raise ValueError on it
        raise InvalidRequestError("a file: image URL must not hold a NUL character", param=param)
    path = Path(name).resolve()
    if not path.is_relative_to(policy.file_root.resolve()):
        raise InvalidRequestError("file: image URL is outside the folder this server reads images from", param=param)
    try:
        # O_NOFOLLOW: a symlink swapped in after resolve(); O_NONBLOCK: a FIFO would hang.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise InvalidRequestError(f"image file could not be opened ({exc.strerror})", param=param) from exc
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InvalidRequestError("file: image URL does not name a regular file", param=param)
        if info.st_size > policy.max_bytes:
            raise policy.oversize(param=param)
        data = file.read(policy.max_bytes + 1)
    if len(data) > policy.max_bytes:
        raise policy.oversize(param=param)
    return data
