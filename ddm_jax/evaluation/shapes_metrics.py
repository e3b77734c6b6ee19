"""Metrics of a text-to-image model trained on `shapes` (ddm_jax.data.shapes), the stand-ins for
CLIP score, segmentation IoU and FID.

Attribute classifier. A `Classifier` (ddm_jax.evaluation.classifier) with the heads `HEADS`,
trained on the train split's labels; it reads `classifier_inputs(images)`, the image with each
pixel's palette colour and the colour boundaries (the objects' outlines, whatever their colours):

  python -m experiments.train_shapes_classifier --config=configs/shapes_classifier.py --workdir=DIR

  num_objects  categorical, 2 classes: the number of objects less one;
  shapes       multi-label over SHAPES: the set of shapes present;
  colors       multi-label over COLORS: the set of the objects' colours;
  background   categorical over COLORS;
  position, size, texture   categorical over POSITIONS, SIZES, TEXTURES: the object's, trained
               on one-object images only (unlabelled, -1, on two-object images).

Scoring against prompts (`score_images`). A prompt, parsed by `shapes.parse_caption`, says what
each head should read (`prompt_targets`); an image is right on a head when the head's prediction
equals that: the same number of objects; the same SET of shapes and the same set of object
colours (so a two-object prompt is right on shape when both shapes, and no other, are seen; which
colour goes with which shape is not checked); the background colour when the prompt names one;
the position cell, size and texture for one-object prompts. "all" is right when every head the
prompt speaks to is. Accuracy is the mean over the images a head scores, with the binomial
standard error sqrt(p (1 - p) / n).

Segmentation (`segment`). Renders use exact colours, so each pixel of an image is given the colour
of the nearest of the 24 RGB values PALETTE and PATTERN_PALETTE, a texture's pattern shade
PATTERN_PALETTE[k] counting as colour k (a striped red star is one red region). The object mask
is every pixel not of the background colour (given, or the image's most frequent colour, which
is the background in every render: an object covers at most (28/64)^2 < 1/5 of the image), or
the pixels of a given object colour. On clean renders it equals the ground-truth mask exactly.
`mask_iou` compares masks, 1 when both are empty.

Frechet distance (`frechet_distance`): between Gaussians fitted to the classifier's penultimate
features of samples and of a reference, the train split (`load_shapes("train")["image"]`).
"""

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from ddm_jax.checks import ArgumentError, check, check_choice, check_int, check_interval
from ddm_jax.data import check_eval_split, dataset_spec
from ddm_jax.data.shapes import (
    COLORS,
    MAX_OBJECTS,
    PALETTE,
    PATTERN_PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    VOCABULARIES,
    ObjectLabels,
    ParsedCaption,
    edges_of,
    parse_caption,
)
from ddm_jax.evaluation import frechet
from ddm_jax.evaluation.classifier import TrainedClassifier, agreement, load_classifier, predict, train_classifier

HEADS = {
    "num_objects": MAX_OBJECTS,
    "shapes": len(SHAPES),
    "colors": len(COLORS),
    "background": len(COLORS),
    "position": len(POSITIONS),
    "size": len(SIZES),
    "texture": len(TEXTURES),
}
MULTI_LABEL = ("colors", "shapes")
SINGLE_OBJECT_HEADS = ("position", "size", "texture")  # Read on one-object images only.
ALL = "all"  # The score of every head a prompt speaks to at once.
INPUT_CHANNELS = 3 + len(COLORS) + 2  # Of `classifier_inputs`.
TRAIN_COMMAND = "python -m experiments.train_shapes_classifier --config=configs/shapes_classifier.py --workdir=DIR"

_LABEL_FEATURES = ("image", "mask", "depth", "caption", "num_objects", "background", "objects")
_READ_CHUNK_SIZE = 4096


