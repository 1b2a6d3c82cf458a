"""Images for vision models: from a request's URLs to RGB images, safely.

``load_images`` is the one entry point; ``ImagePolicy.from_settings`` builds its limits.
Nothing here connects to an address the guard (``guard.py``) has not approved.
"""

from server.service.images.guard import Resolver, system_resolve
from server.service.images.load import load_images
from server.service.images.policy import ImagePolicy

__all__ = ["ImagePolicy", "Resolver", "load_images", "system_resolve"]
