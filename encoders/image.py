"""Image input: decode any PIL-readable bytes to RGB, then resize / crop / normalise.

`preprocess` reproduces transformers' CLIPImageProcessor (its PIL backend, which is what
runs without torchvision) value for value: shortest side resized with PIL bicubic to
`size` (the long side truncated to an int, as HF does), centre crop, uint8 -> [0, 1] in
float64 then float32, and (x - mean) / std in float32. The last two steps only ever see 256
input values per channel, so they run as one table lookup with the same arithmetic.
Its settings also cover SiglipImageProcessor (`resize="squash"`: both sides to `size`, no
crop) and OpenCLIP's torchvision transforms (`crop_rounding="round"`, bilinear or bicubic);
torchvision's uint8 -> float32 division differs from HF's rescale by at most one float32 ulp.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageValidationError

MAX_PIXELS = 8192 * 8192  # 67 MP (192 MiB as RGB); below PIL's own bomb warning (89 MP), checked before decoding
RESCALE = 1 / 255  # uint8 -> [0, 1], the CLIPImageProcessor default rescale_factor
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL clips these at 255 in convert(); we scale instead
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# shortest: the short side to `size`, then the centre crop; squash: both sides to `size`, aspect ignored, no crop
RESIZE_MODES = ("shortest", "squash")
# The crop's offset (long side - crop) / 2: transformers floors it, torchvision rounds it (half to even)
CROP_ROUNDING = ("floor", "round")


def decode(data: bytes) -> Image.Image:
    """Encoded image bytes (first frame of an animation) -> an RGB PIL image.

    Transparency is composited onto white (as CLIPImageProcessor does), EXIF orientation is
    applied (as transformers' `load_image` does), 16-bit greyscale is scaled to 8 bits.
    Empty, garbage, truncated or oversized input raises ImageValidationError.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageValidationError(f"image data must be bytes, not {type(data).__name__}")
    if len(data) == 0:
        raise ImageValidationError("image data is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageValidationError(
            f"not a recognised image format ({len(data)} bytes, starting {bytes(data[:8])!r})"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageValidationError(f"image is too large: {e}") from None
    except Exception as e:  # PIL's parsers raise many types on hostile input (struct.error, IndexError, ...)
        raise ImageValidationError(f"cannot read image header: {type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageValidationError(
            f"image is too large: {width}x{height} = {width * height} pixels, the limit is {MAX_PIXELS}"
        )
    if width == 0 or height == 0:
        raise ImageValidationError(f"image has no pixels ({width}x{height})")
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)
    except Exception as e:  # as above: any failure to decode these bytes is the input's fault
        raise ImageValidationError(
            f"cannot decode {image.format} image ({width}x{height}): {type(e).__name__}: {e}"
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, compositing transparency onto white like transformers' convert_to_rgb."""
    if image.mode in SIXTEEN_BIT_MODES:
        wide = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        image = Image.fromarray(np.round(wide / 257).astype(np.uint8))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after scaling the short side to `size`; the long side truncates, as in HF."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


@lru_cache(maxsize=16)
def normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: the normalised value of each uint8 level per channel, in HF's exact arithmetic."""
    levels = (np.arange(256, dtype=np.float64) * RESCALE).astype(np.float32)
    return (levels[None, :] - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]


def crop_offset(excess: int, rounding: str) -> int:
    """Where a centre crop starts when the image is `excess` pixels larger than the crop along one side."""
    return excess // 2 if rounding == "floor" else round(excess / 2)


def preprocess(
    image: Image.Image,
    size: int = 224,
    crop_size: int = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    resize: str = "shortest",
    resample: str = "bicubic",
    crop_rounding: str = "floor",
) -> np.ndarray:
    """RGB PIL image -> pixel values (3, crop_size, crop_size) float32.

    size: the short side after resizing (>= crop_size), or with resize="squash" both sides (= crop_size);
    mean, std: per RGB channel; resample: one of RESAMPLE; crop_rounding: one of CROP_ROUNDING.
    """
    if image.mode != "RGB":
        raise ValueError(f"preprocess needs an RGB image (use decode), got mode {image.mode}")
    if resize not in RESIZE_MODES or resample not in RESAMPLE or crop_rounding not in CROP_ROUNDING:
        raise ValueError(f"unknown resize {resize!r}, resample {resample!r} or crop_rounding {crop_rounding!r}")
    if size < crop_size or (resize == "squash" and size != crop_size):
        raise ValueError(f"size ({size}) must be at least crop_size ({crop_size}), and equal it to squash")
    target = (size, size) if resize == "squash" else resized_size(*image.size, size)
    if target != image.size:
        image = image.resize(target, RESAMPLE[resample])
    width, height = target
    top, left = crop_offset(height - crop_size, crop_rounding), crop_offset(width - crop_size, crop_rounding)
    pixels = np.asarray(image)[top : top + crop_size, left : left + crop_size]
    table = normalize_table(tuple(mean), tuple(std))
    out = np.empty((3, crop_size, crop_size), dtype=np.float32)
    for c in range(3):
        np.take(table[c], pixels[..., c], out=out[c])
    return out


def load(data: bytes, **preprocess_config) -> np.ndarray:
    """Encoded image bytes -> pixel values; `preprocess_config` is a store's `preprocess` dict."""
    return preprocess(decode(data), **preprocess_config)
