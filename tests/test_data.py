"""Tests of ddm_jax.data: the offline digits builder and the input pipeline."""

import concurrent.futures
import itertools
import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from ddm_jax import data
from ddm_jax.checks import ArgumentError
from ddm_jax.data import pipeline


class UnreachableSource(tfds.core.GeneratorBasedBuilder):
    """A dataset whose source cannot be fetched, as without a network."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        image = tfds.features.Image(shape=(2, 2, 1))
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"image": image}))

    def _split_generators(self, dl_manager):
        raise ConnectionError("no route to host")

    def _generate_examples(self):
        yield from ()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """A TFDS data_dir with digits prepared in it."""
    path = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("digits", data_dir=path).download_and_prepare()
    return path


@pytest.fixture(scope="module")
def digits_splits(data_dir) -> dict[str, dict[str, np.ndarray]]:
    return {
        split: tfds.as_numpy(tfds.load("digits", split=split, data_dir=data_dir, batch_size=-1))
        for split in ("train", "test")
    }


def _rows(images: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Examples as rows (flattened image, then label), sorted lexicographically."""
    rows = images.reshape(len(images), -1).astype(np.int64)
    if labels is not None:
        rows = np.concatenate([rows, labels[:, None]], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def _image_keys(images: np.ndarray) -> list[bytes]:
    """sklearn's digit images are all distinct, so an image's bytes name its example."""
    return [image.tobytes() for image in images]


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iterator, count))


def test_digits_splits_partition_sklearn_digits(digits_splits):
    train, test = digits_splits["train"], digits_splits["test"]
    assert (len(train["image"]), len(test["image"])) == (1437, 360)
    assert not set(_image_keys(train["image"])) & set(_image_keys(test["image"]))
    for split in (train, test):
        assert split["image"].shape[1:] == (8, 8, 1) and split["image"].dtype == np.uint8
    sklearn_digits = load_digits()
    union = _rows(np.concatenate([train["image"], test["image"]]), np.concatenate([train["label"], test["label"]]))
    np.testing.assert_array_equal(union, _rows(sklearn_digits.images, sklearn_digits.target))
    assert union[:, :-1].min() == 0 and union[:, :-1].max() == 16


def test_digits_test_split_is_the_tail_of_the_seeded_permutation(digits_splits):
    sklearn_digits = load_digits()
    test_indices = np.random.default_rng(0).permutation(1797)[-360:]
    np.testing.assert_array_equal(
        _rows(digits_splits["test"]["image"], digits_splits["test"]["label"]),
        _rows(sklearn_digits.images[test_indices], sklearn_digits.target[test_indices]),
    )


def test_digits_vocab_size_metadata_survives_reload(data_dir):
    prepared_dir = tfds.builder("digits", data_dir=data_dir).data_dir
    reloaded = tfds.builder_from_directory(prepared_dir)  # Reads the files, not the Digits class.
    assert dict(reloaded.info.metadata.items()) == {"vocab_size": 17}


def test_dataset_spec_of_digits(data_dir):
    spec = data.dataset_spec("digits", data_dir)
    assert spec == data.DatasetSpec(
        name="digits",
        image_shape=(8, 8, 1),
        vocab_size=17,
        num_classes=10,
        split_sizes={"train": 1437, "test": 360},
    )


def test_dataset_spec_prepares_digits_in_an_empty_data_dir(tmp_path):
    assert data.dataset_spec("digits", str(tmp_path)).split_sizes == {"train": 1437, "test": 360}


# mock_data makes download_and_prepare a no-op and leaves the data unprepared: it needs download=True.


@pytest.mark.parametrize("name, image_shape", [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 1))])
def test_dataset_spec_of_mocked_tfds_datasets(tmp_path, name, image_shape):
    with tfds.testing.mock_data(num_examples=4):
        spec = data.dataset_spec(name, str(tmp_path), download=True)
    assert (spec.name, spec.image_shape, spec.vocab_size, spec.num_classes) == (
        name,
        image_shape,
        256,
        10,
    )


def test_unknown_dataset_name_is_a_clear_error(tmp_path):
    with pytest.raises(ArgumentError, match=r"dataset='no_such_dataset': expected a TFDS dataset such as"):
        data.dataset_spec("no_such_dataset", str(tmp_path))


