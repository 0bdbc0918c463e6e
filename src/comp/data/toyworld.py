"""Toyworld: a synthetic, license-free dataset that exercises what CoMP is about.

Scenes of coloured shapes, small words and numbers on images of varied native sizes
(56..448 px a side, aspect 1:4..4:1): what a caption, a transcript or an answer says is
exact, because every record carries its scene (``meta``), and what a probe must read is
small enough that resolution matters. Generation is deterministic for ``(seed, size)``:
each image draws from its own generator seeded by (seed, stream, index), PNGs are written
by Pillow with fixed parameters, JSON with a fixed key order.

Layout of OUT (all JSON paths relative to the file that names them)::

    images/pool/NNNNNN.png           training images shared by the three stages
    data/stage1_captions.json        Stage I: one-turn short captions
    data/stage2_dense.json           Stage II: dense captions
    data/stage2_ocr.jsonl            Stage II: OCR transcripts (JSONL, to exercise that reader)
    data/stage3_qa.json              Stage III: multi-turn QA, incl. two-image and text-only records
    stage1.yaml stage2.yaml stage3.yaml
    probe/<attr>/{train,val,val_hires}/<class>/NNNNN.png   ImageFolder splits, attr in PROBES
    probe/{digit,word}/{train_large,val_large}/<class>/NNNNN.png   the same, large glyphs
    probe/<attr>/<split>.json        [{image, label, meta}] for the same files
    retrieval/images/NNNNN.png, retrieval/captions.json    unique captions per image
    qa_eval/{val,val_hires}/NNNNN.png, qa_eval/questions.json  held-out questions, one image each
    seg/{train,val,val_hires}/images/NNNNN.png, .../annotations/NNNNN.png   segmentation split
    seg/{train,val,val_hires}.json, seg/classes.json   [{image, annotation, meta}]; names of labels 1..K
    manifest.json                    seed, size, counts per file and folder (seg's: seg/classes.json)

Image-folder convention: record ``image`` paths are relative to OUT/images (``pool/...``);
each Stage YAML entry sets ``image_folder: images``, resolved like ``json_path`` against the
YAML's directory, so ``comp data check OUT/stage2.yaml`` needs no ``--image_folder``.
``val_hires`` re-renders the ``val`` scenes at twice the size (vector re-rendering, not
upsampling): resolutions never seen in training, same labels.

Captions carry their image: Stage I captions, Stage II dense captions and the retrieval
captions name each scene's shapes (colour, shape, position), texts and optionally its shape
count and background, in phrasing and order drawn per record, so two captions share few words
beyond what their scenes share.

Resolution matters for the ``digit`` and ``word`` probes and the reading questions: the
probes' single text is 9-12 px (ink 6-9 px tall) in a long scene (320-448 px by a half to a
quarter of that), legible at native size; squeezed into a VFM's fixed square of 112 px nearly every glyph
shrinks below 4 px tall or 2.5 px wide. Their ``train_large`` / ``val_large`` splits show the
same classes as reading scenes (11-18 px text in a ~96-136 px scene), legible at that fixed
size: whether an encoder reads at all. With ``typeset="large"`` (TYPESETS) both are set in
36-44 px type, the size the toy SigLIP can learn to read: reading scenes 112-176 px, the
probes' long scenes as before. ``qa_eval/questions.json`` holds [{id, image, image_hires, type, question, answer,
meta}], types QA_TYPES, asked exactly as the Stage III records ask them; each draws from its
own stream ("qa-eval-<type>"), so it shares no scene with training and adding it changed no
other output.

The segmentation split is in ADE20K's layout (``comp probe --task segmentation``): pool-like
scenes, each with a label map (mode L) drawn by the same calls as the image, without
anti-aliasing: label k is SEG_CLASSES[k - 1] (background, the shapes, word and number ink:
pixels at least half covered by the anti-aliased glyphs), 0 (ignore) only on the glyphs'
rim (ink covering less than half of a pixel: 9-13 px text has few fully inked ones). It has
its own streams and files: the other outputs, manifest.json included, are as before.

Legend: ``bbox`` = [x0, y0, x1, y1] in pixels, x1/y1 exclusive; ``xy`` = text origin
(left, ascender top). Positions are the 3x3 cell of an item's centre, as words
("top left", "top", ..., "center").
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import PIL
import yaml
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38), "orange": (242, 135, 20), "yellow": (232, 200, 24),
    "green": (34, 150, 60), "blue": (36, 84, 210), "purple": (130, 58, 180),
    "pink": (236, 104, 168), "brown": (122, 78, 36),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250), "light grey": (222, 222, 222), "cream": (246, 238, 218),
}
TEXT_RGB = (25, 25, 25)
WORDS = ("apple", "river", "cloud", "stone", "tiger", "piano", "lemon", "house", "train",
         "honey", "maple", "robot", "sugar", "ocean", "pixel", "zebra")
DIGITS = tuple("0123456789")
PROBES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "digit": DIGITS, "word": WORDS,
}
READING_PROBES = ("digit", "word")  # also written with large glyphs (train_large, val_large)
# Segmentation classes: label k (1-based; 0 = ignore) is SEG_CLASSES[k - 1].
SEG_CLASSES = ("background", *SHAPES, "word", "number")
# Held-out QA: the Stage III question types an evaluation scores (``typed_qa_pairs``).
QA_TYPES = ("colour", "shape", "position", "count", "number", "word")
SIDE_MIN, SIDE_MAX = 56, 448
TEXT_SIZES = (8, 9, 10, 11, 12, 13)  # pool text, px: small enough that downsampling hurts
WIDE_SIDE = (320, 448)  # the reading probes' long side, px: a fixed-size squeeze shrinks >= 2.8x
MARGIN = 2  # px kept free around every item
HIRES_SCALE = 2


@dataclass(frozen=True)
class Typeset:
    """The type of the reading material, px: the digit and word probes' single text (in a long
    scene, WIDE_SIDE), the reading scenes' text and those scenes' sides."""
    probe: tuple[int, ...]
    reading: tuple[int, ...]
    reading_side: tuple[int, int]


TYPESETS = {
    # legible squeezed to ~112 px in a reading scene (which barely distorts it); small in the
    # probes' long scenes. The toy SigLIP does not learn to read it (docs/results/demo-claims.md).
    "small": Typeset(probe=(9, 10, 11, 12), reading=(11, 12, 13, 14, 16, 18), reading_side=(96, 136)),
    # a few 14 px patches tall, which the toy SigLIP does learn to read; in a probe's long scene
    # natively as large as in a reading scene at 112 px, squeezed narrower than any of those and
    # distorted 2-4x in aspect (a reading scene's squeeze: < 1.6x)
    "large": Typeset(probe=(36, 40, 44), reading=(36, 40, 44), reading_side=(112, 176)),
}
SIZES: dict[str, dict[str, int]] = {
    # pool images, probe images per class (train / val), retrieval pairs, Stage III extras
    # and held-out QA questions per type
    "small": dict(pool=300, probe_train=40, probe_val=20, retrieval=100, multi=16, text_only=16,
                  qa_eval=20, seg_train=100, seg_val=40),
    "medium": dict(pool=3000, probe_train=100, probe_val=50, retrieval=500, multi=120,
                   text_only=120, qa_eval=50, seg_train=1000, seg_val=200),
}
OUTPUTS = ("images", "data", "probe", "retrieval", "qa_eval", "seg", "stage1.yaml", "stage2.yaml",
           "stage3.yaml", "manifest.json")


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    position: str
    bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class Text:
    text: str
    kind: str  # "word" | "number"
    position: str
    bbox: tuple[int, int, int, int]
    xy: tuple[int, int]
    font_size: int


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    objects: tuple[Shape, ...]
    texts: tuple[Text, ...]

    def meta(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- geometry and layout

def position_word(cx: float, cy: float, width: int, height: int) -> str:
    """The 3x3 cell of a point as words: "top left", "top", ..., "center"."""
    row = ("top", "", "bottom")[min(2, int(3 * cy / height))]
    col = ("left", "", "right")[min(2, int(3 * cx / width))]
    return " ".join(w for w in (row, col) if w) or "center"


def position_phrase(position: str) -> str:
    single = {"center": "in the center", "top": "at the top", "bottom": "at the bottom",
              "left": "on the left", "right": "on the right"}
    return single.get(position, f"in the {position}")


def sample_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): short side 56..224, aspect log-uniform in 1:4..4:1, long side <= 448."""
    aspect = math.exp(rng.uniform(-math.log(4), math.log(4)))
    short = int(rng.integers(SIDE_MIN, 225))
    long = min(SIDE_MAX, round(short * max(aspect, 1 / aspect)))
    return (long, short) if aspect >= 1 else (short, long)


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def text_bbox(text: str, xy: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = font(size).getbbox(text, anchor="lt")
    return (xy[0] + int(x0), xy[1] + int(y0), xy[0] + math.ceil(x1), xy[1] + math.ceil(y1))


def _overlaps(a: Sequence[int], b: Sequence[int]) -> bool:
    return (a[0] < b[2] + MARGIN and b[0] < a[2] + MARGIN
            and a[1] < b[3] + MARGIN and b[1] < a[3] + MARGIN)


def _centre(bbox: Sequence[int]) -> tuple[float, float]:
    return (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2


def compose(rng: np.random.Generator, width: int, height: int, shapes: Sequence[tuple[str, str]],
            texts: Sequence[tuple[str, str, int]]) -> Scene | None:
    """Place shapes (shape, colour) and texts (text, kind, font_size) in distinct 3x3 cells.

    A shape stays inside its cell; a text is centred on its cell (it may be wider than the
    cell) and must stay inside the image and clear of every other item. None when a text
    fits nowhere: the caller draws a new scene."""
    cell_w, cell_h = width / 3, height / 3
    cells = [divmod(int(i), 3) for i in rng.permutation(9)]
    objects = []
    for (shape, colour), (row, col) in zip(shapes, cells):
        side = int(rng.uniform(0.5, 0.9) * min(cell_w, cell_h))
        x0 = int(col * cell_w + rng.uniform(0, cell_w - side))
        y0 = int(row * cell_h + rng.uniform(0, cell_h - side))
        bbox = (x0, y0, x0 + side, y0 + side)
        objects.append(Shape(shape, colour, position_word(*_centre(bbox), width, height), bbox))
    free = cells[len(shapes):]
    placed: list[Text] = []
    for text, kind, size in texts:
        ox, oy, x1, y1 = text_bbox(text, (0, 0), size)  # ink box relative to the origin
        w, h = x1 - ox, y1 - oy
        for row, col in list(free):
            x = int(np.clip((col + 0.5) * cell_w - w / 2, MARGIN, width - w - MARGIN)) - ox
            y = int(np.clip((row + 0.5) * cell_h - h / 2, MARGIN, height - h - MARGIN)) - oy
            bbox = text_bbox(text, (x, y), size)
            inside = bbox[0] >= 0 and bbox[1] >= 0 and bbox[2] <= width and bbox[3] <= height
            if inside and not any(_overlaps(bbox, o.bbox) for o in [*objects, *placed]):
                placed.append(Text(text, kind, position_word(*_centre(bbox), width, height),
                                   bbox, (x, y), size))
                free.remove((row, col))
                break
        else:
            return None
    background = str(rng.choice(list(BACKGROUNDS)))
    return Scene(width, height, background, tuple(objects), tuple(placed))


def scale_scene(scene: Scene, k: int) -> Scene:
    """The same scene k times larger (fonts k times larger, text boxes re-measured)."""
    objects = tuple(replace(o, bbox=tuple(v * k for v in o.bbox)) for o in scene.objects)
    texts = []
    for t in scene.texts:
        xy = (t.xy[0] * k, t.xy[1] * k)
        texts.append(replace(t, xy=xy, font_size=t.font_size * k,
                             bbox=text_bbox(t.text, xy, t.font_size * k)))
    return replace(scene, width=scene.width * k, height=scene.height * k,
                   objects=objects, texts=tuple(texts))


# ---------------------------------------------------------------- rendering

def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, bbox: Sequence[int], rgb: tuple) -> None:
    x0, y0, x1, y1 = bbox
    s = x1 - x0
    cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=rgb)
    elif shape == "star":
        radii = [(s - 1) / 2, (s - 1) / 5]
        draw.polygon([(cx + radii[i % 2] * math.cos(math.pi * (i / 5 - 0.5)),
                       cy + radii[i % 2] * math.sin(math.pi * (i / 5 - 0.5))) for i in range(10)],
                     fill=rgb)
    elif shape == "cross":
        arm = s // 3
        draw.rectangle((x0 + arm, y0, x1 - 1 - arm, y1 - 1), fill=rgb)
        draw.rectangle((x0, y0 + arm, x1 - 1, y1 - 1 - arm), fill=rgb)
    elif shape == "ring":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), outline=rgb, width=max(2, s // 5))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        _draw_shape(draw, o.shape, o.bbox, COLOURS[o.colour])
    for t in scene.texts:
        draw.text(t.xy, t.text, fill=TEXT_RGB, font=font(t.font_size), anchor="lt")
    return image


def render_labels(scene: Scene) -> Image.Image:
    """The scene's label map (mode L, values as SEG_CLASSES + 1): ``render``'s draw calls
    with class ids for colours. Shapes are not anti-aliased, so their pixels match the image
    exactly; text is: a pixel at least half inked is the text's class, a less inked one 0."""
    labels = Image.new("L", (scene.width, scene.height), SEG_CLASSES.index("background") + 1)
    draw = ImageDraw.Draw(labels)
    for o in scene.objects:
        _draw_shape(draw, o.shape, o.bbox, SEG_CLASSES.index(o.shape) + 1)
    if not scene.texts:
        return labels
    ink = Image.new("L", labels.size, 0)
    ink_draw = ImageDraw.Draw(ink)
    label_HW = np.array(labels)
    for t in scene.texts:
        ink_draw.rectangle((0, 0, *ink.size), fill=0)
        ink_draw.text(t.xy, t.text, fill=255, font=font(t.font_size), anchor="lt")
        ink_HW = np.asarray(ink)
        label_HW[ink_HW >= 128] = SEG_CLASSES.index(t.kind) + 1
        label_HW[(ink_HW > 0) & (ink_HW < 128)] = 0
    return Image.fromarray(label_HW, mode="L")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ---------------------------------------------------------------- scenes per use

def rng_for(seed: int, stream: str, index: int) -> np.random.Generator:
    """Independent generator per image: a scene does not depend on how many came before."""
    stream_id = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:4], "little")
    return np.random.default_rng([seed, stream_id, index])


