"""Input pipeline for TFDS image datasets (digits, mnist, cifar10, downsampled_imagenet/32x32, ...)
and a user's own images ("folder:PATH", "npz:PATH"; see `ddm_jax.data.local`).

Every dataset takes the same path: a split is read once (through TFDS, or from
the user's files) into host memory as integer arrays, and batches are gathered
from them with numpy indexing. Memory is the limit of this design: each process holds its own copy
of the training split (CIFAR-10: 150 MB; ImageNet 32x32: 3.9 GB; ImageNet
64x64: 15.7 GB), and a split larger than the host's available memory is refused
with a ValueError before it is read.

Training order. Epoch e visits the split's examples (in their stored order) in
the order `numpy.random.default_rng([seed, e]).permutation(n)`, cut into global
batches of `batch_size`; the incomplete last batch of each epoch is dropped
(each epoch is reshuffled, so no example is left out for long). Step s is batch
s mod (n // batch_size) of epoch s // (n // batch_size), so a run restarted at
step s sees exactly the batches an uninterrupted run would, at the cost of one
permutation.

Processes. Process p of P yields rows [p * b, (p + 1) * b), b = batch_size // P,
of each global batch, so the processes together see the global batch that one
process would.

Augmentation (`augment="dihedral"`, training only) transforms each row of
global batch s by a function of (seed, s, row) and adds its conditioning
"cond" (see `ddm_jax.data.augment`), so resuming and splitting over processes
keep the guarantees above. Evaluation batches are never augmented; the model
is evaluated with `identity_cond`.

Preparation. The project's own TFDS builders (those of `ddm_jax.data`:
"digits", and "fashion_mnist_debian" where Debian's files are installed) are
prepared on first use without a network. Any other TFDS dataset that is not
prepared is refused at once, naming the data_dir searched and how to prepare
it, unless `download=True` allows TFDS to download and prepare it; an attempt
that fails removes the files and folders it created in the data_dir. The processes
of one host take turns to prepare datasets in a data_dir (a lock file in the
temp directory), so two commands started together on a fresh machine prepare a
dataset once.

Downsampled ImageNet cannot be downloaded automatically; it is prepared by hand
once (`ddm_jax.data.imagenet`). Its held-out split is "validation": pass it as
`eval_batches(split=...)` (config field data.eval_split).
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import math
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import psutil
import tensorflow as tf
import tensorflow_datasets as tfds

from ddm_jax.checks import ArgumentError, check, check_int
from ddm_jax.data import imagenet, local
from ddm_jax.data.augment import augment_batch, check_augment
from ddm_jax.data.fashion_mnist import FashionMnistDebian

Batch = dict[str, np.ndarray]

_READ_CHUNK_SIZE = 4096
# How deep under a data_dir a failed preparation is looked for what it created: TFDS writes
# DATA_DIR/NAME[/CONFIG]/incomplete.*, DATA_DIR/downloads/* and DATA_DIR/downloads/extracted/*.
_CREATED_PATHS_DEPTH = 3


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset, read from its TFDS info or the user's files.

    split_sizes maps each split to its number of examples; it is empty when
    TFDS does not know them (e.g. under `tfds.testing.mock_data`). image_size is
    the (H, W) a "folder:" dataset's images are resized to, None when they are
    read at their own size.
    """

    name: str
    image_shape: tuple[int, int, int]
    vocab_size: int
    num_classes: int | None
    split_sizes: Mapping[str, int] = dataclasses.field(hash=False)
    image_size: tuple[int, int] | None = None


def dataset_spec(
    name: str, data_dir: str | None = None, *, image_size: tuple[int, int] | None = None, download: bool = False
) -> DatasetSpec:
    """The spec of dataset `name`, preparing it first if it is a TFDS dataset not prepared yet.

    Args:
      name: a TFDS dataset ("digits", "cifar10", ...) or the user's images, "folder:PATH" or "npz:PATH".
      data_dir: the TFDS data directory (TFDS's default when None); unused by local data.
      image_size: (H, W) to resize a "folder:" dataset's images to; None for every other dataset.
      download: whether a TFDS dataset that is not prepared, and needs the network to be, may be
        downloaded and prepared here.

    Returns:
      The dataset's DatasetSpec.
    """
    local.check_image_size(name, image_size)
    if local.is_local(name):
        image_shape, vocab_size, split_sizes = local.describe(name, image_size)
        return DatasetSpec(
            name=name,
            image_shape=image_shape,
            vocab_size=vocab_size,
            num_classes=None,
            split_sizes=split_sizes,
            image_size=None if image_size is None else tuple(image_size),
        )
    return _spec_from_builder(name, _prepared_builder(name, data_dir, download))