def load_shapes(split: str, dataset: str = "shapes/32", data_dir: str | None = None) -> dict:
    """A split of a shapes dataset with its labels, through TFDS (prepared first if it is not).

    Args:
      split: "train" or "test".
      dataset: "shapes/32", "shapes/64", or a custom configuration prepared as "shapes/NAME".
      data_dir: the TFDS data directory (TFDS's default when None).

    Returns:
      {"image": uint8 [N, S, S, 3], "mask", "depth": uint8 [N, S, S], "caption": list of N str,
      "attributes": list of N ParsedCaption, each example's labels as `parse_caption` gives
      them (objects in draw order, the background always named)}, in stored (index) order.
    """
    check(
        dataset.partition("/")[0] == "shapes",
        "dataset",
        dataset,
        "a configuration of the shapes dataset, e.g. 'shapes/32'",
    )
    spec = dataset_spec(dataset, data_dir)  # Prepares it if it is not.
    builder = tfds.builder(dataset, data_dir=data_dir)
    check_eval_split(spec, split)
    read = builder.as_dataset(
        split=split, shuffle_files=False, decoders=tfds.decode.PartialDecoding(dict.fromkeys(_LABEL_FEATURES, True))
    )
    chunks = list(tfds.as_numpy(read.batch(_READ_CHUNK_SIZE)))
    features = {key: np.concatenate([chunk[key] for chunk in chunks]) for key in _LABEL_FEATURES if key != "objects"}
    objects = {key: np.concatenate([chunk["objects"][key] for chunk in chunks]) for key in ObjectLabels._fields}
    return {
        "image": features["image"],
        "mask": features["mask"],
        "depth": features["depth"],
        "caption": [text.decode("utf-8") for text in features["caption"]],
        "attributes": [
            _example_attributes(objects, index, int(num_objects), int(background))
            for index, (num_objects, background) in enumerate(
                zip(features["num_objects"], features["background"], strict=True)
            )
        ],
    }


def _example_attributes(objects: Mapping[str, np.ndarray], index: int, num_objects: int, background: int):
    """Example `index`'s ClassLabel indices (objects[field] [N, MAX_OBJECTS]) as a ParsedCaption."""
    return ParsedCaption(
        tuple(
            ObjectLabels(
                *(
                    vocabulary[objects[field][index, k]]
                    for field, vocabulary in zip(ObjectLabels._fields, VOCABULARIES, strict=True)
                )
            )
            for k in range(num_objects)
        ),
        COLORS[background],
    )


def attribute_targets(descriptions: Sequence[ParsedCaption]) -> dict[str, np.ndarray]:
    """What each head should read for each description (a parsed prompt, or an example's labels).

    Returns:
      {head: labels} for every head of HEADS: int32 [N] class indices for categorical heads (-1
      where the description does not say: an unnamed background, position, size and texture of
      two objects), uint8 [N, classes] multi-hot for "shapes" and "colors".
    """
    rows = [_targets(description) for description in descriptions]
    return {
        name: np.array([row[name] for row in rows], np.uint8 if name in MULTI_LABEL else np.int32).reshape(
            len(rows), *((classes,) if name in MULTI_LABEL else ())
        )
        for name, classes in HEADS.items()
    }


def _targets(description: ParsedCaption) -> dict:
    objects = description.objects
    alone = objects[0] if len(objects) == 1 else None
    return {
        "num_objects": len(objects) - 1,
        "shapes": [int(any(o.shape == shape for o in objects)) for shape in SHAPES],
        "colors": [int(any(o.color == color for o in objects)) for color in COLORS],
        "background": -1 if description.background is None else COLORS.index(description.background),
        **{
            name: -1 if alone is None else getattr(VOCABULARIES, name).index(getattr(alone, name))
            for name in SINGLE_OBJECT_HEADS
        },
    }