def _text_spec(rng: np.random.Generator) -> tuple[str, str, int]:
    size = int(rng.choice(TEXT_SIZES))
    if rng.random() < 0.5:
        return str(rng.choice(WORDS)), "word", size
    return str(int(rng.integers(0, 1000))), "number", size


def _distinct(rng: np.random.Generator, options: Sequence[str], k: int,
              exclude: str | None = None) -> list[str]:
    pool = [o for o in options if o != exclude]
    return [pool[i] for i in rng.permutation(len(pool))[:k]]


def _until_placed(rng: np.random.Generator, draw: Callable[[], Scene | None]) -> Scene:
    while (scene := draw()) is None:
        pass
    return scene


def pool_scene(rng: np.random.Generator) -> Scene:
    """1-3 shapes (distinct shapes and colours, so questions are unambiguous), 0-2 texts."""
    def draw() -> Scene | None:
        w, h = sample_size(rng)
        n = int(rng.integers(1, 4))
        shapes = list(zip(_distinct(rng, SHAPES, n), _distinct(rng, list(COLOURS), n)))
        texts = [_text_spec(rng) for _ in range(int(rng.choice([0, 1, 1, 2])))]
        return compose(rng, w, h, shapes, texts)
    return _until_placed(rng, draw)


def wide_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of a long scene: long side in WIDE_SIDE, aspect log-uniform in
    2:1..4:1, wide or tall. Squeezed into a square, its long axis shrinks >= 2.8x (small text
    becomes illegible) while the image keeps about as many native tokens as a pool image."""
    long = int(rng.integers(WIDE_SIDE[0], WIDE_SIDE[1] + 1))
    short = max(SIDE_MIN, round(long / math.exp(rng.uniform(math.log(2), math.log(4)))))
    return (long, short) if rng.random() < 0.5 else (short, long)


def reading_text(rng: np.random.Generator, kind: str) -> str:
    """A word of WORDS, or a number of 1 digit (70% of the time) or 2."""
    if kind == "word":
        return str(rng.choice(WORDS))
    digits = 1 if rng.random() < 0.7 else 2
    return str(int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits)))


def reading_scene(rng: np.random.Generator, kind: str, text: str | None = None,
                  typeset: str = "small") -> Scene:
    """A small scene (the typeset's reading_side px a side) with 0-2 shapes and one text of
    ``kind`` (``text``, else drawn) in its reading type: still legible squeezed into a VFM's
    fixed square of ~112 px, which the probes' text in a long scene is not. What a fixed-size
    encoder can learn to read from."""
    ts = TYPESETS[typeset]

    def draw() -> Scene | None:
        w, h = (int(v) for v in rng.integers(ts.reading_side[0], ts.reading_side[1] + 1, size=2))
        n = int(rng.integers(0, 3))
        shapes = list(zip(_distinct(rng, SHAPES, n), _distinct(rng, list(COLOURS), n)))
        label = text if text is not None else reading_text(rng, kind)
        return compose(rng, w, h, shapes, [(label, kind, int(rng.choice(ts.reading)))])
    return _until_placed(rng, draw)


def probe_scene(rng: np.random.Generator, attribute: str, label: str, large: bool = False,
                typeset: str = "small") -> Scene:
    """A scene whose ``attribute`` is ``label``: one main shape (shape/colour probes, with an
    optional word as distractor) or one digit or word (with 0-2 distractor shapes): small
    (the typeset's probe type) in a long scene (``wide_size``), or with ``large`` a reading
    scene."""
    if attribute not in PROBES:
        raise ValueError(f"unknown probe attribute {attribute!r}; expected one of {list(PROBES)}")
    kind = "number" if attribute == "digit" else "word"
    if large:
        if attribute not in READING_PROBES:
            raise ValueError(f"large glyphs exist for {READING_PROBES}, not {attribute!r}")
        return reading_scene(rng, kind, label, typeset)

    def draw() -> Scene | None:
        if attribute in READING_PROBES:
            w, h = wide_size(rng)
            n = int(rng.integers(0, 3))
            shapes = list(zip(_distinct(rng, SHAPES, n), _distinct(rng, list(COLOURS), n)))
            return compose(rng, w, h, shapes, [(label, kind, int(rng.choice(TYPESETS[typeset].probe)))])
        w, h = sample_size(rng)
        shape = label if attribute == "shape" else str(rng.choice(SHAPES))
        colour = label if attribute == "colour" else str(rng.choice(list(COLOURS)))
        texts = [(str(rng.choice(WORDS)), "word", int(rng.choice(TEXT_SIZES)))] \
            if rng.random() < 0.5 else []
        return compose(rng, w, h, [(shape, colour)], texts)
    return _until_placed(rng, draw)


# ---------------------------------------------------------------- language

def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _text_name(t: Text) -> str:
    return f'the word "{t.text}"' if t.kind == "word" else f"the number {t.text}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _amount(n: int, noun: str, rng: np.random.Generator | None) -> str:
    """``n`` nouns, in words or digits: "two shapes", "1 shape"."""
    count = COUNT_WORDS[n] if rng is None or n >= len(COUNT_WORDS) or rng.random() < 0.5 else str(n)
    return f"{count} {noun}{'' if n == 1 else 's'}"


# How a caption names a shape (o) and a text (t); the first form is the canonical one
# (``short_caption(scene)`` without a generator), which the zero-shot prompts also use.
SHAPE_FORMS: tuple[Callable[[Shape, str], str], ...] = (
    lambda o, size: f"{_article(size or o.colour)} {size}{o.colour} {o.shape} {position_phrase(o.position)}",
    lambda o, size: f"{size}{o.colour} {o.shape}, {o.position}",
    lambda o, size: f"{_article(size or o.shape)} {size}{o.shape} in {o.colour} {position_phrase(o.position)}",
    lambda o, size: f"{position_phrase(o.position)} {_article(size or o.colour)} {size}{o.colour} {o.shape}",
    lambda o, size: f"{size}{o.colour} {o.shape} ({o.position})",
)
TEXT_FORMS: tuple[Callable[[Text], str], ...] = (
    _text_name,
    lambda t: f'{_text_name(t)} {position_phrase(t.position)}',
    lambda t: f'"{t.text}" written {position_phrase(t.position)}',
    lambda t: f"{t.kind} {t.text} ({t.position})",
    lambda t: f'{position_phrase(t.position)} the {t.kind} "{t.text}"',
)
COUNT_WORDS = ("no", "one", "two", "three", "four", "five")


def _pick(rng: np.random.Generator | None, n: int) -> int:
    return 0 if rng is None else int(rng.integers(n))


def short_caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """What the scene shows, each shape (colour, shape, position) and text named. With a
    generator the phrasing, the order and the extras (shape count, background) vary, so
    captions share few words beyond what their scenes share; without one, the canonical
    form ("a red circle on the left and the number 47.")."""
    form = _pick(rng, len(SHAPE_FORMS))
    shape_form, text_form = SHAPE_FORMS[form], TEXT_FORMS[_pick(rng, len(TEXT_FORMS))]
    shapes = [shape_form(o, "") for o in scene.objects]
    texts = [text_form(t) for t in scene.texts]
    if rng is None:
        return _join(shapes + texts) + "."
    items = shapes + texts
    if rng.random() < 0.5:
        items = [items[int(i)] for i in rng.permutation(len(items))]
    # a form with a comma inside ("red circle, left") is listed with semicolons
    body = _join(items) if rng.random() < 0.5 and form != 1 else "; ".join(items)
    extras = int(rng.integers(4))  # 0 none, 1 count, 2 background, 3 both
    if extras & 1:
        body = f"{_amount(len(scene.objects), 'shape', rng)}: {body}"
    if extras & 2:
        body = f"{body}, on {scene.background}" if rng.random() < 0.5 else \
            f"{scene.background} background, {body}"
    return body + "."


def size_word(scene: Scene, o: Shape) -> str:
    """Relative to the short side (shapes span 0.17..0.30 of it)."""
    frac = (o.bbox[2] - o.bbox[0]) / min(scene.width, scene.height)
    return "small" if frac < 0.21 else "medium-sized" if frac < 0.26 else "large"


def reading_order(scene: Scene) -> list[list[Text]]:
    """Lines of text, top to bottom (by 3x3 row of the centre), each left to right."""
    lines: dict[int, list[Text]] = {}
    for t in scene.texts:
        row = min(2, int(3 * _centre(t.bbox)[1] / scene.height))
        lines.setdefault(row, []).append(t)
    return [sorted(lines[r], key=lambda t: t.bbox[0]) for r in sorted(lines)]


def transcript(scene: Scene) -> str:
    return "\n".join(" ".join(t.text for t in line) for line in reading_order(scene))


def dense_caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Every shape with its size, colour and position, every text with its position, the
    reading order and the image's size and background; with a generator in varied phrasing
    and sentence order (without one, the canonical form)."""
    w, h = scene.width, scene.height
    frame = "wide" if w > 1.2 * h else "tall" if h > 1.2 * w else "roughly square"
    shape_form = SHAPE_FORMS[_pick(rng, len(SHAPE_FORMS))]
    shapes = [shape_form(o, size_word(scene, o) + " ") for o in scene.objects]
    n = len(scene.objects)
    header = [f"A {frame} {w}x{h} image with a {scene.background} background.",
              f"The image is {w} by {h} pixels, {frame}, on {scene.background}.",
              f"Background {scene.background}; size {w}x{h} ({frame})."][_pick(rng, 3)]
    form = _pick(rng, 3)
    if not shapes:
        listing = "There are no shapes."
    elif form == 0:
        listing = f"It shows {_amount(n, 'shape', rng)}: {_join(shapes)}."
    elif form == 1:
        listing = " ".join(f"{s[0].upper()}{s[1:]}." for s in shapes)
    else:
        listing = f"{_amount(n, 'shape', rng).capitalize()}: {'; '.join(shapes)}."
    if scene.texts:
        order = " / ".join(transcript(scene).split("\n"))
        form = _pick(rng, 3)
        writing = [[f"{_text_name(t).capitalize()} is written {position_phrase(t.position)}." for t in scene.texts]
                   + [f"Reading order: {order}."],
                   [f"{position_phrase(t.position).capitalize()} it says {t.text} ({t.kind})." for t in scene.texts]
                   + [f"In reading order: {order}."],
                   [f"Text: {_join([f'{t.kind} {t.text} {position_phrase(t.position)}' for t in scene.texts])}; "
                    + f"read as {order}."]][form]
    else:
        writing = [["There is no text."], ["Nothing is written."], ["No text."]][_pick(rng, 3)]
    body = [listing, *writing]
    if rng is not None and rng.random() < 0.5:
        body = [*writing, listing]
    if rng is not None and rng.random() < 0.3:
        return " ".join([*body, header])
    return " ".join([header, *body])


def typed_qa_pairs(rng: np.random.Generator, scene: Scene) -> list[tuple[str, str, str]]:
    """Every exact question the scene answers as (type, question, answer); types in
    QA_TYPES. The Stage III records and the held-out QA set both draw from here, so a
    trained model meets the evaluation questions in the phrasing it learned."""
    pairs = [("count", "How many shapes are there in the image?", str(len(scene.objects))),
             ("has_text", "Is there any text in the image?", "yes" if scene.texts else "no")]
    for o in scene.objects:
        pairs += [("colour", f"What colour is the {o.shape}?", o.colour),
                  ("position", f"Where is the {o.shape}?", o.position),
                  ("shape", f"Which shape is {o.colour}?", f"the {o.shape}")]
    probe = str(rng.choice(SHAPES))
    present = any(o.shape == probe for o in scene.objects)
    pairs.append(("has_shape", f"Is there a {probe} in the image?", "yes" if present else "no"))
    for kind in ("number", "word"):
        found = [t for t in scene.texts if t.kind == kind]
        if len(found) == 1:
            pairs.append((kind, f"What {kind} is written in the image?", found[0].text))
    return pairs


def qa_pairs(rng: np.random.Generator, scene: Scene) -> list[tuple[str, str]]:
    """Every exact question the scene answers; the caller samples a few."""
    return [(q, a) for _, q, a in typed_qa_pairs(rng, scene)]


# ---------------------------------------------------------------- records

CAPTION_PROMPTS = ("Describe the image briefly.", "Write a short caption for this image.",
                   "What is in the picture?")
DENSE_PROMPTS = ("Describe the image in detail.", "Give a detailed description of every "
                 "shape and every piece of text in the image.")
OCR_PROMPTS = ("Transcribe the text in the image.", "What is written in the image?",
               "Read all the text in the image, in reading order.")


def _turns(pairs: Sequence[tuple[str, str]], prefix: str) -> list[dict]:
    conversations = []
    for i, (question, answer) in enumerate(pairs):
        conversations += [{"from": "human", "value": (prefix if i == 0 else "") + question},
                          {"from": "gpt", "value": answer}]
    return conversations


def _record(rid: str, images: Sequence[str], conversations: list[dict], task: str,
            scenes: Sequence[Scene]) -> dict:
    record: dict = {"id": rid}
    if len(images) == 1:
        record["image"] = images[0]
    elif images:
        record["image"] = list(images)
    record["conversations"] = conversations
    record["meta"] = {"task": task, "scenes": [s.meta() for s in scenes]}
    return record


def caption_record(rng: np.random.Generator, rid: str, image: str, scene: Scene) -> dict:
    """Stage I; like BLIP-558K the placeholder is sometimes after the prompt."""
    prompt = str(rng.choice(CAPTION_PROMPTS))
    value = f"<image>\n{prompt}" if rng.random() < 0.7 else f"{prompt}\n<image>"
    return _record(rid, [image], [{"from": "human", "value": value},
                                  {"from": "gpt", "value": short_caption(scene, rng)}],
                   "caption", [scene])


def dense_record(rng: np.random.Generator, rid: str, image: str, scene: Scene) -> dict:
    pairs = [(str(rng.choice(DENSE_PROMPTS)), dense_caption(scene, rng))]
    return _record(rid, [image], _turns(pairs, "<image>\n"), "dense_caption", [scene])


def ocr_record(rng: np.random.Generator, rid: str, image: str, scene: Scene) -> dict:
    pairs = [(str(rng.choice(OCR_PROMPTS)), transcript(scene))]
    return _record(rid, [image], _turns(pairs, "<image>\n"), "ocr", [scene])


def qa_record(rng: np.random.Generator, rid: str, image: str, scene: Scene) -> dict:
    pairs = qa_pairs(rng, scene)
    chosen = [pairs[i] for i in rng.permutation(len(pairs))[:int(rng.integers(2, 5))]]
    return _record(rid, [image], _turns(chosen, "<image>\n"), "qa", [scene])


def multi_image_record(rng: np.random.Generator, rid: str, images: Sequence[str],
                       scenes: Sequence[Scene]) -> dict:
    a, b = (len(s.objects) for s in scenes)
    more = "the first image" if a > b else "the second image" if b > a else \
        "neither, both have the same number"
    pairs = [("Which image has more shapes?", more),
             ("How many shapes are there in the two images together?", str(a + b))]
    o = scenes[1].objects[int(rng.integers(len(scenes[1].objects)))]
    pairs.append((f"What colour is the {o.shape} in the second image?", o.colour))
    chosen = [pairs[i] for i in sorted(rng.permutation(3)[:2])]
    return _record(rid, images, _turns(chosen, "Image 1: <image>\nImage 2: <image>\n"),
                   "multi_image_qa", scenes)


def text_only_record(rng: np.random.Generator, rid: str) -> dict:
    """No image: the pipeline must train on these without an alignment target."""
    a, b = (int(v) for v in rng.integers(0, 50, size=2))
    shape = str(rng.choice(("triangle", "square", "star")))
    facts = {"triangle": ("How many corners does a triangle have?", "3"),
             "square": ("How many sides does a square have?", "4"),
             "star": ("How many points does a star in this world have?", "5")}
    pairs = [(f"What is {a} plus {b}?", str(a + b)), facts[shape]]
    return _record(rid, [], _turns(pairs, ""), "text_qa", [])


# ---------------------------------------------------------------- writing

def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n"
                            for r in records))


