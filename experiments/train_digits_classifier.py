"""Trains the digits feature classifier, reports its test accuracy and sanity-checks the metric.

Writes WORKDIR/classifier.npz and experiments/results/digits_classifier.{md,json}: test accuracy,
and `sample_quality` of sample sets against the test split — the train split, whole and a random
subset of the test split's size (the floor a perfect sampler reaches), samples of independent per-pixel categoricals fitted on train (right
marginals, no structure) and uniform random integers (the worst).

  python -m experiments.train_digits_classifier --config=configs/digits_classifier.py --workdir=workdirs/digits_classifier
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ddm_jax.data import dataset_spec, load_split
from ddm_jax.evaluation.classifier import CLASSIFIER_FILE, accuracy, save_classifier, train_classifier
from ddm_jax.evaluation.sample_quality import sample_quality

config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, f"Directory for {CLASSIFIER_FILE} (which must not exist yet).")
flags.DEFINE_string("results", "experiments/results", "Where digits_classifier.{md,json} go.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS
SEED = 0


def per_pixel_samples(train: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Samples with each pixel drawn independently from its empirical distribution over train [N, ...]."""
    flat = train.reshape(len(train), -1)
    rows = rng.integers(len(flat), size=(num_samples, flat.shape[1]))
    return flat[rows, np.arange(flat.shape[1])].reshape(num_samples, *train.shape[1:])


def markdown(record: dict) -> str:
    qualities = record["sample_quality"]
    rows = "\n".join(
        f"| {name} | {record['sample_sizes'][name]} | {q['frechet_distance']:.3f} | "
        f"{q['class_total_variation']:.3f} | {q['mean_max_probability']:.3f} |"
        for name, q in qualities.items()
    )
    distributions = {
        "test split (reference)": record["test_class_distribution"],
        **{name: q["class_distribution"] for name, q in qualities.items()},
    }
    classes = range(len(record["test_class_distribution"]))
    distribution_rows = "\n".join(
        f"| {name} | " + " | ".join(f"{p:.3f}" for p in distribution) + " |"
        for name, distribution in distributions.items()
    )
    return f"""# Digits classifier: the feature network of the Frechet distance on digits

Command: `{record["command"]}`, on {record["device"]}, 2 cores.

Classifier: {record["config"]} (channels {record["architecture"]["channels"]}, \
{record["architecture"]["features"]} features), {record["steps"]} AdamW steps of batch {record["batch_size"]} on the {record["num_train"]} train images,
{record["train_seconds"]:.1f} s of training (compilation included).

| split | accuracy |
|---|---|
| test ({record["num_test"]} images) | {record["test_accuracy"]:.4f} |
| train | {record["train_accuracy"]:.4f} |

Sanity check of `ddm_jax.evaluation.sample_quality` against the {record["num_test"]} test images, in the \
classifier's {record["architecture"]["features"]} features (Frechet distance), its argmax classes (total variation between class distributions) and its confidence (mean max softmax probability;
test itself: {record["test_mean_max_probability"]:.3f}):

| sample set | size | Frechet distance | class TV | mean max-prob |
|---|---|---|---|---|
{rows}

The train split is what a perfect sampler would produce, so its distances are the floor at
those sample sizes (finite-sample bias, not a model error); the floor grows as the sample shrinks.
Per-pixel samples draw each pixel independently from its train marginal (seed {SEED}); uniform
samples are integers uniform in [0, {record["architecture"]["vocab_size"]}).

Class distributions (fraction of each set whose argmax logit is the class):

| sample set | {" | ".join(map(str, classes))} |
|---|{"---|" * len(classes)}
{distribution_rows}
"""


def main(argv):
    del argv
    config = FLAGS.config
    path = os.path.join(FLAGS.workdir, CLASSIFIER_FILE)
    if os.path.exists(path):
        raise ValueError(f"{path} exists; give a new --workdir or move it away yourself (nothing was changed)")
    start = time.time()
    classifier = train_classifier(config)
    train_seconds = time.time() - start
    os.makedirs(FLAGS.workdir, exist_ok=True)
    save_classifier(path, classifier)

    spec = dataset_spec(config.data.dataset, config.data.data_dir)
    train, test = (load_split(spec, split, config.data.data_dir) for split in ("train", "test"))
    batch_size = config.eval.batch_size
    rng = np.random.default_rng(SEED)
    sample_sets = {
        "train split": train["image"],
        "train split, random subset": train["image"][rng.permutation(len(train["image"]))[: len(test["image"])]],
        "per-pixel independent": per_pixel_samples(train["image"], len(test["image"]), rng),
        "uniform random integers": rng.integers(spec.vocab_size, size=test["image"].shape).astype(np.uint8),
    }
    qualities = {
        name: sample_quality(classifier.features, classifier.logits, samples, test["image"], batch_size)
        for name, samples in sample_sets.items()
    }
    config_file = config_flags.get_config_filename(FLAGS["config"])
    overrides = "".join(
        f" --config.{name}={value}" for name, value in config_flags.get_override_values(FLAGS["config"]).items()
    )
    command = (
        f"python -m experiments.train_digits_classifier --config={config_file} --workdir={FLAGS.workdir}{overrides}"
    )
    record = {
        "command": command,
        "config": config_file,
        "classifier_file": path,
        "architecture": classifier.architecture,
        "steps": config.training.num_steps,
        "batch_size": config.training.batch_size,
        "train_seconds": train_seconds,
        "num_train": len(train["image"]),
        "num_test": len(test["image"]),
        "test_accuracy": accuracy(classifier, test["image"], test["label"], batch_size),
        "train_accuracy": accuracy(classifier, train["image"], train["label"], batch_size),
        "test_mean_max_probability": next(iter(qualities.values()))["reference_mean_max_probability"],
        "test_class_distribution": next(iter(qualities.values()))["reference_class_distribution"].tolist(),
        "sample_sizes": {name: len(samples) for name, samples in sample_sets.items()},
        "sample_quality": {
            name: {
                "frechet_distance": q["frechet_distance"],
                "class_total_variation": q["class_total_variation"],
                "mean_max_probability": q["mean_max_probability"],
                "class_distribution": q["class_distribution"].tolist(),
            }
            for name, q in qualities.items()
        },
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
    }
    os.makedirs(FLAGS.results, exist_ok=True)
    with open(os.path.join(FLAGS.results, "digits_classifier.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(FLAGS.results, "digits_classifier.md"), "w") as f:
        f.write(markdown(record))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    app.run(main)
