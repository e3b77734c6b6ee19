"""Shapes: captioned RGB images of one or two simple objects, with exact ground truth.

A synthetic text-to-image dataset, rendered offline in numpy, on which a small
Stable-Diffusion-layout model can be trained and ControlNet, DreamBooth and
prompt-to-prompt editing measured against ground truth. Every example is a
`Scene`: one or two objects (shape, colour, size, position, texture, centre) on a
background of another colour, drawn without anti-aliasing, so every pixel
belongs to exactly one region and has an exact colour.

Geometry. Coordinates (x, y) are in units of the image side, x to the right and
y down; pixel (row i, column j) is the point ((j + 1/2) / S, (i + 1/2) / S) of an
S x S image, and it belongs to an object of centre (cx, cy) and radius r
(`SIZE_RADII`) when (u, v) = ((x - cx) / r, (y - cy) / r) lies in its shape:
  circle   u^2 + v^2 <= 1;            ring      1/4 <= u^2 + v^2 <= 1;
  square   max(|u|, |v|) <= 1;        diamond   |u| + |v| <= 1;
  cross    max(|u|, |v|) <= 1 and min(|u|, |v|) <= 1/3;
  triangle v <= 1 and 2|u| <= v + 1 (apex up);
  star     a filled regular pentagram, apex up, outer vertices at radius 1;
  heart    a diamond of half-diagonal d = 2(sqrt 2 - 1) with a disc on each
           upper side (`_star` and `_heart` give the exact sets).
Every shape fits in [-1, 1]^2 with its bounding box centred on (0, 0). Objects
are drawn in order (object 1 at the back), each wholly inside the image; the
position word is the cell of the 3 x 3 grid holding the centre.

Colours. Plain objects and backgrounds take the exact `PALETTE` values. A
textured object draws its pattern (`texture_pattern`) in the colour's
`PATTERN_PALETTE` entry, a darker or lighter shade that is not a palette colour.
The objects' colours and the background colour are all different.

Ground truth of an S x S example:
  mask: uint8 [S, S], 0 background, k where object k is the visible one;
  depth: uint8 [S, S], the number of objects covering the pixel (objects are
    flat cards stacked in draw order, so depth is the height of the visible
    card: 0 background, 1 a single card, 2 where the front object lies on the
    back one, and there the mask shows the front object);
  edges: uint8 [S, S], 1 where a 4-neighbour in the image has another mask value.

Sampling (`sample_attributes`): one or two objects with probability 1/2 each;
shape, size and position cell uniform; texture plain with probability 1/2, else
stripes or dots; colours of the objects and background uniform without
replacement; the centre uniform on the grid (k + 1/2) / 1024 in its cell, at least
`POSITION_MARGIN` from the cell's sides. Two objects are drawn again until at
least `MIN_VISIBLE_FRACTION` of the back object's pixels are visible at every
size in `IMAGE_SIZES`, so scenes do not depend on the image size.

Captions (`caption`) are English sentences from `SINGLE_TEMPLATES` and
`PAIR_TEMPLATES` that name every object's size, colour, shape, texture (unless
plain) and position; `parse_caption` inverts them. Their words are
`CAPTION_VOCABULARY`; `RARE_WORDS` (identifiers for DreamBooth) never occur.

Determinism: example i of split s (`SPLIT_IDS`) with seed `seed` is
`generate_example(seed, s, i, image_size)`, drawn from
`numpy.random.default_rng([seed, SPLIT_IDS[s], i])`, so any example can be
regenerated alone. The TFDS builder `shapes` (configs "32" and "64", or a custom
`ShapesConfig`) writes examples in index order.
"""

import dataclasses
import math
import re
import string
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from ddm_jax.checks import ArgumentError, check, check_choice, check_int

