"""Images for vision models: from a request's URLs to RGB images, safely.

``read_images`` reads and checks a request's images without decoding them;
``decode_images`` decodes them later, under a ``PixelBudget`` reservation.
``ImagePolicy.from_settings`` builds the limits. Nothing here connects to an address the
guard (``guard.py``) has not approved.
"""

from server.service.images.budget import PixelBudget
from server.service.images.decode import EncodedImage
from server.service.images.guard import Resolver, system_resolve
from server.service.images.load import decode_images, read_images
from server.service.images.policy import ImagePolicy

__all__ = [
    "EncodedImage",
    "ImagePolicy",
    "PixelBudget",
    "Resolver",
    "decode_images",
    "read_images",
    "system_resolve",
]
