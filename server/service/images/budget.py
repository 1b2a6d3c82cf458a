"""How many decoded image pixels this server's requests may hold at once.

Image bytes are cheap to hold and pixels are not: a 4,896-byte PNG passes every per-image
limit and decodes to 119 MB of RGB. So requests keep their images encoded while they
wait, decode them only once they hold an engine slot, and must first reserve their pixels
here. When the budget is spent the request is told to come back (429 with Retry-After)
rather than waiting, so memory stays bounded however many requests arrive; a request
that could never fit is told so at once (413). The reservation lives in a context
manager, so it is returned however the request ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from server.errors import OverloadedError, PayloadTooLargeError


class PixelBudget:
    def __init__(self, total: int):
        self.total = total
        self.in_use = 0
        # Smoothed time a reservation is held (decoding plus the engine's processing), for
        # an honest Retry-After.
        self._mean_seconds = 1.0

    def check(self, pixels: int) -> None:
        """413 for images that could never fit, before they cost a model load or a queue place."""
        if pixels > self.total:
            raise PayloadTooLargeError(
                f"the request's images have {pixels} pixels, more than this server decodes at once "
                f"({self.total}); send fewer or smaller images",
                param="images",
            )

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Reserve ``pixels`` for the block, or refuse with 429 when they are not free now."""
        self.check(pixels)
        if self.in_use + pixels > self.total:
            raise OverloadedError(
                f"this server is decoding as many image pixels as it holds at once ({self.total}); retry later",
                param="images",
                retry_after=max(1.0, math.ceil(self._mean_seconds)),
            )
        self.in_use += pixels
        started = time.monotonic()
        try:
            yield
        finally:
            self.in_use -= pixels
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.monotonic() - started)
