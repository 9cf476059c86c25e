import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from transformers import CLIPImageProcessorPil

from encoders import image
from encoders.errors import ImageValidationError

MEAN, STD = image.OPENAI_CLIP_MEAN, image.OPENAI_CLIP_STD


def hf_pixels(pil: Image.Image, size: int = 224, crop_size: int = 224) -> np.ndarray:
    """transformers' CLIPImageProcessor (the PIL backend: the one that runs without torchvision)."""
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop_size, "width": crop_size})
    return processor(images=pil, return_tensors="np")["pixel_values"][0]


def open_bytes(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def png_with_size(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR header claims width x height (the pixel data stays tiny)."""
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PNG")
    png = buf.getvalue()
    ihdr = struct.pack(">II", width, height) + png[24:29]
    return png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


# --- parity with transformers ------------------------------------------------------------


@pytest.mark.parametrize("size,crop", [(224, 224), (256, 224), (40, 32)])
def test_photos_match_clip_image_processor(photos, size, crop):
    for name, data in photos.items():
        ours = image.load(data, size=size, crop_size=crop, mean=MEAN, std=STD)
        ref = hf_pixels(open_bytes(data), size, crop)
        assert ours.shape == ref.shape == (3, crop, crop), name
        assert ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= 1e-5, name


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "1", "RGBA", "CMYK"])
def test_pil_modes_match_clip_image_processor(photos, encode, mode):
    base = open_bytes(photos["chelsea.png"]).convert("RGB")
    converted = base.convert(mode)
    if mode in ("LA", "RGBA", "PA"):
        alpha = Image.linear_gradient("L").resize(base.size)  # from transparent to opaque
        converted.putalpha(alpha)
    data = encode(converted, "TIFF" if mode in ("CMYK", "PA") else "PNG")
    assert np.abs(image.load(data) - hf_pixels(open_bytes(data))).max() <= 1e-5


def test_gif_with_transparency_matches_clip_image_processor(encode):
    frame = Image.new("P", (60, 40), 1)
    frame.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    frame.paste(0, (10, 10, 30, 30))
    data = encode(frame, "GIF", transparency=0)
    ours = image.load(data, size=32, crop_size=32)
    assert np.abs(ours - hf_pixels(open_bytes(data), 32, 32)).max() <= 1e-5
    white = image.normalize_table(MEAN, STD)[:, 255]
    assert np.allclose(ours[:, 16, 13], white)  # the transparent square is white


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pixels=st.integers(1, 70).flatmap(
        lambda h: arrays(np.uint8, st.tuples(st.just(h), st.integers(1, 70), st.sampled_from([1, 3])))
    ),
    crop=st.integers(1, 48),
    extra=st.integers(0, 20),
)
def test_random_images_match_clip_image_processor(pixels, crop, extra):
    pil = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    ours = image.preprocess(image.to_rgb(pil), size=crop + extra, crop_size=crop)
    assert np.abs(ours - hf_pixels(pil, crop + extra, crop)).max() <= 1e-5


# --- properties ----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    pixels=arrays(np.uint8, st.tuples(st.integers(1, 90), st.integers(1, 90), st.just(3))),
    crop=st.integers(1, 64),
    extra=st.integers(0, 40),
)
def test_shape_dtype_and_range(pixels, crop, extra):
    out = image.preprocess(Image.fromarray(pixels), size=crop + extra, crop_size=crop)
    assert out.shape == (3, crop, crop) and out.dtype == np.float32 and out.flags.c_contiguous
    assert np.isfinite(out).all()
    low = (0 - np.array(MEAN)) / np.array(STD)
    high = (1 - np.array(MEAN)) / np.array(STD)
    assert (out.min(axis=(1, 2)) >= low - 1e-6).all() and (out.max(axis=(1, 2)) <= high + 1e-6).all()


@settings(max_examples=25, deadline=None)
@given(pixels=arrays(np.uint8, st.tuples(st.integers(1, 60), st.integers(1, 60), st.just(3))))
def test_lossless_formats_give_equal_values(pixels, encode):
    png = image.load(encode(pixels, "PNG"), size=40, crop_size=32)
    for fmt, options in (
        ("BMP", {}),
        ("TIFF", {}),
        ("WEBP", {"lossless": True, "exact": True}),
        ("PNG", {"optimize": True}),
    ):
        assert np.array_equal(image.load(encode(pixels, fmt, **options), size=40, crop_size=32), png), fmt


def test_greyscale_equals_its_rgb_copy(photos, encode):
    grey = np.asarray(open_bytes(photos["camera.png"]))
    assert grey.ndim == 2
    assert np.array_equal(image.load(photos["camera.png"]), image.load(encode(np.stack([grey] * 3, -1), "PNG")))


def test_sixteen_bit_greyscale_is_scaled_not_clipped(photos, encode):
    grey = np.asarray(open_bytes(photos["camera.png"]))
    wide = Image.fromarray(grey.astype(np.uint16) * 257)
    assert wide.mode == "I;16"
    for fmt in ("PNG", "TIFF"):
        assert np.array_equal(image.load(encode(wide, fmt)), image.load(photos["camera.png"])), fmt


def test_cmyk_jpeg_decodes_to_the_right_colours(photos, encode):
    rgb = open_bytes(photos["astronaut.png"]).convert("RGB")
    decoded = image.decode(encode(rgb.convert("CMYK"), "JPEG", quality=95))
    assert decoded.mode == "RGB" and decoded.size == rgb.size
    assert np.abs(np.asarray(decoded, dtype=float) - np.asarray(rgb, dtype=float)).mean() < 3


def test_animated_gif_uses_its_first_frame(encode):
    red, blue = Image.new("RGB", (50, 30), (255, 0, 0)), Image.new("RGB", (50, 30), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100)
    assert open_bytes(data).n_frames == 2
    assert np.asarray(image.decode(data))[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(photos, encode):
    rgb = open_bytes(photos["coffee.png"]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = image.decode(encode(rgb, "JPEG", quality=90, exif=exif))
    upright = image.decode(encode(rgb, "JPEG", quality=90))
    assert rotated.size == (rgb.height, rgb.width)
    assert np.array_equal(np.asarray(rotated), np.asarray(upright.transpose(Image.Transpose.ROTATE_270)))


# --- bad input -----------------------------------------------------------------------------


def test_empty_bytes():
    with pytest.raises(ImageValidationError, match="empty"):
        image.decode(b"")


GARBAGE = [b"hello, world", bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, b"\xff\xd8\xff" + b"\x01" * 64]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_bytes(data):
    with pytest.raises(ImageValidationError):
        image.decode(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_truncated_bytes(photos, encode, fmt):
    data = encode(open_bytes(photos["astronaut.png"]).convert("RGB"), fmt)
    with pytest.raises(ImageValidationError):
        image.decode(data[: len(data) // 2])


def test_not_bytes():
    with pytest.raises(ImageValidationError, match="must be bytes"):
        image.decode("astronaut.png")


@pytest.mark.parametrize("width,height", [(9000, 9000), (20000, 20000), (1, image.MAX_PIXELS + 1)])
def test_decompression_bomb_is_refused_from_the_header(width, height):
    # The pixel data is 4x4: had it been decoded, the error would be a truncation.
    with pytest.raises(ImageValidationError, match="too large"):
        image.decode(png_with_size(width, height))


def test_largest_allowed_size_is_read(encode):
    decoded = image.decode(encode(Image.new("L", (image.MAX_PIXELS // 4096, 4096)), "PNG"))
    assert decoded.size == (image.MAX_PIXELS // 4096, 4096) and decoded.mode == "RGB"


@pytest.mark.parametrize("width,height", [(0, 5), (5, 0)])
def test_zero_size_image(width, height):
    with pytest.raises(ImageValidationError):
        image.decode(png_with_size(width, height))


def test_preprocess_arguments_are_checked():
    with pytest.raises(ValueError, match="RGB"):
        image.preprocess(Image.new("L", (10, 10)))
    with pytest.raises(ValueError, match="crop_size"):
        image.preprocess(Image.new("RGB", (10, 10)), size=20, crop_size=24)


def test_squash_matches_siglip_image_processor():
    """resize="squash": both sides to `size` whatever the aspect ratio, no crop, as SiglipImageProcessor does."""
    from transformers import SiglipImageProcessorPil

    pixels = np.random.default_rng(0).integers(0, 256, (21, 40, 3), dtype=np.uint8)
    ref = SiglipImageProcessorPil(size={"height": 16, "width": 16}, resample=2)(
        images=[Image.fromarray(pixels)], return_tensors="np"
    )["pixel_values"][0]
    out = image.preprocess(Image.fromarray(pixels), 16, 16, [0.5] * 3, [0.5] * 3, resize="squash", resample="bilinear")
    assert np.abs(out - ref).max() <= 1e-6
    with pytest.raises(ValueError, match="equal it to squash"):
        image.preprocess(Image.new("RGB", (10, 10)), 20, 16, resize="squash")
    with pytest.raises(ValueError, match="unknown resize"):
        image.preprocess(Image.new("RGB", (10, 10)), 16, 16, resample="lanczos")
