"""Trains the shapes attribute classifier and measures the metrics built on it.

Writes WORKDIR/classifier.npz and the record RESULTS/shapes_classifier.{npz,md,json} (--results,
experiments/results by default; the .npz there is the project's classifier, the one
experiments/t2i_base.py judges with, committed so that records made on other machines are judged
by the same network, so in a clone the run needs a new --results: it refuses to overwrite it):
  - the accuracy of each head on the test split (and on the first test-size images of train);
  - prompt scoring (`score_images`) of the test images against their own captions (what a
    perfect generator scores) and against the next image's caption (mismatched prompts);
  - the same accuracies on test images degraded as a generator's decoder might (per-channel
    noise; `neighbour_blur`), and the colour segmentation's IoU against the ground-truth masks;
  - the Frechet distance to the train split of sample sets from perfect to broken.

  python -m experiments.train_shapes_classifier --config=configs/shapes_classifier.py \\
      --workdir=workdirs/shapes_classifier --results=workdirs/shapes_classifier/results
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ddm_jax.data.shapes import COLORS, PALETTE
from ddm_jax.evaluation import frechet
from ddm_jax.evaluation import shapes_metrics as sm
from ddm_jax.evaluation.classifier import CLASSIFIER_FILE, save_classifier

config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, f"Directory for {CLASSIFIER_FILE} (which must not exist yet).")
flags.DEFINE_string("results", "experiments/results", "Where shapes_classifier.{npz,md,json} go.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS
SEED = 0
NOISE = 8  # Uniform integer noise in [-NOISE, NOISE] per channel, clipped to [0, 255].
BLURS = (0.25, 0.5, 0.8)  # Weights of `shapes_metrics.neighbour_blur`.


def with_noise(images: np.ndarray, amplitude: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.integers(-amplitude, amplitude + 1, size=images.shape)
    return np.clip(images.astype(np.int32) + noise, 0, 255).astype(np.uint8)


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """10 log10(255^2 / mean squared error), in dB."""
    error = np.mean(np.square(images.astype(np.float64) - reference.astype(np.float64)))
    return float(10 * np.log10(255**2 / error))


def blank(images: np.ndarray) -> np.ndarray:
    """Each image filled with its background colour: its objects removed."""
    backgrounds = np.array(PALETTE, np.uint8)[sm.background_colors(images)]
    return np.broadcast_to(backgrounds[:, None, None], images.shape).copy()


def markdown(record: dict) -> str:
    heads = list(record["test"])

    def row(name, summary):
        return (
            f"| {name} | "
            + " | ".join(
                "-" if np.isnan(s["accuracy"]) else f"{s['accuracy']:.4f} ± {s['standard_error']:.4f}"
                for s in (summary[head] for head in heads)
            )
            + " |"
        )

    head_rows = "\n".join(
        [
            row(f"test labels ({record['num_test']} images)", record["test"]),
            row(f"train labels (first {record['num_test']})", record["train"]),
            row("test images, own captions", record["own_captions"]),
            row("test images, next image's caption", record["mismatched_captions"]),
            *(
                row(f"test labels, {name} ({record['psnr'][name]:.1f} dB)", record["degraded"][name])
                for name in record["degraded"]
            ),
        ]
    )
    counts = " | ".join(str(record["test"][head]["count"]) for head in heads)
    caption_counts = " | ".join(str(record["own_captions"][head]["count"]) for head in heads)
    iou_rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in record["segmentation_iou"].items())
    fd_rows = "\n".join(
        f"| {name} | {record['sample_sizes'][name]} | {value:.3f} |"
        for name, value in record["frechet_distance"].items()
    )
    return f"""# Shapes attribute classifier: the stand-in for CLIP score and the features of FID on shapes

Command: `{record["command"]}`, on {record["device"]}, 2 cores.

Classifier: {record["config"]} (channels {record["architecture"]["channels"]}, \
{record["architecture"]["features"]} features, input {record["architecture"]["image_shape"]}: \
`shapes_metrics.classifier_inputs`), {record["steps"]} AdamW steps of batch {record["batch_size"]} \
on the {record["num_train"]} train images of `{record["dataset"]}`, {record["train_seconds"]:.0f} s of training \
(compilation included). The weights: `{record["weights"]}`.

Accuracy per head (± binomial standard error). Multi-label heads (shapes, colors) are right when the
whole predicted set is; position, size and texture are scored on one-object images only, background
on captions that name it; "all" is right when every scored head of the image is.

| images | {" | ".join(heads)} |
|---|{"---|" * len(heads)}
{head_rows}
| images scored (labels) | {counts} |
| images scored (captions) | {caption_counts} |

Test shapes accuracy by scene: one object {record["shapes_by_scene"]["one object"]:.4f}, two objects apart \
{record["shapes_by_scene"]["two objects apart"]:.4f}, two objects overlapping \
{record["shapes_by_scene"]["two objects overlapping"]:.4f} \
({record["scene_counts"]["one object"]}, {record["scene_counts"]["two objects apart"]} and \
{record["scene_counts"]["two objects overlapping"]} test images).

