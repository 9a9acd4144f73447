"""The embedded default's images, handed from the request to its worker thread in memory.

Both run in one process there: the request has the images decoded, checked and scaled, and
stores them as PNG for the record; the worker thread would read them back from storage and decode
them again for the model (1 ms of the request's path for one small image here). The request
leaves them here instead, and the worker takes them once; the pixels are the ones stored (PNG is
lossless). Whatever is not here (the process restarted, the query runs again, or it waited so long
that newer ones pushed it out) is read from storage as in production, where the worker is another
process and nothing is left here.
"""

import threading
from collections import OrderedDict

from django.conf import settings
from PIL import Image

# Pixels held at most (RGB bytes). A query that never runs (cancelled while queued) leaves its
# images until newer ones push them out.
HELD_BYTES = 64 * 1024 * 1024

_lock = threading.Lock()
_held: OrderedDict[str, tuple[list[Image.Image], int]] = OrderedDict()
_held_bytes = 0


def _size(images: list[Image.Image]) -> int:
    return sum(image.width * image.height * len(image.getbands()) for image in images)


def give(query_id, images: list[Image.Image]) -> None:
    """Leave a committed query's images (RGB, as stored) for its worker thread: embedded only."""
    global _held_bytes
    if not settings.EMBEDDED or not images:
        return
    size = _size(images)
    if size > HELD_BYTES:
        return
    with _lock:
        _held[str(query_id)] = (list(images), size)
        _held_bytes += size
        while _held_bytes > HELD_BYTES:
            _oldest, (_images, dropped) = _held.popitem(last=False)
            _held_bytes -= dropped


def take(query_id) -> list[Image.Image] | None:
    """The query's images if the request left them here (once); None: read them from storage."""
    global _held_bytes
    with _lock:
        entry = _held.pop(str(query_id), None)
        if entry is None:
            return None
        _held_bytes -= entry[1]
        return entry[0]