def train_batches(
    spec_or_name: DatasetSpec | str,
    *,
    batch_size: int,
    seed: int,
    data_dir: str | None = None,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    augment: str | None = None,
    image_size: tuple[int, int] | None = None,
    download: bool = False,
) -> Iterator[Batch]:
    """Endless training batches of this process: {"image", "label", "cond"}.

    image: [b, H, W, C] integers in [0, vocab_size) (uint8 for 8-bit images);
    label: int32 [b], present when the dataset has class labels;
    cond: float32 [b, AUGMENT_COND_DIM[augment]], present when `augment` is set;
    b = batch_size // process_count. `batch_size` is the global batch size and
    `start_step` the number of global batches already consumed. `augment` is
    None or "dihedral" (square images only). `image_size` and `download` are
    those of `dataset_spec`, used when a name is given. The order is described
    in this module's docstring.
    """
    spec = _as_spec(spec_or_name, data_dir, image_size, download)
    check_augment(augment, spec.image_shape)
    arrays = load_split(spec, "train", data_dir, download=download)
    return batches_of_arrays(
        arrays,
        batch_size=batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
        augment=augment,
    )


def batches_of_arrays(
    arrays: Batch,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    augment: str | None = None,
) -> Iterator[Batch]:
    """Endless training batches of this process from in-memory arrays [n, ...] (a split, or features
    computed from one, e.g. latents and token ids), in the order of this module's docstring; the
    arguments are `train_batches`'. Every array of `arrays` is gathered with the same indices."""
    local_batch_size = _local_batch_size(batch_size, process_index, process_count)
    check_int("seed", seed, minimum=0)
    check_int("start_step", start_step, minimum=0)
    num_examples = len(next(iter(arrays.values())))
    check(batch_size <= num_examples, "batch_size", batch_size, f"at most the {num_examples} training examples")
    first_row = process_index * local_batch_size
    rows = slice(first_row, first_row + local_batch_size)
    return _train_batches(arrays, batch_size, seed, start_step, rows, augment)


def eval_batches(
    spec_or_name: DatasetSpec | str,
    *,
    split: str = "test",
    batch_size: int,
    data_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    image_size: tuple[int, int] | None = None,
    download: bool = False,
) -> Iterator[Batch]:
    """One pass over `split` in its stored order: {"image", "label", "mask"}.

    Global batch i holds examples [i * batch_size, (i + 1) * batch_size), split
    over processes as in training. Every process yields the same number of
    batches of b = batch_size // process_count rows; rows past the end of the
    split are zeros with mask False, so each example is counted exactly once.
    Images are never augmented. `image_size` and `download` are those of
    `dataset_spec`, used when a name is given.
    """
    local_batch_size = _local_batch_size(batch_size, process_index, process_count)
    spec = _as_spec(spec_or_name, data_dir, image_size, download)
    check_eval_split(spec, split)
    arrays = load_split(spec, split, data_dir, download=download)
    return _padded_batches(arrays, batch_size, process_index * local_batch_size, local_batch_size)


def check_eval_split(spec: DatasetSpec, split: str) -> None:
    """Raises ArgumentError if the dataset's splits are known and `split` is not one of them."""
    if spec.split_sizes:
        check(
            split in spec.split_sizes,
            "split",
            split,
            f"one of the splits {sorted(spec.split_sizes)} of dataset {spec.name!r}",
        )


def _as_spec(
    spec_or_name: DatasetSpec | str, data_dir: str | None, image_size: tuple[int, int] | None, download: bool
) -> DatasetSpec:
    if isinstance(spec_or_name, DatasetSpec):
        return spec_or_name
    return dataset_spec(spec_or_name, data_dir, image_size=image_size, download=download)