def prompt_targets(prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """`attribute_targets` of the prompts, parsed by `parse_caption`.

    Raises:
      ArgumentError: naming prompts[i], the first prompt that is not a caption of the dataset.
    """
    check(not isinstance(prompts, str), "prompts", prompts, "a sequence of prompts, not one string")
    descriptions = []
    for index, prompt in enumerate(prompts):
        try:
            descriptions.append(parse_caption(prompt))
        except ArgumentError as error:
            raise error.renamed(f"prompts[{index}]") from None
    return attribute_targets(descriptions)


def shuffled_batches(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int) -> Iterator[dict]:
    """Endless batches of the rows of `arrays` (all [N, ...], with "image"), in the input
    pipeline's order: epoch e visits them in the order numpy.random.default_rng([seed, e]).permutation(N),
    dropping the incomplete last batch."""
    num_examples = len(arrays["image"])
    check_int("batch_size", batch_size, minimum=1, maximum=num_examples)
    check_int("seed", seed, minimum=0)
    return (
        {key: array[order[start : start + batch_size]] for key, array in arrays.items()}
        for epoch in itertools.count()
        for order in [np.random.default_rng([seed, epoch]).permutation(num_examples)]
        for start in range(0, num_examples - batch_size + 1, batch_size)
    )


def neighbour_blur(images: np.ndarray, weights: np.ndarray | float) -> np.ndarray:
    """uint8 images [N, S, S, 3] blended with the mean of each pixel's 4-neighbours (edges
    repeated): (1 - w) x + w mean(neighbours), w per image (or one for all), rounded.

    A stand-in for a decoder's blur: w = 0.25, 0.5, 0.8 cost a shapes test image about 36, 30 and
    26 dB of PSNR.
    """
    x = _checked_images(images).astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    neighbours = (padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]) / 4
    w = np.reshape(np.asarray(weights, np.float32), (-1, 1, 1, 1))
    return np.clip(np.round((1 - w) * x + w * neighbours), 0, 255).astype(np.uint8)


def degrade(images: np.ndarray, rng: np.random.Generator, max_blur: float, max_noise: int) -> np.ndarray:
    """Training augmentation standing in for a generator's artefacts: per image a `neighbour_blur`
    of weight w ~ U[0, max_blur], then per channel integer noise uniform in [-a, a], with
    a ~ U{0, ..., max_noise} per image; clipped to [0, 255]."""
    blurred = neighbour_blur(images, rng.uniform(0, max_blur, size=len(images))).astype(np.int32)
    amplitudes = rng.integers(max_noise + 1, size=(len(images), 1, 1, 1))
    noise = rng.integers(-amplitudes, amplitudes + 1, size=blurred.shape)
    return np.clip(blurred + noise, 0, 255).astype(np.uint8)


def train_shapes_classifier(config: ml_collections.ConfigDict) -> TrainedClassifier:
    """The attribute classifier (HEADS) trained on the train split of config.data.dataset, each
    batch `degrade`d (training.max_blur, training.max_noise; batch s draws from
    numpy.random.default_rng([training.seed, s])) before `classifier_inputs`.

    Args:
      config: a classifier config for a shapes dataset (configs/shapes_classifier.py).
    """
    check_interval("training.max_blur", config.training.max_blur, 0.0, 1.0, closed_high=True)
    check_int("training.max_noise", config.training.max_noise, minimum=0, maximum=255)
    train = load_shapes("train", config.data.dataset, config.data.data_dir)
    arrays = {"image": train["image"], **attribute_targets(train["attributes"])}
    seed = config.training.seed
    batches = (
        {
            **batch,
            "image": classifier_inputs(
                degrade(
                    batch["image"],
                    np.random.default_rng([seed, step]),
                    config.training.max_blur,
                    config.training.max_noise,
                )
            ),
        }
        for step, batch in enumerate(shuffled_batches(arrays, config.training.batch_size, seed))
    )
    image_shape = (*train["image"].shape[1:3], INPUT_CHANNELS)
    return train_classifier(config, HEADS, MULTI_LABEL, batches, image_shape)


def load_shapes_classifier(path: str, image_size: int | None = None) -> TrainedClassifier:
    """The attribute classifier saved at `path`; refused, naming the field, if its heads are not
    HEADS, or (when image_size is given) it reads other than image_size x image_size images."""
    expected = {"heads": HEADS, "multi_label": MULTI_LABEL}
    if image_size is not None:
        expected["image_shape"] = (image_size, image_size, INPUT_CHANNELS)
    return load_classifier(path, expected, train_command=TRAIN_COMMAND)