def _listing(root) -> list[str]:
    """Every file and folder under `root`, relative to it."""
    return sorted(
        os.path.relpath(os.path.join(folder, name), root)
        for folder, folders, files in os.walk(root)
        for name in folders + files
    )


@pytest.fixture
def used_data_dir(tmp_path) -> str:
    """A data_dir already holding things a failed preparation must keep: a download, a dataset folder."""
    (tmp_path / "downloads" / "extracted").mkdir(parents=True)
    (tmp_path / "downloads" / "earlier.tar").write_bytes(b"kept")
    (tmp_path / "unreachable_source" / "0.9.0").mkdir(parents=True)
    return str(tmp_path)


@pytest.mark.parametrize("name", ["unreachable_source", "cifar10"])
def test_unprepared_dataset_is_refused_at_once_without_download(used_data_dir, name):
    before = _listing(used_data_dir)
    start = time.perf_counter()
    with pytest.raises(ArgumentError) as info:
        data.train_batches(name, batch_size=2, seed=0, data_dir=used_data_dir)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert message.startswith(f"dataset={name!r}: expected a dataset prepared under {used_data_dir},")
    assert f"`tfds build {name} --data_dir={used_data_dir}`" in message and "download=True" in message
    assert _listing(used_data_dir) == before


def test_failed_download_is_a_clear_error_and_leaves_nothing_behind(used_data_dir):
    before = _listing(used_data_dir)
    with pytest.raises(ArgumentError) as info:
        data.dataset_spec("unreachable_source", used_data_dir, download=True)
    message = str(info.value)
    assert message.startswith(
        f"dataset='unreachable_source': expected a dataset that can be prepared under {used_data_dir}"
    )
    assert "preparing it failed: ConnectionError('no route to host')" in message
    assert "tfds build unreachable_source" in message
    assert isinstance(info.value.__cause__, ConnectionError)
    assert _listing(used_data_dir) == before


def test_failed_download_into_a_new_data_dir_removes_it(tmp_path):
    data_dir = tmp_path / "new" / "tfds"
    with pytest.raises(ArgumentError, match="preparing it failed"):
        data.dataset_spec("unreachable_source", str(data_dir), download=True)
    assert list(tmp_path.iterdir()) == []


def test_a_process_waits_for_another_preparing_the_data_dir_and_then_reads_its_dataset(tmp_path):
    # This test stands for the other process: it holds the lock and prepares digits under it.
    root = tmp_path / "tfds"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with pipeline._preparation_lock(root):
            waiting = pool.submit(data.dataset_spec, "digits", str(root))
            time.sleep(1.0)
            assert not waiting.done() and not root.exists()
            tfds.builder("digits", data_dir=str(root)).download_and_prepare()
            prepared = {path: path.stat().st_mtime_ns for path in root.rglob("*")}
        assert waiting.result(timeout=120).split_sizes == {"train": 1437, "test": 360}
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*")} == prepared  # not prepared again


def test_train_batches_shapes_dtypes_and_values(data_dir, digits_splits):
    batch = next(data.train_batches("digits", batch_size=32, seed=0, data_dir=data_dir))
    assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    train_labels = dict(zip(_image_keys(digits_splits["train"]["image"]), digits_splits["train"]["label"], strict=True))
    assert [train_labels[key] for key in _image_keys(batch["image"])] == batch["label"].tolist()