def _prepared_builder(name: str, data_dir: str | None, download: bool) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `name`, prepared if it is not yet and may be (see the module docstring)."""
    _hide_gpus_from_tensorflow()
    builder = _builder(name, data_dir)
    if builder.is_prepared():
        return builder
    if imagenet.is_downsampled_imagenet(builder):
        raise ArgumentError("dataset", name, imagenet.not_prepared_expectation(name, builder))
    root = Path(builder.data_dir_root)
    obstacle = _offline_obstacle(name, builder, root)
    if obstacle is not None and not download:
        raise ArgumentError(
            "dataset",
            name,
            f"a dataset prepared under {root}, or one that can be prepared there without a network; "
            f"{name!r} is neither. {obstacle}; or pass download=True to download it here",
        )
    with _preparation_lock(root):
        builder = _builder(name, data_dir)  # another process may have prepared it while this one waited
        if builder.is_prepared():
            return builder
        try:
            with _removing_created_paths_on_failure(root):
                config = tfds.download.DownloadConfig(try_download_gcs=not _is_own_builder(builder))
                builder.download_and_prepare(download_config=config)
        except Exception as error:  # Whatever stops the download or the build.
            advice = "" if obstacle is None else f" {obstacle}"
            raise ArgumentError(
                "dataset", name, f"a dataset that can be prepared under {root}; preparing it failed: {error!r}.{advice}"
            ) from error
    return builder


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """TFDS's builder of `name` as the data_dir holds it now; an unknown name is refused."""
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as error:
        raise ArgumentError(
            "dataset",
            name,
            "a TFDS dataset such as 'digits', 'fashion_mnist_debian', 'mnist', 'cifar10' or "
            "'downsampled_imagenet/32x32', or your own images as 'folder:PATH' or 'npz:PATH'",
        ) from error


def _is_own_builder(builder: tfds.core.DatasetBuilder) -> bool:
    """Whether `builder` is one of this package's builders, which need no network (see `_offline_obstacle`)."""
    return type(builder).__module__.startswith(f"{__package__}.")


def _offline_obstacle(name: str, builder: tfds.core.DatasetBuilder, root: Path) -> str | None:
    """None if `builder` can be prepared without a network; else what to do instead."""
    if isinstance(builder, FashionMnistDebian):
        return builder.missing_source()
    if _is_own_builder(builder):
        return None
    return (
        f"Prepare it where the network is reachable with `tfds build {name} --data_dir={root}` "
        "(the tfds command needs `pip install apache-beam`, tensorflow/datasets#5463) and pass "
        "that directory as data_dir"
    )


@contextlib.contextmanager
def _preparation_lock(root: Path) -> Iterator[None]:
    """Holds this host's exclusive lock on preparing datasets in data directory `root` (two
    processes preparing one dataset at once collide on its final folder). The lock file lives in
    the temp directory, named by a hash of `root`, so nothing is added to the data_dir."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"ddm_jax_prepare_{digest}.lock", "w") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _removing_created_paths_on_failure(root: Path) -> Iterator[None]:
    """If the body raises, removes the files and folders it created in data directory `root`.

    Paths are compared down to _CREATED_PATHS_DEPTH levels under `root`; anything
    deeper lies inside a folder created there. Whatever existed before is kept.
    """
    missing = [path for path in (root, *root.parents) if not path.exists()]
    before = _paths_under(root)
    try:
        yield
    except BaseException:
        if missing:  # Everything is new from the highest folder that did not exist.
            _remove(missing[-1])
        else:
            created = _paths_under(root) - before
            for path in created:
                if path.parent not in created:
                    _remove(path)
        raise


def _paths_under(root: Path) -> set[Path]:
    """`root` and the paths under it, down to _CREATED_PATHS_DEPTH levels; empty if `root` does not exist."""
    paths, level = set(), [root] if root.exists() else []
    for _ in range(_CREATED_PATHS_DEPTH + 1):
        paths.update(level)
        level = [child for path in level if path.is_dir() and not path.is_symlink() for child in path.iterdir()]
    return paths


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _hide_gpus_from_tensorflow() -> None:
    """Keeps TensorFlow, used here only to read data, off the accelerators."""
    with contextlib.suppress(RuntimeError):  # Raised when TensorFlow's devices are already initialised.
        tf.config.set_visible_devices([], "GPU")


def _spec_from_builder(name: str, builder: tfds.core.DatasetBuilder) -> DatasetSpec:
    info = builder.info
    check(
        "image" in info.features,
        "dataset",
        name,
        f"an image dataset, with an 'image' feature; its features are {sorted(info.features.keys())}",
    )
    image_shape = (
        imagenet.image_shape(builder)
        if imagenet.is_downsampled_imagenet(builder)
        else _image_shape(name, info.features["image"])
    )
    return DatasetSpec(
        name=name,
        image_shape=image_shape,
        vocab_size=_vocab_size(name, info),
        num_classes=_num_classes(info.features),
        split_sizes={split: info.splits[split].num_examples for split in info.splits},
    )


def _image_shape(name: str, image_feature: tfds.features.FeatureConnector) -> tuple[int, int, int]:
    """(H, W, C) of a fixed-size image feature; grayscale (H, W) gets C = 1."""
    shape = tuple(image_feature.shape)
    if len(shape) == 2:
        shape += (1,)
    check(
        len(shape) == 3 and None not in shape,
        "dataset",
        name,
        f"images of a fixed (height, width, channels) shape; its images have shape {image_feature.shape}",
    )
    return shape


def _vocab_size(name: str, info: tfds.core.DatasetInfo) -> int:
    """The builder metadata's "vocab_size", else 256 for uint8 images."""
    metadata = info.metadata or {}
    if "vocab_size" in metadata:
        return int(metadata["vocab_size"])
    image_dtype = info.features["image"].np_dtype
    check(
        image_dtype == np.uint8,
        "dataset",
        name,
        f"uint8 images or a 'vocab_size' in its metadata; it has {np.dtype(image_dtype).name} images and no vocab_size",
    )
    return 256


