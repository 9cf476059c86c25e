"""Synthetic captioned shapes: the data the bundled demo CLIP `shapes-clip` is trained on.

A `Scene` holds every random choice (named attributes and the exact geometry), so
`render(scene)` is a pure function and a seed fixes a whole data set. Captions name the
colour and shape, and sometimes the size, the position and the background, in varied
templates; `build_tokenizer()` gives the word-level tokenizer over exactly those words.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from encoders.vocab import BOS, EOS

IMAGE_SIZE = 64
SUPERSAMPLE = 2  # drawn at 2x, then box-filtered down: anti-aliased edges

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
CLASSES = tuple((c, s) for c in COLOURS for s in SHAPES)  # the 48 colour x shape classes

SIZES = {"small": (8.0, 10.0), "large": (13.0, 16.0)}  # radius range in pixels of the 64 px image
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}

POSITIONS = {  # centre as a fraction of the image side (x, y)
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
POSITION_PHRASES = {
    "top left": ("in the top left", "in the top left corner", "at the top left"),
    "top": ("at the top", "at the top center"),
    "top right": ("in the top right", "in the top right corner", "at the top right"),
    "left": ("on the left", "at the left"),
    "center": ("in the center", "in the middle", "in the centre"),
    "right": ("on the right", "at the right"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "at the bottom center"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "at the bottom right"),
}
POSITION_JITTER = 3.0  # pixels

BACKGROUNDS = {
    "grey": (128, 128, 128),
    "light grey": (195, 195, 195),
    "dark grey": (65, 65, 65),
    "beige": (225, 210, 170),
}
BACKGROUND_WORDS = {
    "grey": ("grey", "gray"),
    "light grey": ("light grey", "light gray"),
    "dark grey": ("dark grey", "dark gray"),
    "beige": ("beige",),
}
MIN_CONTRAST = 100.0  # RGB distance below which a shape colour is not drawn on a background
COLOUR_JITTER = 18
BACKGROUND_JITTER = 8

# `{where}` is a position phrase; every template names the colour and the shape.
TEMPLATES = (
    "a {colour} {shape}",
    "{colour} {shape}",
    "a picture of a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "an image of a {colour} {shape}",
    "a drawing of a {colour} {shape}",
    "the {shape} is {colour}",
    "a {size} {colour} {shape}",
    "a picture of a {size} {colour} {shape}",
    "a {colour} {shape} {where}",
    "there is a {colour} {shape} {where}",
    "a {size} {colour} {shape} {where}",
    "a photo of a {size} {colour} {shape} {where}",
    "a {colour} {shape} on a {background} background",
    "a {size} {colour} {shape} {where} on a {background} background",
)
EXTRA_WORDS = (".", ",")  # so "A red circle." tokenises without unknowns

PAD, UNK = "<pad>", "<unk>"  # pad id 0: what ClipEncoder pads with


@dataclass(frozen=True)
class Scene:
    """One image: its named attributes and the exact geometry they were drawn with."""

    colour: str
    shape: str
    size: str
    position: str
    background: str
    rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]
    cx: float
    cy: float
    radius: float
    angle: float


def _jitter(rgb: tuple[int, int, int], amount: int, rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


def backgrounds_for(colour: str) -> list[str]:
    """The backgrounds a shape of this colour is drawn on: those it stands out from."""
    return [b for b, rgb in BACKGROUNDS.items() if math.dist(rgb, COLOURS[colour]) >= MIN_CONTRAST]


def sample_scene(
    rng: random.Random,
    colour: str | None = None,
    shape: str | None = None,
    size: str | None = None,
    position: str | None = None,
) -> Scene:
    """A random scene; the attributes given are fixed, the rest drawn."""
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    size = size or rng.choice(list(SIZES))
    position = position or rng.choice(list(POSITIONS))
    background = rng.choice(backgrounds_for(colour))
    radius = rng.uniform(*SIZES[size])
    fx, fy = POSITIONS[position]
    lo, hi = radius + 1, IMAGE_SIZE - radius - 1
    cx = min(hi, max(lo, fx * IMAGE_SIZE + rng.uniform(-POSITION_JITTER, POSITION_JITTER)))
    cy = min(hi, max(lo, fy * IMAGE_SIZE + rng.uniform(-POSITION_JITTER, POSITION_JITTER)))
    return Scene(
        colour, shape, size, position, background,
        rgb=_jitter(COLOURS[colour], COLOUR_JITTER, rng),
        background_rgb=_jitter(BACKGROUNDS[background], BACKGROUND_JITTER, rng),
        cx=cx, cy=cy, radius=radius, angle=rng.uniform(0, 2 * math.pi),
    )  # fmt: skip


def scenes(seed: int, n: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def _ngon(k: int, inner: float | None = None) -> list[tuple[float, float]]:
    """Unit-radius regular k-gon pointing up; with `inner`, a k-pointed star of that inner radius."""
    radii = (1.0,) if inner is None else (1.0, inner)
    n = k * len(radii)
    angles = [2 * math.pi * i / n - math.pi / 2 for i in range(n)]
    return [(radii[i % len(radii)] * math.cos(a), radii[i % len(radii)] * math.sin(a)) for i, a in enumerate(angles)]


def _heart(n: int = 32) -> list[tuple[float, float]]:
    """Unit heart, point down: the classic parametric curve, centred on its bounding box."""
    ts = [2 * math.pi * i / n for i in range(n)]
    return [
        (
            16 * math.sin(t) ** 3 / 15,
            (-(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) - 2.7) / 15,
        )
        for t in ts
    ]


_ARM = 0.36  # half-width of the cross's arms, relative to its radius
OUTLINES = {  # unit outlines, scaled so the shapes look about equally big for one radius
    "square": [(x * 0.85, y * 0.85) for x, y in ((-1, -1), (1, -1), (1, 1), (-1, 1))],
    "triangle": [(x * 1.25, y * 1.25 + 0.15) for x, y in _ngon(3)],
    "star": [(x * 1.25, y * 1.25) for x, y in _ngon(5, 0.45)],
    "heart": [(x * 1.1, y * 1.1) for x, y in _heart()],
    "cross": [
        (-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
        (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM),
    ],
}  # fmt: skip


def render(scene: Scene) -> Image.Image:
    """Scene -> a 64x64 RGB image."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), scene.background_rgb)
    draw = ImageDraw.Draw(img)
    cx, cy, r = scene.cx * s, scene.cy * s, scene.radius * s
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=scene.rgb)
    else:
        cos, sin = math.cos(scene.angle), math.sin(scene.angle)
        points = [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in OUTLINES[scene.shape]]
        draw.polygon(points, fill=scene.rgb)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _fix_articles(text: str) -> str:
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = "an" if words[i + 1][0] in "aeiou" else "a"
    return " ".join(words)


