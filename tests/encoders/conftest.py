"""Shared fixtures for encoder tests: real photos (scikit-image's bundled files) (the tiny CLIP is in tests/conftest.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

SKIMAGE_DATA = Path(skimage.data.__file__).parent
# Real photos as their files are: RGB and greyscale PNG, baseline JPEG, RGBA PNG, square and not.
PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "camera.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "logo.png",
)


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """name -> the encoded file bytes of each of PHOTOS."""
    return {name: (SKIMAGE_DATA / name).read_bytes() for name in PHOTOS}


@pytest.fixture(scope="session")
def encode():
    """encode(image or uint8 array, format, **save_options) -> the encoded bytes."""

    def _encode(image: Image.Image | np.ndarray, fmt: str, **options) -> bytes:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        buf = io.BytesIO()
        image.save(buf, fmt, **options)
        return buf.getvalue()

    return _encode
