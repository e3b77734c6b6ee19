"""Input pipeline for TFDS image datasets (digits, mnist, cifar10, downsampled_imagenet/32x32, ...).

Every dataset takes the same path: a split is read once through TFDS into host
memory as integer arrays, and batches are gathered from them with numpy
indexing. Memory is the limit of this design: each process holds its own copy
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

Downsampled ImageNet cannot be downloaded automatically; it is prepared by hand
once (`ddm_jax.data.imagenet`). Its held-out split is "validation": pass it as
`eval_batches(split=...)` (config field data.eval_split).
"""

import dataclasses
import itertools
import math
import numbers
from collections.abc import Iterator, Mapping

import numpy as np
import psutil
import tensorflow as tf
import tensorflow_datasets as tfds

from ddm_jax.data import imagenet
from ddm_jax.data.augment import augment_batch, check_augment

Batch = dict[str, np.ndarray]

_READ_CHUNK_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset, read from its TFDS info.

    split_sizes maps each split to its number of examples; it is empty when
    TFDS does not know them (e.g. under `tfds.testing.mock_data`).
    """

    name: str
    image_shape: tuple[int, int, int]
    vocab_size: int
    num_classes: int | None
    split_sizes: Mapping[str, int] = dataclasses.field(hash=False)


def dataset_spec(name: str, data_dir: str | None = None) -> DatasetSpec:
    """The spec of TFDS dataset `name`, preparing it first if it is not yet."""
    return _spec_from_builder(name, _prepared_builder(name, data_dir))


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
) -> Iterator[Batch]:
    """Endless training batches of this process: {"image", "label", "cond"}.

    image: [b, H, W, C] integers in [0, vocab_size) (uint8 for 8-bit images);
    label: int32 [b], present when the dataset has class labels;
    cond: float32 [b, AUGMENT_COND_DIM[augment]], present when `augment` is set;
    b = batch_size // process_count. `batch_size` is the global batch size and
    `start_step` the number of global batches already consumed. `augment` is
    None or "dihedral" (square images only). The order is described in this
    module's docstring.
    """
    local_batch_size = _local_batch_size(batch_size, process_index, process_count)
    _check_non_negative_int("seed", seed)
    _check_non_negative_int("start_step", start_step)
    spec = _as_spec(spec_or_name, data_dir)
    check_augment(augment, spec.image_shape)
    arrays = load_split(spec, "train", data_dir)
    num_examples = len(arrays["image"])
    if batch_size > num_examples:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {num_examples} training "
            "examples; expected at most the number of training examples."
        )
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
) -> Iterator[Batch]:
    """One pass over `split` in its stored order: {"image", "label", "mask"}.

    Global batch i holds examples [i * batch_size, (i + 1) * batch_size), split
    over processes as in training. Every process yields the same number of
    batches of b = batch_size // process_count rows; rows past the end of the
    split are zeros with mask False, so each example is counted exactly once.
    Images are never augmented.
    """
    local_batch_size = _local_batch_size(batch_size, process_index, process_count)
    spec = _as_spec(spec_or_name, data_dir)
    check_eval_split(spec, split)
    arrays = load_split(spec, split, data_dir)
    return _padded_batches(arrays, batch_size, process_index * local_batch_size, local_batch_size)


def check_eval_split(spec: DatasetSpec, split: str) -> None:
    """Raises ValueError if the dataset's splits are known and `split` is not one of them."""
    if spec.split_sizes and split not in spec.split_sizes:
        raise ValueError(
            f"data.eval_split={split!r} is not a split of data.dataset={spec.name!r}; "
            f"expected one of {sorted(spec.split_sizes)}."
        )


def _as_spec(spec_or_name: DatasetSpec | str, data_dir: str | None) -> DatasetSpec:
    if isinstance(spec_or_name, DatasetSpec):
        return spec_or_name
    return dataset_spec(spec_or_name, data_dir)


def _prepared_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `name`, downloaded and prepared if it is not yet and can be."""
    _hide_gpus_from_tensorflow()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as error:
        raise ValueError(
            f"data.dataset={name!r} is not a registered TFDS dataset; expected a name such as "
            "'digits', 'mnist', 'cifar10' or 'downsampled_imagenet/32x32'."
        ) from error
    if not builder.is_prepared():
        if imagenet.is_downsampled_imagenet(builder):
            raise ValueError(imagenet.not_prepared_message(name, builder))
        try:
            builder.download_and_prepare()
        except Exception as error:  # Whatever stops the download or the build.
            raise ValueError(
                f"data.dataset={name!r} is not prepared under {builder.data_dir} "
                f"and preparing it failed: {error!r}. Prepare it where the network "
                f"is reachable with `tfds build {name} --data_dir=DIR` (the tfds command "
                "needs `pip install apache-beam`, tensorflow/datasets#5463) and set "
                "data.data_dir to that DIR."
            ) from error
    return builder


def _hide_gpus_from_tensorflow() -> None:
    """Keeps TensorFlow, used here only to read data, off the accelerators."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow's devices are already initialised.
        pass