def predict_attributes(classifier: TrainedClassifier, images: np.ndarray, batch_size: int = 500) -> dict:
    """The attribute classifier's `classifier.predict` of images uint8 [N, S, S, 3], batch by batch."""
    images = _checked_images(images)
    chunks = [
        predict(classifier, classifier_inputs(images[start : start + batch_size]), batch_size)
        for start in range(0, len(images), batch_size)
    ]
    return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in classifier.heads}


def attribute_features(classifier: TrainedClassifier, images: np.ndarray) -> np.ndarray:
    """The attribute classifier's penultimate features [N, F] of images uint8 [N, S, S, 3]."""
    return np.asarray(classifier.features(classifier_inputs(images)))


class Score(NamedTuple):
    """One head's agreement with what was asked, over N images."""

    correct: np.ndarray  # bool [N]: scored, and the prediction is what was asked
    scored: np.ndarray  # bool [N]: the prompt (or label) says what this head reads
    accuracy: float  # mean of correct over the scored images; nan if none is
    standard_error: float  # sqrt(accuracy (1 - accuracy) / number scored)


def _score(correct: np.ndarray, scored: np.ndarray) -> Score:
    count = int(scored.sum())
    accuracy = float(correct[scored].mean()) if count else float("nan")
    return Score(correct & scored, scored, accuracy, float(np.sqrt(accuracy * (1 - accuracy) / max(count, 1))))


def score_predictions(predictions: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]) -> dict[str, Score]:
    """Each head's Score, and ALL's, of predictions against targets (`attribute_targets` layout).

    Args:
      predictions: {head: prediction} for every head of HEADS, as `classifier.predict` gives them.
      targets: {head: labels}, from `prompt_targets` or `attribute_targets`.

    Returns:
      {head: Score} for every head, and ALL: right when every scored head of the image is.
    """
    scores = {name: _score(*agreement(predictions[name], targets[name], name in MULTI_LABEL)) for name in HEADS}
    every_head_right = np.all([score.correct | ~score.scored for score in scores.values()], axis=0)
    return {**scores, ALL: _score(every_head_right, np.ones_like(every_head_right))}


def score_images(
    classifier: TrainedClassifier, images: np.ndarray, prompts: Sequence[str], batch_size: int = 500
) -> dict[str, Score]:
    """Whether each image shows what its prompt says, in the attribute classifier's eyes.

    Args:
      classifier: the attribute classifier (`load_shapes_classifier`).
      images: uint8 [N, S, S, 3], S the classifier's image size.
      prompts: N captions of the shapes dataset, one per image.
      batch_size: images per classifier call.

    Returns:
      `score_predictions` of the classifier's predictions against the prompts: {head: Score}
      and ALL; "shapes", "colors", "position" and "num_objects" are the shape, colour, position
      and count accuracies.

    Raises:
      ArgumentError: for a prompt that is not a caption (naming prompts[i]), a number of prompts
        other than of images, images that are not uint8 [N, S, S, 3], or another classifier.
    """
    images = _checked_images(images)
    targets = prompt_targets(prompts)
    check(len(prompts) == len(images), "prompts", f"{len(prompts)} prompts", f"one per image ({len(images)})")
    check(
        classifier.heads == HEADS and set(classifier.multi_label) == set(MULTI_LABEL),
        "classifier",
        f"a classifier with heads {classifier.heads}",
        f"the shapes attribute classifier, heads {HEADS}",
    )
    return score_predictions(predict_attributes(classifier, images, batch_size), targets)


def summary(scores: Mapping[str, Score]) -> dict[str, dict]:
    """{head: {"accuracy", "standard_error", "count"}}: the numbers of `score_predictions`, for JSON
    (strict JSON: a head that scores no image, whose accuracy is nan, is left out)."""
    return {
        name: {"accuracy": s.accuracy, "standard_error": s.standard_error, "count": int(s.scored.sum())}
        for name, s in scores.items()
        if s.scored.any()
    }


