"""Tests of ddm_jax.data.shapes: the renderer's ground truth, the captions and the TFDS builder.

Ground truth is checked against the documented definitions, recomputed here:
pixel (i, j) of an S x S image is the point ((j + 1/2) / S, (i + 1/2) / S);
small and large objects have radius 9/64 and 14/64 of the image side.
"""

import math
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import ndimage

from ddm_jax.checks import ArgumentError
from ddm_jax.data import shapes

RADII = {"small": 9 / 64, "large": 14 / 64}
POSITION_WORDS = {
    (0, 0): "in the top left corner",
    (0, 1): "at the top",
    (0, 2): "in the top right corner",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left corner",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right corner",
}
SHAPE_AREAS = {  # In units of r^2 (the shapes' closed forms, SHAPE docstrings).
    "circle": math.pi,
    "square": 4.0,
    "triangle": 2.0,
    "diamond": 2.0,
    "ring": math.pi * 3 / 4,
    "cross": 2 * 2 * (2 / 3) - (2 / 3) ** 2,
    # Ten triangles (centre, outer vertex at 1, inner vertex at sin 18 / sin 54), 36 degrees apart.
    "star": 10 * 0.5 * math.sin(math.pi / 10) / math.sin(3 * math.pi / 10) * math.sin(math.pi / 5),
    # A square of half-diagonal d plus two half discs of radius d / sqrt 2, d = 2 (sqrt 2 - 1).
    "heart": (2 * (math.sqrt(2) - 1)) ** 2 * (2 + math.pi / 2),
}


def _examples(seed: int, count: int, image_size: int) -> list[dict]:
    return [shapes.generate_example(seed, "train", index, image_size) for index in range(count)]


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    """Examples at both image sizes."""
    return _examples(0, 300, 32) + _examples(1, 80, 64)


def _objects(example: dict) -> list[dict]:
    """Each present object's labels (as words), centre, radius and full silhouette (hidden pixels included)."""
    mask, depth, features = example["mask"], example["depth"], example["objects"]
    objects = []
    for k in range(example["num_objects"]):
        labels = {
            field: vocabulary[features[field][k]]
            for field, vocabulary in zip(shapes.ObjectLabels._fields, shapes.VOCABULARIES, strict=True)
        }
        # Only the back object (1) has hidden pixels: those where the front one lies on it.
        full = (mask == k + 1) | ((depth == 2) & (k == 0))
        objects.append(
            {**labels, "center": tuple(features["center"][k]), "radius": RADII[labels["size"]], "full": full}
        )
    return objects