def _spec_from_builder(name: str, builder: tfds.core.DatasetBuilder) -> DatasetSpec:
    info = builder.info
    if "image" not in info.features:
        raise ValueError(
            f"data.dataset={name!r} has no 'image' feature (it has "
            f"{sorted(info.features.keys())}); expected an image dataset."
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
    if len(shape) != 3 or None in shape:
        raise ValueError(
            f"data.dataset={name!r} has images of shape {image_feature.shape}; "
            "expected a fixed (height, width, channels) shape."
        )
    return shape


def _vocab_size(name: str, info: tfds.core.DatasetInfo) -> int:
    """The builder metadata's "vocab_size", else 256 for uint8 images."""
    metadata = info.metadata or {}
    if "vocab_size" in metadata:
        return int(metadata["vocab_size"])
    image_dtype = info.features["image"].np_dtype
    if image_dtype != np.uint8:
        raise ValueError(
            f"data.dataset={name!r} has {np.dtype(image_dtype).name} images and no "
            "'vocab_size' in its metadata; expected uint8 images or a vocab_size."
        )
    return 256


def _num_classes(features: tfds.features.FeaturesDict) -> int | None:
    label = features["label"] if "label" in features else None
    return label.num_classes if isinstance(label, tfds.features.ClassLabel) else None


def load_split(spec_or_name: DatasetSpec | str, split: str, data_dir: str | None) -> Batch:
    """All of `split` in stored order: image [n, H, W, C] and, if labelled, int32 label [n].

    Raises ValueError, before reading, if the arrays would not fit in the
    host's available memory.
    """
    name = spec_or_name.name if isinstance(spec_or_name, DatasetSpec) else spec_or_name
    builder = _prepared_builder(name, data_dir)
    spec = _spec_from_builder(name, builder)
    keys = ["image"] if spec.num_classes is None else ["image", "label"]
    dataset = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders=tfds.decode.PartialDecoding({key: True for key in keys}),
    )
    num_examples = int(dataset.cardinality())
    if num_examples < 0:
        raise ValueError(
            f"data.dataset={name!r}: TFDS does not know the size of split {split!r}; "
            "expected a prepared dataset whose split sizes are recorded."
        )
    layouts = {
        "image": ((num_examples, *spec.image_shape), builder.info.features["image"].np_dtype),
        "label": ((num_examples,), np.int32),
    }
    num_bytes = sum(math.prod(layouts[key][0]) * np.dtype(layouts[key][1]).itemsize for key in keys)
    _check_fits_in_memory(name, split, num_bytes, psutil.virtual_memory().available)
    arrays = {key: np.empty(*layouts[key]) for key in keys}
    with_fixed_shape = dataset.map(
        lambda example: {**example, "image": tf.reshape(example["image"], spec.image_shape)}
    )
    start = 0
    for chunk in tfds.as_numpy(with_fixed_shape.batch(_READ_CHUNK_SIZE).prefetch(tf.data.AUTOTUNE)):
        stop = start + len(chunk["image"])
        for key in keys:
            arrays[key][start:stop] = chunk[key]
        start = stop
    return arrays


def _check_fits_in_memory(name: str, split: str, num_bytes: int, available_bytes: int) -> None:
    if num_bytes > available_bytes:
        raise ValueError(
            f"data.dataset={name!r}: its {split!r} split needs {num_bytes / 2**30:.1f} GiB of host "
            f"memory, and this host has {available_bytes / 2**30:.1f} GiB available. The input "
            "pipeline holds a whole split in memory, one copy per process; expected a host (or "
            "fewer processes per host) with that much memory free."
        )


def _train_batches(
    arrays: Batch, batch_size: int, seed: int, start_step: int, rows: slice, augment: str | None
) -> Iterator[Batch]:
    """This process's `rows` of each global batch from `start_step` on, augmented if `augment` is set."""
    index_batches = _shuffled_index_batches(len(arrays["image"]), batch_size, seed, start_step)
    for step, indices in enumerate(index_batches, start_step):
        batch = {key: array[indices[rows]] for key, array in arrays.items()}
        if augment is not None:
            batch = augment_batch(
                batch, augment, seed=seed, step=step, first_row=rows.start, global_batch_size=batch_size
            )
        yield batch


def _shuffled_index_batches(
    num_examples: int, batch_size: int, seed: int, start_step: int
) -> Iterator[np.ndarray]:
    """Global batches of example indices from step `start_step` on."""
    steps_per_epoch = num_examples // batch_size
    first_epoch, first_step_in_epoch = divmod(start_step, steps_per_epoch)
    for epoch in itertools.count(first_epoch):
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
        first = first_step_in_epoch if epoch == first_epoch else 0
        for step in range(first, steps_per_epoch):
            yield order[step * batch_size : (step + 1) * batch_size]


def _padded_batches(
    arrays: Batch, batch_size: int, first_row: int, local_batch_size: int
) -> Iterator[Batch]:
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
    if not isinstance(process_count, numbers.Integral) or process_count < 1:
        raise ValueError(f"process_count={process_count!r}; expected a positive integer.")
    if not isinstance(process_index, numbers.Integral) or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index!r}; expected an integer in [0, {process_count})."
        )
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected a positive integer.")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by process_count={process_count}; "
            "expected a global batch size that splits evenly over the processes."
        )
    return batch_size // process_count


def _check_non_negative_int(field: str, value: int) -> None:
    if not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{field}={value!r}; expected a non-negative integer.")