IMAGE_SIZES = (32, 64)
MAX_OBJECTS = 2
NONE = "none"  # The class label of every attribute of an absent second object.
ABSENT_CENTER = (-1.0, -1.0)  # The stored centre of an absent second object.
SPLIT_IDS = {"train": 0, "test": 1}

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "heart", "diamond")
COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "cyan")
PALETTE = (  # RGB of COLORS[k].
    (220, 30, 30),
    (40, 160, 60),
    (40, 80, 220),
    (245, 215, 40),
    (245, 130, 20),
    (130, 50, 170),
    (245, 140, 190),
    (120, 70, 30),
    (0, 0, 0),
    (255, 255, 255),
    (128, 128, 128),
    (40, 210, 230),
)
PATTERN_PALETTE = (  # RGB of the texture pattern on an object of colour COLORS[k].
    (100, 0, 0),
    (20, 80, 30),
    (20, 40, 110),
    (150, 125, 0),
    (255, 210, 150),
    (200, 160, 230),
    (160, 40, 100),
    (200, 150, 100),
    (90, 90, 90),
    (190, 190, 190),
    (60, 60, 60),
    (0, 110, 130),
)
SIZES = ("small", "large")
SIZE_RADII = (9 / 64, 14 / 64)  # Half the side of an object's bounding square, in image sides.
POSITIONS = (  # POSITIONS[3 * row + column] of the 3 x 3 grid, rows top to bottom.
    "top_left",
    "top",
    "top_right",
    "left",
    "center",
    "right",
    "bottom_left",
    "bottom",
    "bottom_right",
)
POSITION_PHRASES = (  # The caption's words for POSITIONS[k].
    "in the top left corner",
    "at the top",
    "in the top right corner",
    "on the left",
    "in the center",
    "on the right",
    "in the bottom left corner",
    "at the bottom",
    "in the bottom right corner",
)
TEXTURES = ("plain", "stripes", "dots")
TEXTURE_PROBABILITIES = (0.5, 0.25, 0.25)
POSITION_MARGIN = 0.05  # Least distance of a centre from its grid cell's sides, in image sides.
MIN_VISIBLE_FRACTION = 0.5  # Least visible fraction of a back object's pixels.
CENTER_GRID = 1024  # Centres are (k + 1/2) / CENTER_GRID: exact in float32, never on a pixel's tie.

OBJECT_TEMPLATE = "a {size} {color} {shape}{texture} {position}"
TEXTURE_PHRASES = ("", " with stripes", " with dots")  # The caption's words for TEXTURES[k].
SINGLE_TEMPLATES = (
    "{0}",
    "{0}, on a {background} background",
    "a {background} background with {0}",
    "a picture of {0}",
    "a picture of {0}, on a {background} background",
    "there is {0}",
)
PAIR_TEMPLATES = (
    "two shapes: {0} and {1}",
    "{0} and {1}",
    "{0} and {1}, on a {background} background",
    "a picture of {0} and {1}",
    "a {background} background with {0} and {1}",
)
RARE_WORDS = ("sks", "ohwx", "phol", "olis", "bnha")
"""Words no caption contains, each one token of CLIP's BPE: identifiers for DreamBooth's subject ("a sks star")."""


class ObjectLabels(NamedTuple):
    """The class labels of one object (words of the vocabularies, e.g. POSITIONS for position)."""

    shape: str
    color: str
    size: str
    position: str
    texture: str


VOCABULARIES = ObjectLabels(shape=SHAPES, color=COLORS, size=SIZES, position=POSITIONS, texture=TEXTURES)
CAPTION_PHRASES = ObjectLabels(  # The caption's words for each label, aligned with VOCABULARIES.
    shape=SHAPES, color=COLORS, size=SIZES, position=POSITION_PHRASES, texture=TEXTURE_PHRASES
)


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object; its position is the grid cell of its centre (x, y), in image sides."""

    shape: str
    color: str
    size: str
    texture: str
    center: tuple[float, float]

    def __post_init__(self):
        check_choice("shape", self.shape, SHAPES)
        check_choice("color", self.color, COLORS)
        check_choice("size", self.size, SIZES)
        check_choice("texture", self.texture, TEXTURES)
        check(
            len(self.center) == 2 and all(0 <= value <= 1 for value in self.center),
            "center",
            self.center,
            "(x, y) in [0, 1]^2",
        )

    @property
    def radius(self) -> float:
        return SIZE_RADII[SIZES.index(self.size)]

    @property
    def position(self) -> str:
        return POSITIONS[position_index(*self.center)]

    @property
    def labels(self) -> ObjectLabels:
        return ObjectLabels(self.shape, self.color, self.size, self.position, self.texture)


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects in draw order (the first at the back) on a background colour."""

    objects: tuple[SceneObject, ...]
    background: str

    def __post_init__(self):
        check(1 <= len(self.objects) <= MAX_OBJECTS, "objects", self.objects, f"1 to {MAX_OBJECTS} objects")
        check_choice("background", self.background, COLORS)


