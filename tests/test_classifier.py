"""The digits feature classifier (training, save/load, refusals) and the sample-quality metric."""

import math

import numpy as np
import pytest

from configs import digits_classifier
from ddm_jax.data import load_split
from ddm_jax.evaluation import classifier as clf
from ddm_jax.evaluation.sample_quality import sample_quality

STEPS = 60  # test accuracy 0.86-0.92 over seeds 0-4 at 60 steps; chance is 0.1


def tiny_config(data_dir, **training):
    config = digits_classifier.get_config()
    config.data.data_dir = str(data_dir)
    config.training.update(training)
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def trained(data_dir):
    return clf.train_classifier(tiny_config(data_dir, num_steps=STEPS))


@pytest.fixture(scope="module")
def test_split(data_dir):
    return load_split("digits", "test", str(data_dir))


def test_training_raises_test_accuracy_well_above_chance(trained, test_split):
    assert clf.accuracy(trained, test_split["image"], test_split["label"], batch_size=100) > 0.8


def test_features_and_logits_have_the_configured_widths(trained, test_split):
    images = test_split["image"][:5]
    assert trained.features(images).shape == (5, 128)
    assert trained.logits(images).shape == (5, 10)


def test_save_load_round_trip_gives_identical_logits(trained, test_split, tmp_path):
    path = tmp_path / clf.CLASSIFIER_FILE
    clf.save_classifier(path, trained)
    loaded = clf.load_classifier(path, expected=trained.architecture)
    assert loaded.architecture == trained.architecture
    np.testing.assert_array_equal(
        np.asarray(loaded.logits(test_split["image"])), np.asarray(trained.logits(test_split["image"]))
    )


def test_save_never_overwrites(trained, tmp_path):
    path = tmp_path / clf.CLASSIFIER_FILE
    path.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="exists"):
        clf.save_classifier(path, trained)
    assert path.read_bytes() == b"user data"


def test_load_refuses_another_architecture_naming_the_field(trained, tmp_path):
    path = tmp_path / clf.CLASSIFIER_FILE
    clf.save_classifier(path, trained)
    clf.load_classifier(path, expected={"image_shape": (8, 8, 1), "vocab_size": 17})  # the data's fields agree
    with pytest.raises(ValueError, match=r"features=128, expected features=64"):
        clf.load_classifier(path, expected={**trained.architecture, "features": 64})
    with pytest.raises(ValueError, match=r"image_shape=\[8, 8, 1\], expected image_shape=\[32, 32, 3\]"):
        clf.load_classifier(path, expected={"image_shape": (32, 32, 3)})


def test_missing_file_names_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m experiments.train_digits_classifier"):
        clf.load_classifier(tmp_path / "absent.npz")


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, 8, 8, 1), np.float32), "expected integers"),
        (np.zeros((2, 8, 8), np.int32), "expected integers of shape"),
        (np.full((2, 8, 8, 1), 17, np.int32), r"expected values in \[0, 17\)"),
    ],
)
def test_classifier_refuses_images_it_was_not_trained_on(trained, images, message):
    with pytest.raises(ValueError, match=message):
        trained.features(images)


def test_config_with_too_many_stages_for_the_image_is_refused(data_dir):
    config = tiny_config(data_dir)
    config.classifier.channels = (8, 8, 8, 8)
    with pytest.raises(ValueError, match=r"classifier.channels=\(8, 8, 8, 8\)"):
        clf.train_classifier(config)


def first_pixels_as_logits(images, classes=4):
    """Hand-built logits: the first `classes` pixels of each image."""
    return np.asarray(images, np.float64).reshape(len(images), -1)[:, :classes] / 100.0


def test_class_distribution_and_confidence_match_an_independent_computation():
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 1000, size=(53, 2, 2, 1))
    reference = rng.integers(0, 1000, size=(41, 2, 2, 1)) * np.array([1, 2, 1, 1]).reshape(1, 2, 2, 1)

    def expected(images):
        rows = first_pixels_as_logits(images).tolist()
        winners = [max(range(4), key=lambda c: row[c]) for row in rows]
        distribution = np.array([winners.count(c) / len(rows) for c in range(4)])
        confidence = np.mean([max(math.exp(v) for v in row) / sum(math.exp(v) for v in row) for row in rows])
        return distribution, confidence

    quality = sample_quality(first_pixels_as_logits, first_pixels_as_logits, samples, reference, batch_size=7)
    (p, p_confidence), (q, q_confidence) = expected(samples), expected(reference)
    np.testing.assert_allclose(quality["class_distribution"], p, atol=1e-12)
    np.testing.assert_allclose(quality["reference_class_distribution"], q, atol=1e-12)
    np.testing.assert_allclose(quality["class_total_variation"], 0.5 * np.abs(p - q).sum(), atol=1e-12)
    np.testing.assert_allclose(quality["mean_max_probability"], p_confidence, rtol=1e-10)
    np.testing.assert_allclose(quality["reference_mean_max_probability"], q_confidence, rtol=1e-10)
    assert quality["class_total_variation"] > 0.1  # reference favours class 1


def test_frechet_distance_is_zero_to_itself_and_the_squared_shift_under_a_linear_feature_map():
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((12, 5))

    def linear_features(images):
        return images.reshape(len(images), -1) @ matrix

    def logits(images):
        return linear_features(images)[:, :3]

    samples = rng.standard_normal((200, 3, 4))
    shift = rng.standard_normal((3, 4))
    assert sample_quality(linear_features, logits, samples, samples, batch_size=64)["frechet_distance"] < 1e-9
    shifted = sample_quality(linear_features, logits, samples + shift, samples, batch_size=64)
    np.testing.assert_allclose(shifted["frechet_distance"], np.sum((shift.reshape(-1) @ matrix) ** 2), rtol=1e-6)
