"""The embedded default data set: procedurally generated fine-grained "birds".

Generative model. A class is one combination of six part attributes (:data:`ATTRIBUTES`:
head colour, body colour, wing texture, tail shape, leg length, beak shape; 4 x 3 x 3 x 3 x 2
x 3 = 648 combinations). The combinations are shuffled once by a fixed seed and class ``c`` is
the ``c``-th, so train and test classes are alike (each half of the default 120 classes holds
every attribute value) and many pairs of classes differ in a single part attribute: as on CUB,
telling them apart needs looking at the right part.

Image ``i`` of class ``c`` is drawn with its own generator, seeded with ``(seed, style, c, i)``,
so it is the same in every process, in any order of access and in any split holding ``c``. The bird is assembled from
polygons in a canonical frame (each part jittered in size and colour), placed in the image by
a random similarity transform (scale, rotation, position, horizontal flip) over a cluttered
background, and in half of the images partly hidden by a random opaque occluder. Keypoints
are transformed part anchors, so they are exact; a part is invisible when its anchor is under
the occluder or outside the frame. Images are drawn at twice their size and downsampled.

Two styles share classes and geometry: ``"photo"`` (clutter of muted shapes and lines, sensor
noise) and ``"painting"`` (every palette colour mapped to a shifted, paler one, the same map
in every image; parts drawn as washes with brush strokes and ink outlines on paper).
"""

from __future__ import annotations

import colorsys
import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from glassmetric.data.base import RetrievalDataset, Sample
from glassmetric.errors import ConfigError

PART_NAMES = ("head", "body", "wing", "tail", "legs", "beak")
HEAD, BODY, WING, TAIL, LEGS, BEAK = range(len(PART_NAMES))

#: the class-defining attributes and their values; a class is one combination
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "head_colour": ("red", "blue", "yellow", "black"),
    "body_colour": ("brown", "grey", "green"),
    "wing_texture": ("plain", "stripes", "spots"),
    "tail_shape": ("fan", "pointed", "forked"),
    "legs_length": ("short", "long"),
    "beak_shape": ("short", "long", "hooked"),
}
_COMBINATIONS = list(itertools.product(*ATTRIBUTES.values()))
_CLASS_ORDER = np.random.default_rng(0).permutation(len(_COMBINATIONS))
#: the largest ``num_classes``: the size of the attribute space
MAX_CLASSES = len(_COMBINATIONS)

STYLES = ("photo", "painting")
SPLITS = ("train", "test", "all")
#: value of occluder pixels in :meth:`SyntheticParts.part_mask`
OCCLUDER = 255

_HEAD_RGB = {"red": (200, 40, 40), "blue": (45, 85, 205), "yellow": (235, 200, 40), "black": (30, 30, 30)}
_BODY_RGB = {"brown": (150, 100, 55), "grey": (150, 150, 158), "green": (85, 145, 70)}
_WING_SHADE = 0.7  # wing colour = body colour times this
_TEXTURE_RGB = (240, 230, 205)
_BEAK_RGB = (70, 62, 55)
_LEGS_RGB = (205, 125, 55)
_EYE_RGB, _PUPIL_RGB = (250, 250, 245), (15, 15, 15)
_OUTLINE_RGB, _INK_RGB = (25, 20, 15), (70, 55, 45)
_LEG_LENGTH = {"short": 0.14, "long": 0.32}

# Part templates, in body units (the body is one unit long); x points forward, y down.
_T = np.linspace(0.0, 2.0 * np.pi, 28, endpoint=False)
_CIRCLE = np.stack([np.cos(_T), np.sin(_T)], axis=1)
_SPOT = _CIRCLE[::3]
_TEARDROP = np.stack([np.cos(_T), np.sin(_T) * (1.0 + np.cos(_T)) / 2.0], axis=1)  # pointed at -x
_TAILS = {  # (along the tail, across it); the tail's anchor sits at 0.22 along
    "fan": np.array([[0, -0.07], [0.42, -0.2], [0.46, -0.1], [0.47, 0], [0.46, 0.1], [0.42, 0.2], [0, 0.07]]),
    "pointed": np.array([[0, -0.08], [0.2, -0.07], [0.55, 0], [0.2, 0.07], [0, 0.08]]),
    "forked": np.array([[0, -0.07], [0.5, -0.2], [0.3, 0], [0.5, 0.2], [0, 0.07]]),
}
_BEAKS = {  # (outline, anchor along the beak)
    "short": (np.array([[0, -0.08], [0.17, 0.0], [0, 0.08]]), 0.06),
    "long": (np.array([[0, -0.07], [0.36, 0.01], [0, 0.06]]), 0.1),
    "hooked": (np.array([[0, -0.085], [0.14, -0.07], [0.22, -0.01], [0.21, 0.08], [0.16, 0.02], [0, 0.06]]), 0.08),
}
_BIRD_CENTRE = np.array([0.04, 0.08])  # centre of the bird's extent, placed near the image centre