def fill(template: str, scene: Scene, rng: random.Random | None = None) -> str:
    """The template filled with the scene's words: random synonyms with `rng`, else the first ones."""
    pick = rng.choice if rng else (lambda options: options[0])
    return _fix_articles(
        template.format(
            colour=scene.colour,
            shape=scene.shape,
            size=pick(SIZE_WORDS[scene.size]),
            where=pick(POSITION_PHRASES[scene.position]),
            background=pick(BACKGROUND_WORDS[scene.background]),
        )
    )


FIELDS = {"colour": "colour", "shape": "shape", "size": "size", "where": "position", "background": "background"}


def mentioned(template: str) -> tuple[str, ...]:
    """The Scene attributes a template's captions state, e.g. ('colour', 'shape', 'size')."""
    return tuple(attr for field, attr in FIELDS.items() if "{" + field + "}" in template)


def random_caption(scene: Scene, rng: random.Random) -> str:
    """A random template filled with random synonyms: the kind of caption the model trains on."""
    return fill(rng.choice(TEMPLATES), scene, rng)


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted."""
    phrases = [t.format(colour="", shape="", size="", where="", background="") for t in TEMPLATES]
    phrases += ["an", *COLOURS, *SHAPES, *EXTRA_WORDS]
    for table in (SIZE_WORDS, POSITION_PHRASES, BACKGROUND_WORDS):
        phrases += [p for ps in table.values() for p in ps]
    return sorted({w for p in phrases for w in p.split()})


def build_tokenizer() -> str:
    """Word-level tokenizer.json text: lowercased, split on whitespace and punctuation, and
    wrapped in CLIP's start / end tokens.

    Laid out like OpenAI's vocabulary, with the end token last: its id is the highest and is
    not 2, so the model pools at it by either rule (`CLIPDims.legacy_eos_pooling` stays off).
    Words outside the vocabulary become <unk>.
    """
    words = [PAD, UNK, *vocabulary(), BOS, EOS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, words.index(BOS)), (EOS, words.index(EOS))]
    )
    return tok.to_str()