def by_object_count(scores: Mapping[str, Score], prompts: Sequence[str]) -> dict[int, dict[str, Score]]:
    """The scores over the prompts that ask for one object and over those that ask for two, apart.

    Args:
      scores: {head: Score} of `score_images` (or `score_predictions`) for these prompts.
      prompts: the N captions the images were scored against.

    Returns:
      {k: {head: Score}} for k = 1 .. MAX_OBJECTS: each Score restricted to the prompts that ask for
      k objects (a head none of them speaks to has accuracy nan).
    """
    objects = prompt_targets(prompts)["num_objects"] + 1
    check(
        all(len(score.scored) == len(objects) for score in scores.values()),
        "prompts",
        f"{len(objects)} prompts",
        "the prompts the scores were computed for",
    )
    asked = {count: objects == count for count in range(1, MAX_OBJECTS + 1)}
    return {
        count: {name: _score(score.correct, score.scored & mask) for name, score in scores.items()}
        for count, mask in asked.items()
    }


def summaries(scores: Mapping[str, Score], prompts: Sequence[str]) -> dict:
    """{"scores": `summary` over all prompts, "by_objects": {"k": `summary` over the prompts asking
    for k objects}} of `score_images`'s scores for these prompts, for JSON."""
    return {
        "scores": summary(scores),
        "by_objects": {str(count): summary(split) for count, split in by_object_count(scores, prompts).items()},
    }


def paired_difference(a: Score, b: Score) -> dict:
    """{"difference", "standard_error"}: the accuracy of a minus that of b over the images both score,
    +- the standard error of the mean of the per-image differences. For two models judged on the
    same prompts from the same initial noise: a paired comparison, tighter than two binomial errors.
    ArgumentError when a and b are not of the same images (lengths differ)."""
    check(len(a.scored) == len(b.scored), "b", f"a Score of {len(b.scored)} images", f"one of a's {len(a.scored)}")
    scored = a.scored & b.scored
    differences = a.correct[scored].astype(float) - b.correct[scored].astype(float)
    count = len(differences)
    return {  # nan where too few images are scored (as `Score.accuracy`), not an error after sampling
        "difference": float(differences.mean()) if count else float("nan"),
        "standard_error": float(differences.std(ddof=1) / np.sqrt(count)) if count > 1 else float("nan"),
    }


_PALETTE_ENTRIES = np.array(PALETTE + PATTERN_PALETTE, np.int32)  # Entry e is colour e % len(COLORS).


def nearest_palette_entries(images: np.ndarray) -> np.ndarray:
    """int [N, S, S]: per pixel the index e of the nearest RGB value in PALETTE + PATTERN_PALETTE
    (Euclidean distance, ties to the first): colour COLORS[e % 12], a pattern shade when e >= 12.

    Args:
      images: uint8 [N, S, S, 3].
    """
    images = _checked_images(images).astype(np.int32)
    nearest = np.zeros(images.shape[:-1], np.int64)
    least = np.full(images.shape[:-1], np.iinfo(np.int32).max)
    for entry, rgb in enumerate(_PALETTE_ENTRIES):
        distance = np.sum(np.square(images - rgb), axis=-1)
        closer = distance < least
        nearest[closer], least[closer] = entry, distance[closer]
    return nearest


def palette_labels(images: np.ndarray) -> np.ndarray:
    """int [N, S, S]: each pixel's colour, the COLORS index of `nearest_palette_entries`, so that a
    pattern shade PATTERN_PALETTE[k] counts as colour k (a textured object is one region)."""
    return nearest_palette_entries(images) % len(COLORS)


def classifier_inputs(images: np.ndarray) -> np.ndarray:
    """What the attribute classifier reads: uint8 [N, S, S, INPUT_CHANNELS], the RGB channels, then
    255 times the one-hot over COLORS of each pixel's colour (`palette_labels`), whether the pixel
    is a pattern shade, and whether a 4-neighbour has another colour (colour boundaries,
    `shapes.edges_of`). The colours make the colour heads exact and the boundaries give the shape
    heads outlines whatever the colours.

    Args:
      images: uint8 [N, S, S, 3].
    """
    entries = nearest_palette_entries(images)
    labels = entries % len(COLORS)
    boundaries = np.stack([edges_of(image_labels) for image_labels in labels]).astype(bool)
    channels = [labels[..., None] == np.arange(len(COLORS)), entries[..., None] >= len(COLORS), boundaries[..., None]]
    return np.concatenate([np.asarray(images), *(255 * channel.astype(np.uint8) for channel in channels)], axis=-1)