def _num_classes(features: tfds.features.FeaturesDict) -> int | None:
    if "label" not in features:  # FeaturesDict has no `get`.
        return None
    label = features["label"]
    return label.num_classes if isinstance(label, tfds.features.ClassLabel) else None


def load_split(
    spec_or_name: DatasetSpec | str,
    split: str,
    data_dir: str | None = None,
    *,
    image_size: tuple[int, int] | None = None,
    download: bool = False,
    text_features: tuple[str, ...] = (),
) -> Batch:
    """All of `split` in stored order: image [n, H, W, C] and, if labelled, int32 label [n].

    `data_dir`, `image_size` and `download` are those of `dataset_spec` (a spec
    carries its own image_size). `text_features` names text features of a TFDS
    dataset to read too (e.g. "caption" of "shapes/32"), each as an array [n]
    of str. Raises ArgumentError, before reading, if the arrays would not fit in
    the host's available memory.
    """
    name = spec_or_name.name if isinstance(spec_or_name, DatasetSpec) else spec_or_name
    if local.is_local(name):
        return _load_local_split(_as_spec(spec_or_name, data_dir, image_size, download), split)
    local.check_image_size(name, image_size)
    builder = _prepared_builder(name, data_dir, download)
    spec = _spec_from_builder(name, builder)
    keys = ["image"] if spec.num_classes is None else ["image", "label"]
    for feature in text_features:
        check(
            feature in builder.info.features and isinstance(builder.info.features[feature], tfds.features.Text),
            "text_features",
            text_features,
            f"text features of dataset {name!r}; {feature!r} is not one",
        )
    dataset = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders=tfds.decode.PartialDecoding({key: True for key in (*keys, *text_features)}),
    )
    num_examples = int(dataset.cardinality())
    check(
        num_examples >= 0,
        "dataset",
        name,
        f"a prepared dataset whose split sizes TFDS records; it does not know the size of split {split!r}",
    )
    layouts = {
        "image": ((num_examples, *spec.image_shape), builder.info.features["image"].np_dtype),
        "label": ((num_examples,), np.int32),
    }
    num_bytes = sum(math.prod(layouts[key][0]) * np.dtype(layouts[key][1]).itemsize for key in keys)
    _check_fits_in_memory(name, split, num_bytes, psutil.virtual_memory().available)
    arrays = {key: np.empty(*layouts[key]) for key in keys} | {
        key: np.empty(num_examples, object) for key in text_features
    }
    with_fixed_shape = dataset.map(lambda example: {**example, "image": tf.reshape(example["image"], spec.image_shape)})
    start = 0
    for chunk in tfds.as_numpy(with_fixed_shape.batch(_READ_CHUNK_SIZE).prefetch(tf.data.AUTOTUNE)):
        stop = start + len(chunk["image"])
        for key in keys:
            arrays[key][start:stop] = chunk[key]
        for key in text_features:
            arrays[key][start:stop] = [text.decode("utf-8") for text in chunk[key]]
        start = stop
    return arrays