def class_attributes(class_id: int) -> dict[str, str]:
    """The attribute combination that defines class ``class_id`` (0 <= class_id < MAX_CLASSES)."""
    return dict(zip(ATTRIBUTES, _COMBINATIONS[_CLASS_ORDER[class_id]], strict=True))


@dataclass
class _Shape:
    """A filled polygon of the scene; ``part`` indexes PART_NAMES, or is OCCLUDER."""

    part: int
    points: np.ndarray  # (N, 2) vertices
    colour: tuple[int, int, int]
    detail: bool = False  # texture or eye drawn over its part's main polygon


@dataclass
class _Scene:
    """The geometry of one image, in image pixels, and the generator that draws the rest."""

    shapes: list[_Shape]  # the bird, back to front, then the occluder if any
    anchors: np.ndarray  # (P, 2) every part's anchor, visible or not
    keypoints: np.ndarray  # (P, 3) float32: the visible anchors and their flags
    bbox: tuple[float, float, float, float]
    scale: float  # pixels per body unit
    rng: np.random.Generator


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _place(points, angle: float, offset) -> np.ndarray:
    """Rotate ``points`` by ``angle`` then translate them by ``offset``."""
    return np.asarray(points, dtype=float) @ _rotation(angle).T + offset


def _jitter(rgb, rng: np.random.Generator, amount: int = 10) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in np.clip(np.add(rgb, rng.integers(-amount, amount + 1, 3)), 0, 255))
    return r, g, b


def _muted(rng: np.random.Generator, value=(0.3, 0.8), saturation=(0.05, 0.35)) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return int(255 * r), int(255 * g), int(255 * b)