def test_train_batches_are_a_function_of_the_seed(data_dir):
    def first_batches(seed):
        return _take(data.train_batches("digits", batch_size=64, seed=seed, data_dir=data_dir), 3)

    same, again, other = first_batches(7), first_batches(7), first_batches(8)
    for a, b in zip(same, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(same[0]["image"], other[0]["image"])


def test_each_epoch_visits_distinct_examples_and_is_reshuffled(data_dir, digits_splits):
    steps_per_epoch = 1437 // 100
    batches = _take(data.train_batches("digits", batch_size=100, seed=3, data_dir=data_dir), 2 * steps_per_epoch)
    epochs = [
        _image_keys(np.concatenate([b["image"] for b in batches[e * steps_per_epoch : (e + 1) * steps_per_epoch]]))
        for e in range(2)
    ]
    train_keys = set(_image_keys(digits_splits["train"]["image"]))
    for keys in epochs:
        assert len(set(keys)) == len(keys) == steps_per_epoch * 100
        assert set(keys) <= train_keys
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("start_step", [5, 12, 100])
def test_start_step_resumes_where_a_run_left_off(data_dir, start_step):
    fresh = data.train_batches("digits", batch_size=100, seed=1, data_dir=data_dir)
    expected = _take(itertools.islice(fresh, start_step, None), 4)  # 14 steps per epoch.
    resumed = _take(data.train_batches("digits", batch_size=100, seed=1, data_dir=data_dir, start_step=start_step), 4)
    for a, b in zip(expected, resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def assert_processes_make_up_global_batches(per_process, global_batches, keys):
    """Each global batch is the processes' batches of the same step, stacked in process order."""
    for step, global_batch in enumerate(global_batches):
        for key in keys:
            np.testing.assert_array_equal(
                np.concatenate([process[step][key] for process in per_process]), global_batch[key]
            )


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_split_the_global_train_batch(data_dir, process_count):
    def batches(**kwargs):
        return _take(data.train_batches("digits", batch_size=96, seed=5, data_dir=data_dir, **kwargs), 16)

    global_batches = batches()
    per_process = [batches(process_index=p, process_count=process_count) for p in range(process_count)]
    assert_processes_make_up_global_batches(per_process, global_batches, ("image", "label"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=101, process_count=2), r"batch_size=101: expected a multiple of process_count=2"),
        (dict(batch_size=100, process_index=2, process_count=2), r"process_index=2: expected an integer in \[0, 1\]"),
        (dict(batch_size=100, process_count=0), r"process_count=0: expected an integer >= 1"),
        (dict(batch_size=0), r"batch_size=0: expected an integer >= 1"),
        (dict(batch_size=2000), r"batch_size=2000: expected at most the 1437 training examples"),
        (dict(batch_size=100, seed=-1), r"seed=-1: expected an integer >= 0"),
        (dict(batch_size=100, start_step=-3), r"start_step=-3: expected an integer >= 0"),
    ],
)
def test_bad_train_arguments_are_clear_errors(data_dir, kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        data.train_batches("digits", data_dir=data_dir, **{"seed": 0, **kwargs})


def test_eval_batches_count_every_example_once(data_dir, digits_splits):
    batches = list(data.eval_batches("digits", batch_size=64, data_dir=data_dir))
    assert len(batches) == 6  # 360 = 5 * 64 + 40.
    assert all(b["image"].shape == (64, 8, 8, 1) and b["mask"].shape == (64,) for b in batches)
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    test = digits_splits["test"]
    np.testing.assert_array_equal(_rows(images, labels), _rows(test["image"], test["label"]))
    assert batches[-1]["mask"].sum() == 40 and not batches[-1]["mask"][40:].any()
    assert not batches[-1]["image"][40:].any() and not batches[-1]["label"][40:].any()


def test_processes_split_the_eval_pass(data_dir):
    global_batches = list(data.eval_batches("digits", batch_size=64, data_dir=data_dir))
    per_process = [
        list(data.eval_batches("digits", batch_size=64, data_dir=data_dir, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert len(per_process[0]) == len(per_process[1]) == len(global_batches)
    assert_processes_make_up_global_batches(per_process, global_batches, ("image", "label", "mask"))


def test_eval_batches_reject_uneven_process_split(data_dir):
    with pytest.raises(ArgumentError, match=r"batch_size=63: expected a multiple of process_count=2"):
        data.eval_batches("digits", batch_size=63, data_dir=data_dir, process_count=2)


def test_mocked_cifar10_through_the_pipeline(tmp_path):
    with tfds.testing.mock_data(num_examples=10):
        spec = data.dataset_spec("cifar10", str(tmp_path), download=True)
        train = next(data.train_batches(spec, batch_size=4, seed=0, data_dir=str(tmp_path), download=True))
        evaluation = list(data.eval_batches(spec, batch_size=4, data_dir=str(tmp_path), download=True))
    assert train["image"].shape == (4, 32, 32, 3) and train["image"].dtype == np.uint8
    assert train["label"].shape == (4,) and train["label"].dtype == np.int32
    assert ((train["label"] >= 0) & (train["label"] < 10)).all()
    assert len(evaluation) == 3 and sum(int(b["mask"].sum()) for b in evaluation) == 10
    assert all(b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8 for b in evaluation)


# Augmentation through the pipeline ------------------------------------------------------------


def _turned(image: np.ndarray, element: int) -> np.ndarray:
    """Group element e of an [H, W, C] image: horizontal flip if e >= 4, then e % 4 quarter turns."""
    return np.rot90(np.flip(image, axis=1) if element >= 4 else image, k=element % 4)


def test_augmented_batches_are_the_plain_batches_transformed_as_cond_says(data_dir):
    def batches(**kwargs):
        return _take(data.train_batches("digits", batch_size=64, seed=4, data_dir=data_dir, **kwargs), 3)

    for plain, augmented in zip(batches(), batches(augment="dihedral"), strict=True):
        assert "cond" not in plain
        assert augmented["cond"].shape == (64, 8) and augmented["cond"].dtype == np.float32
        np.testing.assert_array_equal(augmented["label"], plain["label"])
        for image, original, cond in zip(augmented["image"], plain["image"], augmented["cond"], strict=True):
            assert cond.sum() == 1.0
            np.testing.assert_array_equal(image, _turned(original, int(cond.argmax())))
        assert len(np.unique(augmented["cond"].argmax(axis=1))) > 1


@pytest.mark.parametrize("start_step", [3, 15])
def test_augmented_run_resumes_where_it_left_off(data_dir, start_step):
    def batches(**kwargs):
        return data.train_batches("digits", batch_size=100, seed=1, data_dir=data_dir, augment="dihedral", **kwargs)

    expected = _take(itertools.islice(batches(), start_step, None), 3)
    for a, b in zip(expected, _take(batches(start_step=start_step), 3), strict=True):
        for key in ("image", "label", "cond"):
            np.testing.assert_array_equal(a[key], b[key])


def test_processes_split_the_augmented_global_batch(data_dir):
    def batches(**kwargs):
        batches = data.train_batches("digits", batch_size=96, seed=5, data_dir=data_dir, augment="dihedral", **kwargs)
        return _take(batches, 4)

    global_batches = batches()
    per_process = [batches(process_index=p, process_count=3) for p in range(3)]
    assert_processes_make_up_global_batches(per_process, global_batches, ("image", "label", "cond"))


def test_unknown_augmentation_is_a_clear_error(data_dir):
    with pytest.raises(ValueError, match=r"augment='rotate': expected None"):
        data.train_batches("digits", batch_size=8, seed=0, data_dir=data_dir, augment="rotate")


def test_mocked_cifar10_augmented(tmp_path):
    with tfds.testing.mock_data(num_examples=10):
        batches = data.train_batches(
            "cifar10", batch_size=4, seed=0, data_dir=str(tmp_path), augment="dihedral", download=True
        )
        batch = next(batches)
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["cond"].shape == (4, 8)


# Downsampled ImageNet -------------------------------------------------------------------------


def _write_metadata(data_dir: str, name: str, split_sizes: dict[str, int]) -> None:
    """The dataset_info.json a prepared `name` would have, so TFDS (and its mock) sees it as prepared."""
    builder = tfds.builder(name, data_dir=data_dir)
    builder.data_path.mkdir(parents=True)
    splits = [tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in split_sizes.items()]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.info.write_to_directory(builder.data_path)


def _fake_images(split: str, num: int, size: int) -> np.ndarray:
    return np.random.default_rng(len(split)).integers(0, 256, (num, size, size, 3), dtype=np.uint8)


@pytest.fixture
def mock_imagenet32(tmp_path):
    """downsampled_imagenet/32x32 mocked with 12 train and 5 validation images from `_fake_images`."""
    split_sizes = {"train": 12, "validation": 5}
    _write_metadata(str(tmp_path), "downsampled_imagenet/32x32", split_sizes)

    def as_dataset(builder, split, **kwargs):
        del builder, kwargs
        return tf.data.Dataset.from_tensor_slices({"image": _fake_images(split, split_sizes[split], 32)})

    with tfds.testing.mock_data(data_dir=str(tmp_path), as_dataset_fn=as_dataset):
        yield str(tmp_path)


def test_downsampled_imagenet32_through_the_pipeline(mock_imagenet32):
    spec = data.dataset_spec("downsampled_imagenet/32x32", mock_imagenet32)
    assert spec == data.DatasetSpec(
        name="downsampled_imagenet/32x32",
        image_shape=(32, 32, 3),
        vocab_size=256,
        num_classes=None,
        split_sizes={"train": 12, "validation": 5},
    )
    train = next(data.train_batches(spec, batch_size=4, seed=0, data_dir=mock_imagenet32, augment="dihedral"))
    assert set(train) == {"image", "cond"}
    assert train["image"].shape == (4, 32, 32, 3) and train["image"].dtype == np.uint8
    train_keys = set(_image_keys(_fake_images("train", 12, 32)))
    inverse = [0, 3, 2, 1, 4, 5, 6, 7]  # Turns undo with opposite turns; reflections undo themselves.
    turned_back = [
        _turned(image, inverse[int(cond.argmax())]) for image, cond in zip(train["image"], train["cond"], strict=True)
    ]
    assert set(_image_keys(np.stack(turned_back))) <= train_keys
    evaluation = list(data.eval_batches(spec, split="validation", batch_size=4, data_dir=mock_imagenet32))
    assert len(evaluation) == 2
    images = np.concatenate([b["image"][b["mask"]] for b in evaluation])
    np.testing.assert_array_equal(images, _fake_images("validation", 5, 32))


def test_downsampled_imagenet_has_no_test_split(mock_imagenet32):
    expected = (
        r"split='test': expected one of the splits \['train', 'validation'\] of dataset 'downsampled_imagenet/32x32'"
    )
    with pytest.raises(ArgumentError, match=expected):
        data.eval_batches("downsampled_imagenet/32x32", batch_size=4, data_dir=mock_imagenet32)


@pytest.mark.parametrize("size", [32, 64])
def test_unprepared_downsampled_imagenet_says_how_to_prepare_it_by_hand(tmp_path, size):
    name = f"downsampled_imagenet/{size}x{size}"
    with pytest.raises(ValueError, match=rf"dataset='{name}': expected a dataset prepared under") as info:
        data.train_batches(name, batch_size=4, seed=0, data_dir=str(tmp_path))
    message = str(info.value)
    for step in (
        f"train_{size}x{size}.tar",
        f"valid_{size}x{size}.tar",
        f"tfds build {name} --manual_dir=MANUAL_DIR --data_dir=DATA_DIR",
        "DownloadConfig(manual_dir='MANUAL_DIR')",
        "--config.data.data_dir=DATA_DIR",
        str(tmp_path),
    ):
        assert step in message
    assert list(tmp_path.iterdir()) == []  # Nothing was downloaded or written.


def test_a_split_larger_than_host_memory_is_refused_before_reading(tmp_path):
    _write_metadata(str(tmp_path), "downsampled_imagenet/64x64", {"train": 10**12})

    def as_dataset(builder, split, **kwargs):
        del builder, split, kwargs  # 10**12 images that are never produced: the size alone must refuse.
        return tf.data.Dataset.range(10**12).map(lambda i: {"image": tf.zeros((64, 64, 3), tf.uint8)})

    with tfds.testing.mock_data(data_dir=str(tmp_path), as_dataset_fn=as_dataset):
        gib = 10**12 * 64 * 64 * 3 / 2**30
        expected = rf"dataset='downsampled_imagenet/64x64': .* its 'train' split needs {gib:.1f} GiB of host memory"
        with pytest.raises(ArgumentError, match=expected):
            data.load_split("downsampled_imagenet/64x64", "train", str(tmp_path))


class CaptionedDots(tfds.core.GeneratorBasedBuilder):
    """Four 2x2 images, each with a caption naming its one bright pixel: a text feature to read."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {"image": tfds.features.Image(shape=(2, 2, 1)), "caption": tfds.features.Text()}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index in range(4):
            image = np.zeros((2, 2, 1), np.uint8)
            image.flat[index] = 255
            yield index, {"image": image, "caption": f"a dot at pixel {index} ü"}


def test_text_features_are_read_as_strings_beside_the_images(tmp_path):
    tfds.builder("captioned_dots", data_dir=str(tmp_path)).download_and_prepare()
    arrays = data.load_split("captioned_dots", "train", str(tmp_path), text_features=("caption",))
    assert arrays["caption"].dtype == object and arrays["caption"].shape == (4,)
    for image, caption in zip(arrays["image"], arrays["caption"], strict=True):
        assert caption == f"a dot at pixel {int(np.argmax(image.ravel()))} ü"
    with pytest.raises(ValueError, match=r"text_features=\('image',\): expected text features"):
        data.load_split("captioned_dots", "train", str(tmp_path), text_features=("image",))