def _load_local_split(spec: DatasetSpec, split: str) -> Batch:
    """`split` of a "folder:" or "npz:" dataset, read as its spec describes it."""
    check_eval_split(spec, split)
    num_examples = spec.split_sizes[split]
    image_bytes = math.prod(spec.image_shape) * local.image_dtype(spec.vocab_size).itemsize
    _check_fits_in_memory(spec.name, split, num_examples * image_bytes, psutil.virtual_memory().available)
    images = local.read_split(spec.name, split, spec.image_size)
    check(
        images.shape == (num_examples, *spec.image_shape),
        "dataset",
        spec.name,
        f"the {split!r} split of its spec, {num_examples} images of shape {spec.image_shape}; it now holds "
        f"{images.shape[0]} of shape {images.shape[1:]} (did the files change?)",
    )
    return {"image": images}


def _check_fits_in_memory(name: str, split: str, num_bytes: int, available_bytes: int) -> None:
    check(
        num_bytes <= available_bytes,
        "dataset",
        name,
        f"splits that fit in host memory: its {split!r} split needs {num_bytes / 2**30:.1f} GiB of host memory, "
        f"and this host has {available_bytes / 2**30:.1f} GiB available (the input pipeline holds a whole split "
        "in memory, one copy per process); run on a host, or with fewer processes per host, with that much free",
    )


def _train_batches(
    arrays: Batch, batch_size: int, seed: int, start_step: int, rows: slice, augment: str | None
) -> Iterator[Batch]:
    """This process's `rows` of each global batch from `start_step` on, augmented if `augment` is set."""
    index_batches = _shuffled_index_batches(len(next(iter(arrays.values()))), batch_size, seed, start_step)
    for step, indices in enumerate(index_batches, start_step):
        batch = {key: array[indices[rows]] for key, array in arrays.items()}
        if augment is not None:
            batch = augment_batch(
                batch, augment, seed=seed, step=step, first_row=rows.start, global_batch_size=batch_size
            )
        yield batch


def _shuffled_index_batches(num_examples: int, batch_size: int, seed: int, start_step: int) -> Iterator[np.ndarray]:
    """Global batches of example indices from step `start_step` on."""
    steps_per_epoch = num_examples // batch_size
    first_epoch, first_step_in_epoch = divmod(start_step, steps_per_epoch)
    for epoch in itertools.count(first_epoch):
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
        first = first_step_in_epoch if epoch == first_epoch else 0
        for step in range(first, steps_per_epoch):
            yield order[step * batch_size : (step + 1) * batch_size]


def _padded_batches(arrays: Batch, batch_size: int, first_row: int, local_batch_size: int) -> Iterator[Batch]:
    """Rows [first_row, first_row + local_batch_size) of each global batch, masked."""
    num_examples = len(arrays["image"])
    for batch_start in range(0, num_examples, batch_size):
        start = min(batch_start + first_row, num_examples)
        stop = min(start + local_batch_size, num_examples)
        batch = {key: _pad_rows(array[start:stop], local_batch_size) for key, array in arrays.items()}
        yield {**batch, "mask": np.arange(local_batch_size) < stop - start}


def _pad_rows(array: np.ndarray, num_rows: int) -> np.ndarray:
    padding = np.zeros((num_rows - len(array), *array.shape[1:]), array.dtype)
    return np.concatenate([array, padding])


def _local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
    """This process's share of the global batch, after checking the arguments."""
    check_int("process_count", process_count, minimum=1)
    check_int("process_index", process_index, minimum=0, maximum=process_count - 1)
    check_int("batch_size", batch_size, minimum=1)
    check(
        batch_size % process_count == 0,
        "batch_size",
        batch_size,
        f"a multiple of process_count={process_count}, so that the global batch splits evenly over the processes",
    )
    return batch_size // process_count