@cache
def _paint_rgb(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The painting palette: hue turned by 25 degrees, paler and lighter."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    r, g, b = colorsys.hsv_to_rgb((h + 25 / 360) % 1.0, 0.65 * s, 0.35 + 0.6 * v)
    return int(255 * r), int(255 * g), int(255 * b)


def _inside(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Which of ``points`` (N, 2) lie inside ``polygon`` (M, 2) (even-odd rule)."""
    x, y = points[:, :1], points[:, 1:]
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 > y) != (y1 > y)
    dy = np.where(y1 == y0, 1.0, y1 - y0)
    return (crosses & (x < x0 + (y - y0) * (x1 - x0) / dy)).sum(axis=1) % 2 == 1


def _bird(attrs: dict[str, str], rng: np.random.Generator, palette: Callable) -> tuple[list[_Shape], np.ndarray]:
    """The bird's polygons (back to front) and part anchors, in body units."""
    sb, sw, st, sl, sh, sk = rng.uniform(0.9, 1.1, 6)  # size jitter of body, wing, tail, legs, head, beak
    body_rgb = _BODY_RGB[attrs["body_colour"]]
    shapes, anchors = [], np.zeros((len(PART_NAMES), 2))

    tail_base, tail_angle = np.array([-0.42 * sb, 0.0]), np.pi - 0.35
    shapes.append(
        _Shape(TAIL, _place(_TAILS[attrs["tail_shape"]] * st, tail_angle, tail_base), _jitter(palette(body_rgb), rng))
    )
    anchors[TAIL] = _place([[0.22 * st, 0.0]], tail_angle, tail_base)[0]

    legs_rgb, length = _jitter(palette(_LEGS_RGB), rng), _LEG_LENGTH[attrs["legs_length"]] * sl
    for x in (-0.05 * sb, 0.13 * sb):  # back leg, front leg (each from inside the body to a foot)
        belly = 0.3 * sb * np.sqrt(1.0 - (x / (0.5 * sb)) ** 2)
        foot = belly + length
        leg = np.array([[x - 0.03, 0.15 * sb], [x + 0.03, 0.15 * sb], [x + 0.03, foot], [x - 0.03, foot]])
        toes = np.array([[x - 0.05, foot - 0.03], [x + 0.12, foot + 0.01], [x - 0.05, foot + 0.03]])
        shapes += [_Shape(LEGS, leg, legs_rgb), _Shape(LEGS, toes, legs_rgb)]
        anchors[LEGS] = (x, (belly + foot) / 2)  # the middle of the front leg, drawn last

    shapes.append(_Shape(BODY, _CIRCLE * (0.5 * sb, 0.3 * sb), _jitter(palette(body_rgb), rng)))
    anchors[BODY] = (0.15 * sb, 0.17 * sb)  # the breast: the body's centre is under the wing

    wing_origin, wing_angle, wing_size = np.array([-0.1 * sb, -0.06 * sb]), -0.18, np.array([0.4, 0.3]) * sw
    wing_rgb = tuple(int(_WING_SHADE * c) for c in body_rgb)
    wing = _place(_TEARDROP * wing_size, wing_angle, wing_origin)
    shapes.append(_Shape(WING, wing, _jitter(palette(wing_rgb), rng)))
    texture_rgb = _jitter(palette(_TEXTURE_RGB), rng)
    for pattern in _wing_texture(attrs["wing_texture"], rng):
        shapes.append(_Shape(WING, _place(pattern * wing_size, wing_angle, wing_origin), texture_rgb, detail=True))
    anchors[WING] = _place([[0.3 * wing_size[0], 0.0]], wing_angle, wing_origin)[0]

    head, radius = np.array([0.5 * sb, -0.3 * sb]), 0.19 * sh
    shapes.append(_Shape(HEAD, _CIRCLE * radius + head, _jitter(palette(_HEAD_RGB[attrs["head_colour"]]), rng)))
    eye = head + np.array((0.45 * radius, -0.3 * radius))
    shapes.append(_Shape(HEAD, _SPOT * 0.2 * radius + eye, palette(_EYE_RGB), detail=True))
    shapes.append(_Shape(HEAD, _SPOT * 0.12 * radius + eye, palette(_PUPIL_RGB), detail=True))
    anchors[HEAD] = head

    beak, beak_anchor = _BEAKS[attrs["beak_shape"]]
    beak_base, beak_angle = head + np.array((radius - 0.03, 0.02)), 0.12
    shapes.append(_Shape(BEAK, _place(beak * sk, beak_angle, beak_base), _jitter(palette(_BEAK_RGB), rng)))
    anchors[BEAK] = _place([[beak_anchor * sk, 0.0]], beak_angle, beak_base)[0]
    return shapes, anchors


def _wing_texture(texture: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Texture polygons inside the unit teardrop (half-width sqrt(1 - x^2) (1 + x) / 2)."""

    def half_width(x):
        return np.sqrt(1.0 - x**2) * (1.0 + x) / 2.0

    if texture == "stripes":  # four bars across the wing
        bars = []
        for centre in -0.62 + 0.36 * np.arange(4) + rng.uniform(-0.05, 0.05):
            x = np.linspace(centre - 0.07, centre + 0.07, 4)
            top, bottom = np.stack([x, -half_width(x)], 1), np.stack([x, half_width(x)], 1)[::-1]
            bars.append(np.concatenate([top, bottom]))
        return bars
    if texture == "spots":
        spots = []
        for x in rng.uniform(-0.35, 0.75, rng.integers(5, 8)):
            room = max(half_width(x) - 0.2, 0.0)
            spots.append(_SPOT * (0.11, 0.15) + (x, rng.uniform(-room, room)))
        return spots
    return []


class SyntheticParts(RetrievalDataset):
    """Procedural fine-grained birds with part keypoints; needs no download (see module doc).

    ``split`` "train" holds the first ``num_classes // 2`` classes, "test" the rest, "all" both.
    ``labels`` are global class ids, grouped by class, ``images_per_class`` images each.
    """

    part_names = PART_NAMES

    def __init__(
        self,
        split: str = "train",
        *,
        num_classes: int = 120,
        images_per_class: int = 40,
        image_size: int = 96,
        seed: int = 0,
        transform: Callable | None = None,
        style: str = "photo",
    ):
        super().__init__(transform)
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        if style not in STYLES:
            raise ConfigError(f"style must be one of {STYLES}, got {style!r}")
        self.num_classes = _checked_int("num_classes", num_classes, 2, MAX_CLASSES)
        self.images_per_class = _checked_int("images_per_class", images_per_class, 1, None)
        self.image_size = _checked_int("image_size", image_size, 64, 224)
        self.seed = _checked_int("seed", seed, 0, None)
        self.split, self.style = split, style
        n_train, n = self.num_classes // 2, self.num_classes
        first, stop = {"train": (0, n_train), "test": (n_train, n), "all": (0, n)}[split]
        self.labels = np.repeat(np.arange(first, stop, dtype=np.int64), self.images_per_class)

    def class_attributes(self, class_id: int) -> dict[str, str]:
        """The attribute combination that defines ``class_id``, e.g. {"head_colour": "red", ...}."""
        if not 0 <= class_id < self.num_classes:
            raise ConfigError(f"class_id must be in [0, {self.num_classes}), got {class_id}")
        return class_attributes(class_id)

    def load(self, index: int) -> Sample:
        """Image ``index`` with its part keypoints, the bird's box and its class attributes."""
        scene = self._scene(index)
        size, k = self.image_size, 2  # drawn at k times the size, then downsampled
        image = Image.new("RGB", (k * size, k * size))
        draw = _Canvas(image, k)
        if self.style == "photo":
            _photo_background(draw, size, scene.rng)
            for shape in scene.shapes:
                draw.polygon(shape.points, shape.colour, _OUTLINE_RGB)
            image = image.reduce(k)
            noise = scene.rng.standard_normal((size, size, 3), np.float32) * scene.rng.uniform(2, 7)
            image = Image.fromarray(np.clip(np.asarray(image, np.float32) + noise + 0.5, 0, 255).astype(np.uint8))
        else:
            _paper_background(draw, size, scene.rng)
            for shape in scene.shapes:
                _paint(draw, shape, scene.scale, scene.rng)
            image = image.reduce(k)
        label = int(self.labels[index])
        return Sample(
            image=image,
            label=label,
            keypoints=scene.keypoints,
            bbox=scene.bbox,
            meta={"attributes": class_attributes(label)},
        )

    def part_mask(self, index: int) -> np.ndarray:
        """What covers the centre of each pixel of image ``index``: a (size, size) uint8 array of
        0 (background), 1 + the part's row in ``part_names``, or OCCLUDER (255)."""
        k = 4  # drawn at 4x and sampled at pixel centres, so PIL's rounding costs < 1/4 pixel
        mask = Image.new("L", (k * self.image_size, k * self.image_size), 0)
        draw = _Canvas(mask, k)
        for shape in self._scene(index).shapes:
            draw.polygon(shape.points, OCCLUDER if shape.part == OCCLUDER else shape.part + 1)
        return np.asarray(mask)[k // 2 :: k, k // 2 :: k].copy()

    def _scene(self, index: int) -> _Scene:
        """The geometry of image ``index``, drawn from its own generator."""
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        label = int(self.labels[index])
        rng = np.random.default_rng([self.seed, STYLES.index(self.style), label, index % self.images_per_class])
        palette = _paint_rgb if self.style == "painting" else (lambda rgb: rgb)
        shapes, anchors = _bird(class_attributes(label), rng, palette)

        size = self.image_size
        scale, angle = size * rng.uniform(0.27, 0.36), rng.uniform(-0.45, 0.45)
        flip = np.diag([rng.choice([-1.0, 1.0]), 1.0])
        matrix = scale * _rotation(angle) @ flip
        offset = size * (0.5 + rng.uniform(-0.12, 0.12, 2)) - matrix @ _BIRD_CENTRE
        for shape in shapes:
            shape.points = shape.points @ matrix.T + offset
        points = anchors @ matrix.T + offset
        corners = np.concatenate([s.points for s in shapes])
        x0, y0 = np.clip(corners.min(axis=0), 0, size)
        x1, y1 = np.clip(corners.max(axis=0), 0, size)

        visible = ((points >= 0) & (points < size)).all(axis=1)
        if rng.random() < 0.5:
            occluder = _occluder(points[rng.integers(len(points))], scale, rng, palette)
            shapes.append(occluder)
            visible &= ~_inside(points, occluder.points)
        keypoints = np.zeros((len(PART_NAMES), 3), dtype=np.float32)
        keypoints[visible, :2] = points[visible]
        keypoints[visible, 2] = 1.0
        return _Scene(shapes, points, keypoints, (float(x0), float(y0), float(x1 - x0), float(y1 - y0)), scale, rng)


def _checked_int(name: str, value, low: int, high: int | None) -> int:
    """``value`` as an int, or a ConfigError naming ``name`` when it is not one in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be {bounds}, got {value}")
    return int(value)


def _occluder(near: np.ndarray, scale: float, rng: np.random.Generator, palette: Callable) -> _Shape:
    """A random opaque ellipse, rectangle or triangle around ``near`` (image pixels)."""
    radius = scale * rng.uniform(0.16, 0.3)
    centre = near + rng.normal(0.0, 0.12 * scale, 2)
    kind = rng.integers(3)
    if kind == 0:
        outline = _CIRCLE * (1.0, rng.uniform(0.5, 1.0))
    elif kind == 1:
        aspect = rng.uniform(0.3, 1.0)
        outline = np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]])
    else:
        angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, 3))
        outline = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    points = _place(outline * radius, rng.uniform(0.0, np.pi), centre)
    return _Shape(OCCLUDER, points, palette(_muted(rng, value=(0.25, 0.7), saturation=(0.1, 0.5))))


class _Canvas:
    """ImageDraw taking image-pixel coordinates (pixel i spans [i, i + 1)) on a k-times image."""

    def __init__(self, image: Image.Image, k: int):
        self.draw, self.k = ImageDraw.Draw(image), k

    def _xy(self, points: np.ndarray) -> list[float]:
        return (np.asarray(points) * self.k - 0.5).ravel().tolist()

    def polygon(self, points, fill, outline=None, width: float = 0.5):
        self.draw.polygon(self._xy(points), fill=fill, outline=outline, width=max(1, round(width * self.k)))

    def line(self, points, fill, width: float):
        self.draw.line(self._xy(points), fill=fill, width=max(1, round(width * self.k)))


def _photo_background(draw: _Canvas, size: int, rng: np.random.Generator) -> None:
    """Muted base colour under random ellipses, polygons and lines."""
    draw.polygon([[0, 0], [size, 0], [size, size], [0, size]], _muted(rng))
    for _ in range(rng.integers(10, 18)):
        centre, radius, kind = rng.uniform(0, size, 2), size * rng.uniform(0.04, 0.3), rng.integers(3)
        if kind == 0:
            ellipse = _CIRCLE * (radius, radius * rng.uniform(0.3, 1.0))
            draw.polygon(_place(ellipse, rng.uniform(0, np.pi), centre), _muted(rng))
        elif kind == 1:
            angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, rng.integers(3, 6)))
            draw.polygon(np.stack([np.cos(angles), np.sin(angles)], 1) * radius + centre, _muted(rng))
        else:
            ends = centre + rng.normal(0.0, radius, (rng.integers(2, 4), 2))
            draw.line(ends, _muted(rng), width=rng.uniform(0.5, 3.0))


def _paper_background(draw: _Canvas, size: int, rng: np.random.Generator) -> None:
    """Off-white paper with a few pale washes and faint fibres; no noise."""
    paper = np.add((238, 230, 212), rng.integers(-8, 9, 3))
    draw.polygon([[0, 0], [size, 0], [size, size], [0, size]], tuple(int(c) for c in paper))
    for _ in range(rng.integers(3, 6)):
        tint = np.add(0.75 * paper, 0.25 * np.array(_muted(rng, value=(0.7, 1.0), saturation=(0.2, 0.5))))
        shape = _CIRCLE * size * rng.uniform(0.1, 0.35, 2)
        draw.polygon(_place(shape, rng.uniform(0, np.pi), rng.uniform(0, size, 2)), tuple(int(c) for c in tint))
    for _ in range(rng.integers(4, 9)):
        y = rng.uniform(0, size)
        fibre = np.array([[rng.uniform(-0.2, 0.5) * size, y], [rng.uniform(0.5, 1.2) * size, y + rng.normal(0, 3)]])
        draw.line(fibre, tuple(int(c) for c in paper - 14), width=0.5)


def _paint(draw: _Canvas, shape: _Shape, scale: float, rng: np.random.Generator) -> None:
    """Draw ``shape`` as a painting: wobbly inked outline, a lighter wash and brush strokes."""
    points = shape.points + rng.normal(0.0, 0.008 * scale, shape.points.shape)
    draw.polygon(points, shape.colour, None if shape.detail else _INK_RGB, width=1.0)
    if shape.detail or shape.part not in (HEAD, BODY, WING):
        return
    centre = points.mean(axis=0)
    light = tuple(int(0.8 * c + 0.2 * 255) for c in shape.colour)
    draw.polygon(centre + 0.6 * (points - centre) + rng.normal(0.0, 0.03 * scale, 2), light)
    for _ in range(rng.integers(4, 8)):  # short strokes between points of the part's inner half
        ends = centre + rng.uniform(0.0, 0.5, (2, 1)) * (points[rng.integers(len(points), size=2)] - centre)
        draw.line(ends, _jitter(shape.colour, rng, 40), width=0.06 * scale)