class ParsedCaption(NamedTuple):
    """What a caption says: its objects in the caption's order, and the background if named."""

    objects: tuple[ObjectLabels, ...]
    background: str | None


def position_index(x: float, y: float) -> int:
    """Index into POSITIONS of the 3 x 3 grid cell holding the point (x, y) of the unit square."""
    return 3 * _grid_cell(y) + _grid_cell(x)


def _grid_cell(coordinate: float) -> int:
    return min(int(3 * coordinate), 2)


def pixel_centers(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y [S, S] of each pixel's centre in image sides: ((j + 1/2) / S, (i + 1/2) / S)."""
    centers = (np.arange(image_size) + 0.5) / image_size
    return np.meshgrid(centers, centers)


def _circle(u, v):
    """The unit disc u^2 + v^2 <= 1."""
    return u**2 + v**2 <= 1


def _square(u, v):
    """The square max(|u|, |v|) <= 1."""
    return np.maximum(np.abs(u), np.abs(v)) <= 1


def _triangle(u, v):
    """The triangle with apex (0, -1) and base v = 1, |u| <= 1: v <= 1 and 2|u| <= v + 1."""
    return (v <= 1) & (2 * np.abs(u) <= v + 1)


def _star(u, v):
    """A filled regular pentagram, apex up, its outer vertices at radius 1 around (0, c).

    c = (1 - cos 36deg) / 2 centres its bounding box. Its five edges lie on the
    lines n_k . p = cos 72deg, n_k the directions of the outer vertices; a point
    p (relative to (0, c)) is in the star when at most one of them separates it
    from the centre (the inner pentagon is inside all five, each point inside one).
    """
    vertex_angles = 2 * np.pi * np.arange(5) / 5
    v = v - (1 - math.cos(math.pi / 5)) / 2  # Centres the bounding box.
    projections = u[..., None] * np.sin(vertex_angles) - v[..., None] * np.cos(vertex_angles)
    return np.sum(projections > math.cos(2 * math.pi / 5), axis=-1) <= 1


def _ring(u, v):
    """The annulus 1/4 <= u^2 + v^2 <= 1."""
    return (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.25)


def _cross(u, v):
    """A plus sign of arms 2/3 wide: max(|u|, |v|) <= 1 and min(|u|, |v|) <= 1/3."""
    return (np.maximum(np.abs(u), np.abs(v)) <= 1) & (np.minimum(np.abs(u), np.abs(v)) <= 1 / 3)


def _heart(u, v):
    """The diamond |u| + |v - h| <= d with a disc of radius d / sqrt 2 on each upper side.

    The discs are centred at the sides' midpoints (-+d/2, h - d/2); d = 2 (sqrt 2 - 1)
    makes the width 2, and h = (1 - d) / 2 centres the bounding box.
    """
    half_diagonal = 2 * (math.sqrt(2) - 1)  # Makes the width 2.
    center = (1 - half_diagonal) / 2  # Centres the bounding box.
    lobe_radius = half_diagonal / math.sqrt(2)
    lobe_y = center - half_diagonal / 2
    in_diamond = np.abs(u) + np.abs(v - center) <= half_diagonal
    in_lobe = (np.abs(u) - half_diagonal / 2) ** 2 + (v - lobe_y) ** 2 <= lobe_radius**2
    return in_diamond | in_lobe


def _diamond(u, v):
    """The square rotated by 45 degrees: |u| + |v| <= 1."""
    return np.abs(u) + np.abs(v) <= 1


_SHAPE_FUNCTIONS = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "ring": _ring,
    "cross": _cross,
    "heart": _heart,
    "diamond": _diamond,
}