def _write_png(path: Path, scene: Scene) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(render(scene)))


def _prepare(out: Path) -> None:
    """OUT must be new, empty, or an earlier toyworld output (whose entries are replaced)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; choose a new output folder")
    if out.is_dir() and any(out.iterdir()):
        manifest = out / "manifest.json"
        try:
            ours = json.loads(manifest.read_text()).get("name") == "toyworld"
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ValueError(f"{out}: not empty and not a toyworld output (no manifest.json "
                             "naming toyworld); choose an empty or new folder")
        for name in OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_pool(out: Path, seed: int, n: int, counts: dict) -> tuple[list[str], list[Scene]]:
    paths, scenes = [], []
    for i in range(n):
        scene = pool_scene(rng_for(seed, "pool", i))
        paths.append(f"pool/{i:06d}.png")
        scenes.append(scene)
        _write_png(out / "images" / paths[-1], scene)
    counts["images/pool"] = n
    return paths, scenes


def _write_stages(out: Path, seed: int, spec: dict, paths: list[str], scenes: list[Scene],
                  counts: dict) -> None:
    stage1 = [caption_record(rng_for(seed, "stage1", i), f"tw-s1-{i:06d}", p, s)
              for i, (p, s) in enumerate(zip(paths, scenes))]
    dense = [dense_record(rng_for(seed, "stage2-dense", i), f"tw-s2d-{i:06d}", p, s)
             for i, (p, s) in enumerate(zip(paths, scenes))]
    ocr = [ocr_record(rng_for(seed, "stage2-ocr", i), f"tw-s2o-{i:06d}", p, s)
           for i, (p, s) in enumerate(zip(paths, scenes)) if s.texts]
    stage3 = [qa_record(rng_for(seed, "stage3", i), f"tw-s3-{i:06d}", p, s)
              for i, (p, s) in enumerate(zip(paths, scenes))]
    for i in range(spec["multi"]):
        rng = rng_for(seed, "stage3-multi", i)
        pair = [int(j) for j in rng.choice(len(paths), size=2, replace=False)]
        stage3.append(multi_image_record(rng, f"tw-s3m-{i:06d}", [paths[j] for j in pair],
                                         [scenes[j] for j in pair]))
    stage3 += [text_only_record(rng_for(seed, "stage3-text", i), f"tw-s3t-{i:06d}")
               for i in range(spec["text_only"])]
    # Interleave the extras with the QA records, as a real mixture would hold them.
    order = rng_for(seed, "stage3-order", 0).permutation(len(stage3))
    stage3 = [stage3[int(i)] for i in order]
    files = {"data/stage1_captions.json": stage1, "data/stage2_dense.json": dense,
             "data/stage2_ocr.jsonl": ocr, "data/stage3_qa.json": stage3}
    for name, records in files.items():
        (_write_jsonl if name.endswith(".jsonl") else _write_json)(out / name, records)
        counts[name] = len(records)
    stages = {"stage1.yaml": ["data/stage1_captions.json"],
              "stage2.yaml": ["data/stage2_dense.json", "data/stage2_ocr.jsonl"],
              "stage3.yaml": ["data/stage3_qa.json"]}
    for name, jsons in stages.items():
        doc = {"datasets": [{"json_path": j, "sampling_strategy": "all", "image_folder": "images"}
                            for j in jsons]}
        (out / name).write_text(yaml.safe_dump(doc, sort_keys=False))


def _write_probes(out: Path, seed: int, spec: dict, counts: dict, typeset: str = "small") -> None:
    """Every probe's train / val (+ val_hires) splits, and the reading probes' large-glyph
    train_large / val_large (own streams: the other splits are drawn as without them)."""
    for attribute, classes in PROBES.items():
        splits = [("train", spec["probe_train"], False), ("val", spec["probe_val"], False)]
        if attribute in READING_PROBES:
            splits += [("train_large", spec["probe_train"], True), ("val_large", spec["probe_val"], True)]
        for split, per_class, large in splits:
            n = per_class * len(classes)
            stream = f"probe-{attribute}-{split}"
            scenes = [(classes[i % len(classes)],
                       probe_scene(rng_for(seed, stream, i), attribute, classes[i % len(classes)], large, typeset))
                      for i in range(n)]
            variants = [(split, 1)] + ([("val_hires", HIRES_SCALE)] if split == "val" else [])
            for name, k in variants:
                entries = []
                for i, (label, scene) in enumerate(scenes):
                    scene = scale_scene(scene, k) if k != 1 else scene
                    rel = f"{name}/{label}/{i:05d}.png"
                    _write_png(out / "probe" / attribute / rel, scene)
                    entries.append({"image": rel, "label": label, "meta": scene.meta()})
                _write_json(out / "probe" / attribute / f"{name}.json", entries)
                counts[f"probe/{attribute}/{name}"] = len(entries)


def qa_eval_item(rng: np.random.Generator, qtype: str) -> tuple[Scene, str, str]:
    """(scene, question, answer) of type ``qtype``: a pool-like scene (drawn again until it
    answers that type: exactly one number or word for reading) and one of its questions."""
    if qtype not in QA_TYPES:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QA_TYPES}")
    while True:
        scene = pool_scene(rng)
        found = [(q, a) for t, q, a in typed_qa_pairs(rng, scene) if t == qtype]
        if found:
            question, answer = found[int(rng.integers(len(found)))]
            return scene, question, answer


def _write_qa_eval(out: Path, seed: int, per_type: int, counts: dict) -> None:
    """Held-out questions, one image each, ``per_type`` of every QA_TYPES type, each image
    also rendered at HIRES_SCALE x its size (``image_hires``)."""
    entries = []
    for qtype in QA_TYPES:
        for i in range(per_type):
            scene, question, answer = qa_eval_item(rng_for(seed, f"qa-eval-{qtype}", i), qtype)
            n = len(entries)
            paths = {"image": f"val/{n:05d}.png", "image_hires": f"val_hires/{n:05d}.png"}
            _write_png(out / "qa_eval" / paths["image"], scene)
            _write_png(out / "qa_eval" / paths["image_hires"], scale_scene(scene, HIRES_SCALE))
            entries.append({"id": f"tw-qa-{qtype}-{i:04d}", **paths, "type": qtype,
                            "question": question, "answer": answer, "meta": scene.meta()})
    _write_json(out / "qa_eval" / "questions.json", entries)
    counts["qa_eval/questions.json"] = len(entries)
    counts["qa_eval/val"] = counts["qa_eval/val_hires"] = len(entries)


def _write_retrieval(out: Path, seed: int, n: int, counts: dict) -> None:
    """Pool-like scenes with pairwise distinct content (canonical captions), so each caption
    has one right image; captions and dense captions phrased as Stage I and II phrase them."""
    entries, seen, i = [], set(), 0
    while len(entries) < n:
        scene = pool_scene(rng_for(seed, "retrieval", i))
        i += 1
        if short_caption(scene) in seen:
            continue
        seen.add(short_caption(scene))
        rel = f"images/{len(entries):05d}.png"
        _write_png(out / "retrieval" / rel, scene)
        rng = rng_for(seed, "retrieval-caption", len(entries))
        entries.append({"image": rel, "caption": short_caption(scene, rng),
                        "dense_caption": dense_caption(scene, rng), "meta": scene.meta()})
    _write_json(out / "retrieval" / "captions.json", entries)
    counts["retrieval/captions.json"] = n


def write_seg(out: str | Path, seed: int, n_train: int, n_val: int) -> dict[str, int]:
    """The segmentation split under ``out`` (toyworld's OUT/seg); returns its counts."""
    out = Path(out)
    counts = {}
    for split, n, scale in (("train", n_train, 1), ("val", n_val, 1), ("val_hires", n_val, HIRES_SCALE)):
        entries = []
        for i in range(n):
            scene = pool_scene(rng_for(seed, f"seg-{split.removesuffix('_hires')}", i))
            scene = scale_scene(scene, scale) if scale != 1 else scene
            paths = {"image": f"{split}/images/{i:05d}.png", "annotation": f"{split}/annotations/{i:05d}.png"}
            _write_png(out / paths["image"], scene)
            (out / paths["annotation"]).parent.mkdir(parents=True, exist_ok=True)
            (out / paths["annotation"]).write_bytes(png_bytes(render_labels(scene)))
            entries.append({**paths, "meta": scene.meta()})
        _write_json(out / f"{split}.json", entries)
        counts[f"seg/{split}"] = n
    (out / "classes.json").write_text(json.dumps(list(SEG_CLASSES)) + "\n")
    return counts


def write_toyworld(out: str | Path, *, seed: int = 0, size: str = "small", typeset: str = "small") -> Path:
    """Write the toyworld dataset to ``out`` (layout in the module docstring); returns ``out``.
    ``typeset`` (TYPESETS) sets the reading probes' type; nothing else depends on it."""
    if size not in SIZES:
        raise ValueError(f"size {size!r} is not one of {list(SIZES)}")
    if typeset not in TYPESETS:
        raise ValueError(f"typeset {typeset!r} is not one of {list(TYPESETS)}")
    out = Path(out)
    _prepare(out)
    spec = SIZES[size]
    counts: dict[str, int] = {}
    paths, scenes = _write_pool(out, seed, spec["pool"], counts)
    _write_stages(out, seed, spec, paths, scenes, counts)
    _write_probes(out, seed, spec, counts, typeset)
    _write_retrieval(out, seed, spec["retrieval"], counts)
    _write_qa_eval(out, seed, spec["qa_eval"], counts)
    write_seg(out / "seg", seed, spec["seg_train"], spec["seg_val"])  # counts kept out: manifest as before
    manifest = {"name": "toyworld", "version": 1, "seed": seed, "size": size, "typeset": typeset,
                "pillow": PIL.__version__, "image_folder": "images",
                "probes": {a: list(c) for a, c in PROBES.items()},
                "qa_eval": {"types": list(QA_TYPES), "per_type": spec["qa_eval"],
                            "hires_scale": HIRES_SCALE},
                "counts": counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def build_parser():
    from comp.cliargs import ArgumentParser

    parser = ArgumentParser(
        prog="comp data toyworld",
        description="Write the synthetic toyworld dataset (Stage I/II/III JSON + YAML, probe\n"
                    "splits, retrieval pairs, a segmentation split). Deterministic for a seed.")
    parser.add_out("output folder (new, empty, or a toyworld output)", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="seeds every drawn scene and caption")
    parser.add_argument("--size", choices=list(SIZES), default="small", help="how many images")
    parser.add_argument("--typeset", choices=list(TYPESETS), default="small",
                        help="type of the digit / word probes and reading scenes (large: what the "
                             "reading toy SigLIP learns to read)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        write_toyworld(args.out, seed=args.seed, size=args.size, typeset=args.typeset)
    except ValueError as e:
        print(f"comp data toyworld: {e}", file=sys.stderr)
        return 2
    counts = json.loads((args.out / "manifest.json").read_text())["counts"]
    images = sum(v for k, v in counts.items() if not k.startswith("data/"))
    print(f"toyworld ({args.size}, seed {args.seed}): {images} images in "
          f"{time.perf_counter() - start:.1f} s -> {args.out}")
    for name, count in counts.items():
        print(f"  {name:<28} {count}")
    spec = SIZES[args.size]
    print(f"  {'seg/train, seg/val':<28} {spec['seg_train']}, {spec['seg_val']} (images + label maps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
