"""Image thumbnails for the search page, made on the fly from a stored item's media and kept in memory (least
recently used first out, up to a byte budget); never written to the store or anywhere else."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from PIL import Image, UnidentifiedImageError

from .. import api


class Thumbnails:
    """A bounded in-memory cache of JPEG thumbnails, by item key, content hash and size."""

    MEDIA_TYPE = "image/jpeg"

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._cache: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, root: str, key: str, size: int) -> bytes:
        """The thumbnail (at most `size` px on its longer side) of the image item `key`."""
        found = api.item(root, key)
        if found["modality"] != "image":
            raise api.ItemNotFound(f"item {key} is {found['modality']}, not an image: it has no thumbnail")
        cache_key = (key, found["content_hash"], size)
        with self._lock:
            if cache_key in self._cache:
                self._cache.move_to_end(cache_key)
                return self._cache[cache_key]
        data = make(api.media(root, key).read(), size)
        with self._lock:
            if cache_key not in self._cache and len(data) <= self.max_bytes:
                self._cache[cache_key] = data
                self._bytes += len(data)
                while self._bytes > self.max_bytes:
                    self._bytes -= len(self._cache.popitem(last=False)[1])
        return data


def make(data: bytes, size: int) -> bytes:
    """JPEG bytes of the image `data` shrunk to fit `size` x `size` (never enlarged)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when that still covers `size`
            thumb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise api.QueryError(f"cannot make a thumbnail: {e}") from None
    thumb.thumbnail((size, size))
    out = io.BytesIO()
    thumb.save(out, "JPEG", quality=85)
    return out.getvalue()