def silhouette(scene_object: SceneObject, image_size: int) -> np.ndarray:
    """bool [S, S]: the pixels whose centres lie in the object (its shape's inequality).

    Args:
      scene_object: the object.
      image_size: S, one of IMAGE_SIZES.

    Returns:
      The object's pixels, hidden ones included.
    """
    check_choice("image_size", image_size, IMAGE_SIZES)
    x, y = pixel_centers(image_size)
    center_x, center_y = scene_object.center
    radius = scene_object.radius
    return _SHAPE_FUNCTIONS[scene_object.shape]((x - center_x) / radius, (y - center_y) / radius)


def texture_pattern(texture: str, image_size: int) -> np.ndarray:
    """bool [S, S]: the pixels a texture draws in the pattern colour, anchored to the image.

    With period P = S / 8 pixels, "stripes" are the diagonal bands (i + j) mod P < P / 2,
    and "dots" are the discs of radius P / 4 centred in each P x P cell (at pixel
    centres); "plain" draws none.

    Args:
      texture: one of TEXTURES.
      image_size: S, one of IMAGE_SIZES.
    """
    check_choice("texture", texture, TEXTURES)
    check_choice("image_size", image_size, IMAGE_SIZES)
    period = image_size // 8
    rows, columns = np.indices((image_size, image_size))
    if texture == "stripes":
        return (rows + columns) % period < period // 2
    if texture == "dots":
        offset_y, offset_x = rows % period + 0.5 - period / 2, columns % period + 0.5 - period / 2
        return offset_x**2 + offset_y**2 <= (period / 4) ** 2
    return np.zeros((image_size, image_size), bool)


def edges_of(mask: np.ndarray) -> np.ndarray:
    """uint8 [H, W]: 1 where a 4-neighbour inside the image has another mask value, else 0.

    Both sides of a boundary are marked, so edges are two pixels wide.
    """
    differs = np.zeros(mask.shape, bool)
    vertical = mask[1:] != mask[:-1]
    horizontal = mask[:, 1:] != mask[:, :-1]
    differs[1:] |= vertical
    differs[:-1] |= vertical
    differs[:, 1:] |= horizontal
    differs[:, :-1] |= horizontal
    return differs.astype(np.uint8)


def render(scene: Scene, image_size: int = 32) -> dict[str, np.ndarray]:
    """Draws a scene without anti-aliasing, with its ground truth.

    Args:
      scene: the objects, drawn in order, and the background.
      image_size: S, one of IMAGE_SIZES.

    Returns:
      {"image": uint8 [S, S, 3], "mask", "depth", "edges": uint8 [S, S]}, as in
      this module's docstring.
    """
    check_choice("image_size", image_size, IMAGE_SIZES)
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[...] = PALETTE[COLORS.index(scene.background)]
    mask = np.zeros((image_size, image_size), np.uint8)
    depth = np.zeros((image_size, image_size), np.uint8)
    for index, scene_object in enumerate(scene.objects, 1):
        inside = silhouette(scene_object, image_size)
        color = COLORS.index(scene_object.color)
        in_pattern = texture_pattern(scene_object.texture, image_size)
        image[inside] = np.where(in_pattern[inside, None], PATTERN_PALETTE[color], PALETTE[color])
        mask[inside] = index
        depth += inside.astype(np.uint8)
    return {"image": image, "mask": mask, "depth": depth, "edges": edges_of(mask)}


def sample_attributes(rng: np.random.Generator) -> Scene:
    """A random scene, as described in this module's docstring (it advances `rng`).

    Args:
      rng: the generator; the scene is a function of its state.

    Returns:
      The scene; it does not depend on the image size it will be drawn at.
    """
    num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    while True:
        colors = rng.choice(len(COLORS), size=num_objects + 1, replace=False)
        objects = tuple(_sample_object(rng, COLORS[color]) for color in colors[:-1])
        if _back_objects_visible(objects):
            return Scene(objects, background=COLORS[colors[-1]])