Colour segmentation (`segment`, background = each image's most frequent colour) against the test
masks (objects 1 and 2 together), mean IoU:

| test images | mean IoU |
|---|---|
{iou_rows}

Frechet distance in the classifier's {record["architecture"]["features"]} penultimate features, against the
{record["num_train"]} train images:

| sample set | size | Frechet distance |
|---|---|---|
{fd_rows}

The test split is what a perfect sampler would produce: its distance is the floor at that sample
size. Colours permuted: every colour replaced by the next one of COLORS (shapes and layout intact);
blank: each image filled with its background colour; uniform: random bytes. Noise is uniform in
[-{NOISE}, {NOISE}] per channel (seed {SEED}); blur w is `neighbour_blur` of weight w, each pixel
blended with the mean of its 4-neighbours. The classifier was trained on images degraded by
`shapes_metrics.degrade` (blur weight up to {record["max_blur"]}, noise up to ±{record["max_noise"]}).
"""


def main(argv):
    del argv
    config = FLAGS.config
    path = os.path.join(FLAGS.workdir, CLASSIFIER_FILE)
    weights = os.path.join(FLAGS.results, "shapes_classifier.npz")
    for existing, flag in ((path, "--workdir"), (weights, "--results")):
        if os.path.exists(existing):
            raise ValueError(f"{existing} exists; give a new {flag} or move it away yourself (nothing was changed)")
    start = time.time()
    classifier = sm.train_shapes_classifier(config)
    train_seconds = time.time() - start
    os.makedirs(FLAGS.workdir, exist_ok=True)
    save_classifier(path, classifier)

    dataset, data_dir, batch_size = config.data.dataset, config.data.data_dir, config.eval.batch_size
    train, test = (sm.load_shapes(split, dataset, data_dir) for split in ("train", "test"))
    num_test = len(test["image"])
    rng = np.random.default_rng(SEED)
    test_targets = sm.attribute_targets(test["attributes"])
    test_scores = sm.score_predictions(sm.predict_attributes(classifier, test["image"], batch_size), test_targets)
    train_scores = sm.score_predictions(
        sm.predict_attributes(classifier, train["image"][:num_test], batch_size),
        sm.attribute_targets(train["attributes"][:num_test]),
    )
    mismatched = [test["caption"][(i + 1) % num_test] for i in range(num_test)]
    degraded_images = {
        f"noise ±{NOISE}": with_noise(test["image"], NOISE, rng),
        **{f"blur {w}": sm.neighbour_blur(test["image"], w) for w in BLURS},
    }

    one_object = test_targets["num_objects"] == 0
    overlapping = ~one_object & np.array([np.any(d == 2) for d in test["depth"]])
    scenes = {
        "one object": one_object,
        "two objects apart": ~one_object & ~overlapping,
        "two objects overlapping": overlapping,
    }
    permuted = np.array(PALETTE, np.uint8)[(sm.palette_labels(test["image"]) + 1) % len(COLORS)]
    sample_sets = {
        "test split": test["image"],
        "train split, random subset": train["image"][rng.permutation(len(train["image"]))[:num_test]],
        **{f"test, {name}": images for name, images in degraded_images.items()},
        "test, colours permuted": permuted,
        "test, blank (background only)": blank(test["image"]),
        "uniform random bytes": rng.integers(256, size=test["image"].shape).astype(np.uint8),
    }
    reference = sm.feature_statistics(classifier, train["image"], batch_size)
    config_file = config_flags.get_config_filename(FLAGS["config"])
    overrides = "".join(
        f" --config.{name}={value}" for name, value in config_flags.get_override_values(FLAGS["config"]).items()
    )
    record = {
        "command": f"python -m experiments.train_shapes_classifier --config={config_file} "
        f"--workdir={FLAGS.workdir}{overrides}",
        "config": config_file,
        "dataset": dataset,
        "classifier_file": path,
        "weights": weights,
        "architecture": classifier.architecture,
        "steps": config.training.num_steps,
        "batch_size": config.training.batch_size,
        "max_blur": config.training.max_blur,
        "max_noise": config.training.max_noise,
        "train_seconds": train_seconds,
        "num_train": len(train["image"]),
        "num_test": num_test,
        "test": sm.summary(test_scores),
        "train": sm.summary(train_scores),
        "own_captions": sm.summary(sm.score_images(classifier, test["image"], test["caption"], batch_size)),
        "mismatched_captions": sm.summary(sm.score_images(classifier, test["image"], mismatched, batch_size)),
        "degraded": {
            name: sm.summary(sm.score_predictions(sm.predict_attributes(classifier, images, batch_size), test_targets))
            for name, images in degraded_images.items()
        },
        "psnr": {name: psnr(images, test["image"]) for name, images in degraded_images.items()},
        "shapes_by_scene": {name: float(test_scores["shapes"].correct[where].mean()) for name, where in scenes.items()},
        "scene_counts": {name: int(where.sum()) for name, where in scenes.items()},
        "segmentation_iou": {
            "clean": float(sm.mask_iou(sm.segment(test["image"]), test["mask"]).mean()),
            **{
                name: float(sm.mask_iou(sm.segment(images), test["mask"]).mean())
                for name, images in degraded_images.items()
            },
        },
        "sample_sizes": {name: len(images) for name, images in sample_sets.items()},
        "frechet_distance": {
            name: frechet.frechet_distance(*sm.feature_statistics(classifier, images, batch_size), *reference)
            for name, images in sample_sets.items()
        },
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
    }
    os.makedirs(FLAGS.results, exist_ok=True)
    save_classifier(record["weights"], classifier)
    with open(os.path.join(FLAGS.results, "shapes_classifier.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(FLAGS.results, "shapes_classifier.md"), "w") as f:
        f.write(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    app.run(main)