def _pixel_centers(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    rows, columns = np.indices((image_size, image_size))
    return (columns + 0.5) / image_size, (rows + 0.5) / image_size


def _documented_pattern(texture: str, image_size: int) -> np.ndarray:
    """Where the pattern colour goes: stripes are bands of P/2 in i + j, dots discs of radius P/4 at cell centres."""
    period = image_size // 8
    rows, columns = np.indices((image_size, image_size))
    if texture == "stripes":
        return np.floor((rows + columns) / (period / 2)) % 2 == 0
    if texture == "dots":
        nearest_y = (np.floor((rows + 0.5) / period) + 0.5) * period
        nearest_x = (np.floor((columns + 0.5) / period) + 0.5) * period
        return np.hypot(rows + 0.5 - nearest_y, columns + 0.5 - nearest_x) <= period / 4
    return np.zeros((image_size, image_size), bool)


def _cell(coordinate: float) -> int:
    return 0 if coordinate < 1 / 3 else 1 if coordinate < 2 / 3 else 2


def _bounding_box_center(pixels: np.ndarray) -> tuple[float, float]:
    """(x, y) of the centre of the pixels' bounding box, in image sides."""
    rows, columns = np.nonzero(pixels)
    size = pixels.shape[0]
    return (columns.min() + columns.max() + 1) / (2 * size), (rows.min() + rows.max() + 1) / (2 * size)


def test_same_seed_gives_the_same_bytes_and_other_seeds_or_splits_differ():
    def as_bytes(example):
        return b"".join(
            example[key].tobytes() if isinstance(example[key], np.ndarray) else repr(example[key]).encode()
            for key in sorted(example)
        )

    first = [as_bytes(shapes.generate_example(7, "train", index)) for index in range(20)]
    assert first == [as_bytes(shapes.generate_example(7, "train", index)) for index in range(20)]
    other_seed = [as_bytes(shapes.generate_example(8, "train", index)) for index in range(20)]
    other_split = [as_bytes(shapes.generate_example(7, "test", index)) for index in range(20)]
    assert all(a != b for a, b in zip(first, other_seed, strict=True))
    assert all(a != b for a, b in zip(first, other_split, strict=True))


def test_examples_are_drawn_from_the_documented_generator():
    rng = np.random.default_rng([4, 1, 9])
    scene = shapes.sample_attributes(rng)
    text = shapes.caption(scene, rng)
    example = shapes.generate_example(4, "test", 9, 64)
    assert example["caption"] == text
    np.testing.assert_array_equal(example["image"], shapes.render(scene, 64)["image"])
    assert shapes.scene_from_example(example) == scene


def test_background_pixels_have_the_background_colour_and_objects_theirs(examples):
    for example in examples:
        image, mask = example["image"], example["mask"]
        size = len(image)
        background = np.array(shapes.PALETTE[example["background"]])
        np.testing.assert_array_equal(image[mask == 0], np.broadcast_to(background, image[mask == 0].shape))
        for k, scene_object in enumerate(_objects(example), 1):
            color = shapes.COLORS.index(scene_object["color"])
            pattern = _documented_pattern(scene_object["texture"], size)
            expected = np.where(pattern[..., None], shapes.PATTERN_PALETTE[color], shapes.PALETTE[color])
            np.testing.assert_array_equal(image[mask == k], expected[mask == k])


def test_circles_and_squares_cover_exactly_the_pixel_centres_of_their_definition(examples):
    checked = 0
    for example in examples:
        x, y = _pixel_centers(len(example["mask"]))
        for scene_object in _objects(example):
            (center_x, center_y), radius = scene_object["center"], scene_object["radius"]
            if scene_object["shape"] == "circle":
                expected = (x - center_x) ** 2 + (y - center_y) ** 2 <= radius**2
            elif scene_object["shape"] == "square":
                expected = (np.abs(x - center_x) <= radius) & (np.abs(y - center_y) <= radius)
            else:
                continue
            np.testing.assert_array_equal(scene_object["full"], expected)
            checked += 1
    assert checked >= 40


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_every_shape_has_its_closed_form_area(shape):
    image_size = 64
    radius_pixels = RADII["large"] * image_size
    counts = [
        shapes.silhouette(shapes.SceneObject(shape, "red", "large", "plain", center), image_size).sum()
        for center in ((0.5 + 0.5 / 1024, 0.5 + 0.5 / 1024), (0.3 + 1.5 / 1024, 0.61 + 2.5 / 1024))
    ]
    np.testing.assert_allclose(counts, SHAPE_AREAS[shape] * radius_pixels**2, rtol=0.06)


def test_every_object_fits_its_square_and_its_bounding_box_is_centred_on_it(examples):
    for example in examples:
        size = len(example["mask"])
        x, y = _pixel_centers(size)
        for scene_object in _objects(example):
            (center_x, center_y), radius = scene_object["center"], scene_object["radius"]
            outside = (np.abs(x - center_x) > radius) | (np.abs(y - center_y) > radius)
            assert not np.any(scene_object["full"] & outside)
            box_x, box_y = _bounding_box_center(scene_object["full"])
            assert abs(box_x - center_x) <= 1 / size and abs(box_y - center_y) <= 1 / size, scene_object["shape"]
            assert radius <= min(center_x, center_y) and max(center_x, center_y) <= 1 - radius


def test_edges_mark_the_pixels_with_a_4_neighbour_of_another_region(examples):
    cross = ndimage.generate_binary_structure(2, 1)
    for example in examples[::5]:
        mask = example["mask"]
        expected = ndimage.maximum_filter(mask, footprint=cross, mode="nearest") != ndimage.minimum_filter(
            mask, footprint=cross, mode="nearest"
        )
        np.testing.assert_array_equal(example["edges"], expected.astype(np.uint8))
        np.testing.assert_array_equal(shapes.edges_of(mask), expected.astype(np.uint8))


def test_captions_name_each_object_with_its_attributes_and_position(examples):
    for example in examples:
        text = example["caption"]
        for scene_object in _objects(example):
            box_x, box_y = _bounding_box_center(scene_object["full"])
            position = POSITION_WORDS[(_cell(box_y), _cell(box_x))]
            texture = "" if scene_object["texture"] == "plain" else f" with {scene_object['texture']}"
            phrase = f"a {scene_object['size']} {scene_object['color']} {scene_object['shape']}{texture} {position}"
            assert phrase in text, (phrase, text)
            assert POSITION_WORDS[(_cell(scene_object["center"][1]), _cell(scene_object["center"][0]))] == position
        named_background = re.search(r"(\w+) background", text)
        if named_background:
            assert named_background.group(1) == shapes.COLORS[example["background"]]


def test_position_labels_are_the_grid_cells_of_the_centres(examples):
    for example in examples:
        for scene_object in _objects(example):
            center_x, center_y = scene_object["center"]
            assert shapes.POSITIONS.index(scene_object["position"]) == 3 * _cell(center_y) + _cell(center_x)


def test_parse_caption_recovers_the_labels_and_background(examples):
    for example in examples:
        parsed = shapes.parse_caption(example["caption"])
        labels = [shapes.ObjectLabels(*(o[field] for field in shapes.ObjectLabels._fields)) for o in _objects(example)]
        assert sorted(parsed.objects) == sorted(labels)
        if "background" in example["caption"]:
            assert parsed.background == shapes.COLORS[example["background"]]
        else:
            assert parsed.background is None


def test_the_front_object_is_visible_where_objects_overlap_and_the_back_one_mostly(examples):
    overlapping = 0
    for example in examples:
        mask, depth, image = example["mask"], example["depth"], example["image"]
        np.testing.assert_array_equal(depth == 0, mask == 0)
        if example["num_objects"] == 1:
            np.testing.assert_array_equal(depth, mask)
            continue
        overlap = depth == 2
        assert np.all(mask[overlap] == 2)
        front = _objects(example)[1]
        color = shapes.COLORS.index(front["color"])
        allowed = {shapes.PALETTE[color], shapes.PATTERN_PALETTE[color]}
        assert {tuple(pixel) for pixel in image[overlap]} <= allowed
        back = _objects(example)[0]["full"]
        assert np.sum(mask == 1) >= 0.5 * np.sum(back)
        overlapping += bool(np.any(overlap))
    assert overlapping >= 10


def test_colours_are_distinct_and_patterns_are_not_palette_colours(examples):
    for example in examples:
        colors = [shapes.COLORS.index(o["color"]) for o in _objects(example)] + [example["background"]]
        assert len(set(colors)) == len(colors)
    palette = np.array(shapes.PALETTE, float)
    pattern_palette = np.array(shapes.PATTERN_PALETTE, float)
    distances = np.linalg.norm(pattern_palette[:, None] - palette[None], axis=-1)
    assert distances.min() >= 48
    assert len(set(shapes.PALETTE)) == len(shapes.COLORS) == 12


def test_every_vocabulary_word_occurs(examples):
    for field, vocabulary in zip(shapes.ObjectLabels._fields, shapes.VOCABULARIES, strict=True):
        seen = {o[field] for example in examples for o in _objects(example)}
        assert seen == set(vocabulary), field


def test_rare_words_never_occur_in_captions(examples):
    words = {word for example in examples for word in re.findall("[a-z]+", example["caption"])}
    assert words <= set(shapes.CAPTION_VOCABULARY)
    assert not set(shapes.RARE_WORDS) & set(shapes.CAPTION_VOCABULARY)
    for example in examples:
        assert not any(rare in example["caption"] for rare in shapes.RARE_WORDS)


def test_mistakes_are_clear_errors():
    with pytest.raises(ArgumentError, match="image_size=48"):
        shapes.render(shapes.sample_attributes(np.random.default_rng(0)), 48)
    with pytest.raises(ArgumentError, match="shape='hexagon'"):
        shapes.SceneObject("hexagon", "red", "small", "plain", (0.5, 0.5))
    with pytest.raises(ArgumentError, match="text="):
        shapes.parse_caption("a sks star on the left")
    with pytest.raises(ArgumentError, match="split='validation'"):
        shapes.generate_example(0, "validation", 0)
    with pytest.raises(ArgumentError, match="num_train=0"):
        shapes.ShapesConfig(name="empty", num_train=0)


def test_tfds_builder_prepares_offline_and_reads_back_each_example(tmp_path):
    config = shapes.ShapesConfig(name="tiny", image_size=32, num_train=6, num_test=3, seed=3)
    builder = tfds.builder("shapes", config=config, data_dir=str(tmp_path))
    builder.download_and_prepare()
    assert builder.info.features["objects"]["shape"].names == [*shapes.SHAPES, "none"]
    for split, size in (("train", 6), ("test", 3)):
        stored = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        np.testing.assert_array_equal(stored["index"], np.arange(size))
        for index in range(size):
            expected = shapes.generate_example(3, split, index, 32)
            assert stored["caption"][index].decode() == expected["caption"]
            for key in ("image", "mask", "edges", "depth", "num_objects", "background"):
                np.testing.assert_array_equal(stored[key][index], expected[key])
            for key, value in expected["objects"].items():
                np.testing.assert_array_equal(stored["objects"][key][index], value)


def test_named_config_64_has_64x64_images():
    builder = tfds.builder("shapes/64", data_dir="/nonexistent")
    assert builder.builder_config.image_size == 64
    assert builder.info.features["image"].shape == (64, 64, 3)


@pytest.mark.parametrize("attribute", (*shapes.ObjectLabels._fields, "background"))
def test_caption_pair_differs_in_the_attribute_alone(attribute):
    rng = np.random.default_rng(0)
    for _ in range(20):
        first, second = (shapes.parse_caption(text) for text in shapes.caption_pair(attribute, rng))
        labels = [{**parsed.objects[0]._asdict(), "background": parsed.background} for parsed in (first, second)]
        assert {key for key in labels[0] if labels[0][key] != labels[1][key]} == {attribute}
        assert all(label["color"] != label["background"] for label in labels)


def test_caption_pair_names_an_unknown_attribute():
    with pytest.raises(ArgumentError, match="attribute='colour': expected one of"):
        shapes.caption_pair("colour", np.random.default_rng(0))