def _sample_object(rng: np.random.Generator, color: str) -> SceneObject:
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = SIZES[rng.integers(len(SIZES))]
    texture = TEXTURES[rng.choice(len(TEXTURES), p=TEXTURE_PROBABILITIES)]
    row, column = divmod(int(rng.integers(len(POSITIONS))), 3)
    radius = SIZE_RADII[SIZES.index(size)]
    center = (_sample_coordinate(rng, column, radius), _sample_coordinate(rng, row, radius))
    return SceneObject(shape=shape, color=color, size=size, texture=texture, center=center)


def _sample_coordinate(rng: np.random.Generator, cell: int, radius: float) -> float:
    """Uniform on the centre grid, in the cell less its margins, with the object inside [0, 1]."""
    low = max(cell / 3 + POSITION_MARGIN, radius)
    high = min((cell + 1) / 3 - POSITION_MARGIN, 1 - radius)
    first, last = math.ceil(low * CENTER_GRID - 0.5), math.floor(high * CENTER_GRID - 0.5)
    return (int(rng.integers(first, last + 1)) + 0.5) / CENTER_GRID


def _back_objects_visible(objects: tuple[SceneObject, ...]) -> bool:
    """Whether each object keeps MIN_VISIBLE_FRACTION of its pixels visible at every image size."""
    for image_size in IMAGE_SIZES:
        covered = np.zeros((image_size, image_size), bool)
        for scene_object in reversed(objects):  # Front to back.
            inside = silhouette(scene_object, image_size)
            if np.sum(inside & ~covered) < MIN_VISIBLE_FRACTION * np.sum(inside):
                return False
            covered |= inside
    return True