def segment(
    images: np.ndarray, *, background: str | Sequence[str] | None = None, color: str | Sequence[str] | None = None
) -> np.ndarray:
    """bool [N, S, S] object masks of images by colour (`palette_labels`), as the module docstring says.

    Args:
      images: uint8 [N, S, S, 3].
      background: the background colour (one for all images, or one per image); None: each
        image's most frequent colour. The mask is the pixels of any other colour.
      color: an object colour (one, or one per image); the mask is its pixels. Give at most
        one of background and color.

    Returns:
      The masks, True on the object(s).
    """
    check(background is None or color is None, "color", color, "None when background is given")
    labels = palette_labels(images)
    if color is not None:
        return labels == _color_indices("color", color, len(labels))[:, None, None]
    if background is None:
        backgrounds = _most_frequent(labels)
    else:
        backgrounds = _color_indices("background", background, len(labels))
    return labels != backgrounds[:, None, None]


def background_colors(images: np.ndarray) -> np.ndarray:
    """int [N]: each image's most frequent colour (`palette_labels`), its background in every render."""
    return _most_frequent(palette_labels(images))


def _most_frequent(labels: np.ndarray) -> np.ndarray:
    counts = np.stack([np.sum(labels == k, axis=(1, 2)) for k in range(len(COLORS))], axis=1)
    return np.argmax(counts, axis=1)


def _color_indices(argument: str, colors: str | Sequence[str], num_images: int) -> np.ndarray:
    """int [num_images]: the COLORS index of one colour name, or of one per image."""
    if isinstance(colors, str):
        check_choice(argument, colors, COLORS)
        return np.full(num_images, COLORS.index(colors))
    check(len(colors) == num_images, argument, colors, f"one colour of COLORS, or one per image ({num_images})")
    for index, name in enumerate(colors):
        check_choice(f"{argument}[{index}]", name, COLORS)
    return np.array([COLORS.index(name) for name in colors])


def mask_iou(predicted: np.ndarray, target: np.ndarray) -> np.ndarray:
    """float [N]: per image |P and T| / |P or T| of two masks [N, ...] (non-zero is inside, so a
    dataset `mask` with objects 1 and 2 counts both); 1 where both masks are empty.

    Raises:
      ArgumentError: if the masks' shapes differ or have no image axis.
    """
    predicted, target = np.asarray(predicted) != 0, np.asarray(target) != 0
    check(predicted.ndim >= 2, "predicted", f"shape {predicted.shape}", "masks [N, H, W]")
    check(target.shape == predicted.shape, "target", f"shape {target.shape}", f"predicted's shape {predicted.shape}")
    axes = tuple(range(1, predicted.ndim))
    intersection, union = np.sum(predicted & target, axis=axes), np.sum(predicted | target, axis=axes)
    return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def feature_statistics(
    classifier: TrainedClassifier, images: np.ndarray, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """(mean [F], covariance [F, F]) of the attribute classifier's penultimate features of images
    uint8 [N, S, S, 3]: those of a reference (the train split), computed once for many sample sets."""
    features = frechet.batched_features(lambda batch: attribute_features(classifier, batch), images, batch_size)
    return frechet.feature_statistics(features)


def frechet_distance(
    classifier: TrainedClassifier, samples: np.ndarray, reference: np.ndarray, batch_size: int = 500
) -> float:
    """Frechet distance (Heusel et al. 2017, eq. 6) between Gaussians fitted to the attribute
    classifier's penultimate features of samples and of reference (the train split,
    `load_shapes("train")["image"]`), both uint8 [N, S, S, 3]; with reference statistics computed
    once, `frechet.frechet_distance(*feature_statistics(classifier, samples), *reference_statistics)`."""
    return frechet.frechet_distance_of(
        lambda batch: attribute_features(classifier, batch), samples, reference, batch_size
    )


def _checked_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    check(
        images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3,
        "images",
        f"{images.dtype} array of shape {images.shape}",
        "uint8 [N, S, S, 3]",
    )
    return images