def object_phrase(labels: ObjectLabels) -> str:
    """OBJECT_TEMPLATE filled with the labels' CAPTION_PHRASES, e.g. "a small red star with dots at the top"."""
    return OBJECT_TEMPLATE.format(
        **{
            field: phrases[vocabulary.index(label)]
            for field, label, vocabulary, phrases in zip(
                ObjectLabels._fields, labels, VOCABULARIES, CAPTION_PHRASES, strict=True
            )
        }
    )


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random caption of the scene (it advances `rng`).

    A template of SINGLE_TEMPLATES or PAIR_TEMPLATES, uniformly, filled with the
    objects' phrases (`object_phrase`) in a uniformly random order and the
    background colour.

    Args:
      scene: the scene to describe.
      rng: the generator.

    Returns:
      The caption, lower case, e.g. "a large red star on the left, on a white background".
    """
    templates = SINGLE_TEMPLATES if len(scene.objects) == 1 else PAIR_TEMPLATES
    template = templates[rng.integers(len(templates))]
    order = rng.permutation(len(scene.objects))
    phrases = [object_phrase(scene.objects[index].labels) for index in order]
    return template.format(*phrases, background=scene.background)


def caption_pair(attribute: str, rng: np.random.Generator) -> tuple[str, str]:
    """Two captions of one object, "{object}, on a {background} background", with random labels
    that differ in `attribute` alone (a field of ObjectLabels, or "background"), e.g. ("a small red
    star on the left, on a white background", "a small red star on the right, on a white background");
    the object's colour is never the background's, as in every scene."""
    vocabularies = {**VOCABULARIES._asdict(), "background": COLORS}
    check_choice("attribute", attribute, tuple(vocabularies))
    labels = {field: str(rng.choice(vocabulary)) for field, vocabulary in vocabularies.items()}
    labels["background"] = str(rng.choice([color for color in COLORS if color != labels["color"]]))
    excluded = {labels["color"], labels["background"]} if attribute in ("color", "background") else {labels[attribute]}
    other = str(rng.choice([value for value in vocabularies[attribute] if value not in excluded]))
    return tuple(
        SINGLE_TEMPLATES[1].format(
            object_phrase(ObjectLabels(**{field: chosen[field] for field in ObjectLabels._fields})),
            background=chosen["background"],
        )
        for chosen in (labels, {**labels, attribute: other})
    )


def _alternatives(phrases: tuple[str, ...]) -> str:
    return "(?:" + "|".join(re.escape(phrase) for phrase in phrases) + ")"


def _template_regex(template: str, field_regex: Callable[[str], str]) -> str:
    """The template's literal text, escaped, with each {field} replaced by field_regex(field)."""
    return "".join(
        re.escape(literal) + ("" if field is None else field_regex(field))
        for literal, field, _, _ in string.Formatter().parse(template)
    )


def _object_regex(number: int) -> str:
    """OBJECT_TEMPLATE as a regular expression with groups named {field}{number}."""
    phrases = dict(zip(ObjectLabels._fields, CAPTION_PHRASES, strict=True))
    return _template_regex(OBJECT_TEMPLATE, lambda field: f"(?P<{field}{number}>{_alternatives(phrases[field])})")


def _caption_regex(template: str) -> re.Pattern:
    """A caption template as a regular expression with a group per object field and "background"."""
    return re.compile(
        _template_regex(
            template,
            lambda field: (
                f"(?P<background>{_alternatives(COLORS)})" if field == "background" else _object_regex(int(field))
            ),
        )
    )


_CAPTION_REGEXES = tuple(_caption_regex(template) for template in SINGLE_TEMPLATES + PAIR_TEMPLATES)


def parse_caption(text: str) -> ParsedCaption:
    """The attributes a caption of this dataset names; the inverse of `caption`.

    Args:
      text: a caption made from SINGLE_TEMPLATES or PAIR_TEMPLATES.

    Returns:
      The objects' labels in the caption's order, and the background colour, or
      None where the template does not name it.

    Raises:
      ArgumentError: if `text` is not such a caption.
    """
    for regex in _CAPTION_REGEXES:
        match = regex.fullmatch(text)
        if match is not None:
            groups = match.groupdict()
            num_objects = sum(name.startswith("shape") for name in groups)
            objects = tuple(
                ObjectLabels(
                    *(
                        vocabulary[phrases.index(groups[f"{field}{number}"])]
                        for field, vocabulary, phrases in zip(
                            ObjectLabels._fields, VOCABULARIES, CAPTION_PHRASES, strict=True
                        )
                    )
                )
                for number in range(num_objects)
            )
            return ParsedCaption(objects, groups.get("background"))
    raise ArgumentError("text", text, "a caption made from SINGLE_TEMPLATES or PAIR_TEMPLATES")


def _caption_vocabulary() -> tuple[str, ...]:
    """Every word (maximal run of a-z) a caption can contain, sorted."""
    templates = (*SINGLE_TEMPLATES, *PAIR_TEMPLATES, OBJECT_TEMPLATE)
    literals = [literal for template in templates for literal, _, _, _ in string.Formatter().parse(template)]
    texts = literals + [phrase for phrases in CAPTION_PHRASES for phrase in phrases]
    return tuple(sorted({word for text in texts for word in re.findall("[a-z]+", text)}))


CAPTION_VOCABULARY = _caption_vocabulary()


def generate_example(seed: int, split: str, index: int, image_size: int = 32) -> dict[str, Any]:
    """Example `index` of `split`, as the builder writes it and TFDS reads it back.

    Drawn from `numpy.random.default_rng([seed, SPLIT_IDS[split], index])`: the
    scene (`sample_attributes`), then its caption (`caption`).

    Args:
      seed: the dataset's seed, an integer >= 0.
      split: "train" or "test".
      index: the example's index in its split, an integer >= 0.
      image_size: S, one of IMAGE_SIZES.

    Returns:
      {"index", "image", "caption", "mask", "edges", "depth", "num_objects",
      "background", "objects"}; "background" is an index into COLORS, and
      "objects" maps each field of ObjectLabels to int64 [MAX_OBJECTS] indices
      into its vocabulary (len(vocabulary) for NONE) and "center" to float32
      [MAX_OBJECTS, 2] (ABSENT_CENTER for NONE).
    """
    check_int("seed", seed, minimum=0)
    check_choice("split", split, SPLIT_IDS)
    check_int("index", index, minimum=0)
    check_choice("image_size", image_size, IMAGE_SIZES)
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    scene = sample_attributes(rng)
    text = caption(scene, rng)
    return {
        "index": index,
        **render(scene, image_size),
        "caption": text,
        "num_objects": len(scene.objects),
        "background": COLORS.index(scene.background),
        "objects": _object_features(scene),
    }


def _object_features(scene: Scene) -> dict[str, np.ndarray]:
    """Each label as int64 [MAX_OBJECTS] indices into its vocabulary (NONE: its length); centres float32."""
    absent = MAX_OBJECTS - len(scene.objects)
    labels = [scene_object.labels for scene_object in scene.objects]
    features = {
        field: np.array(
            [vocabulary.index(getattr(object_labels, field)) for object_labels in labels] + [len(vocabulary)] * absent,
            np.int64,
        )
        for field, vocabulary in zip(ObjectLabels._fields, VOCABULARIES, strict=True)
    }
    centers = [scene_object.center for scene_object in scene.objects] + [ABSENT_CENTER] * absent
    return {**features, "center": np.array(centers, np.float32)}


def scene_from_example(example: dict[str, Any]) -> Scene:
    """The scene of an example (as `generate_example` returns it or TFDS reads it); `render` redraws it."""
    objects_features = example["objects"]
    objects = tuple(
        SceneObject(
            shape=SHAPES[objects_features["shape"][k]],
            color=COLORS[objects_features["color"][k]],
            size=SIZES[objects_features["size"][k]],
            texture=TEXTURES[objects_features["texture"][k]],
            center=tuple(float(value) for value in objects_features["center"][k]),
        )
        for k in range(int(example["num_objects"]))
    )
    return Scene(objects, background=COLORS[example["background"]])


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """A configuration of `shapes`: its examples are `generate_example(seed, split, i, image_size)`.

    Give a custom configuration a name of its own: TFDS stores it under
    data_dir/shapes/<name>/<version> and reuses what it finds there.
    """

    image_size: int = 32
    num_train: int = 20000
    num_test: int = 2000
    seed: int = 0

    def __post_init__(self):
        check_choice("image_size", self.image_size, IMAGE_SIZES)
        check_int("num_train", self.num_train, minimum=1)
        check_int("num_test", self.num_test, minimum=1)
        check_int("seed", self.seed, minimum=0)


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Captioned images of one or two simple objects with their mask, depth, edges and labels."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        *(
            ShapesConfig(name=str(image_size), image_size=image_size, description=f"{image_size}x{image_size} images.")
            for image_size in IMAGE_SIZES
        ),
        # The first examples of "32" (the same seed), prepared in a few seconds: quick runs and tests.
        ShapesConfig(name="32_small", num_train=1000, num_test=200, description="The first 1000 / 200 of 32x32."),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        labels = {
            field: tfds.features.ClassLabel(names=(*vocabulary, NONE))
            for field, vocabulary in zip(ObjectLabels._fields, VOCABULARIES, strict=True)
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "index": tfds.features.Scalar(dtype=np.int64),
                    "image": tfds.features.Image(shape=(size, size, 3), dtype=np.uint8),
                    "caption": tfds.features.Text(),
                    **{key: _ground_truth_feature(size) for key in ("mask", "edges", "depth")},
                    "num_objects": tfds.features.Scalar(dtype=np.int64),
                    "background": tfds.features.ClassLabel(names=COLORS),
                    "objects": tfds.features.Sequence(
                        {**labels, "center": tfds.features.Tensor(shape=(2,), dtype=np.float32)}, length=MAX_OBJECTS
                    ),
                }
            ),
            disable_shuffling=True,  # Stored in index order.
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Rendered here; nothing to download.
        return {split: self._generate_examples(split) for split in SPLIT_IDS}

    def _generate_examples(self, split: str):
        config = self.builder_config
        num_examples = {"train": config.num_train, "test": config.num_test}[split]
        for index in range(num_examples):
            yield index, generate_example(config.seed, split, index, config.image_size)


def _ground_truth_feature(image_size: int) -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=(image_size, image_size), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB)
