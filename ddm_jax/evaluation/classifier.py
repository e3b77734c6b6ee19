"""A small CNN classifier of integer images with one or more heads: the feature network of the
Frechet distance offline, and the reader of generated images' attributes.

Inception features (FID) need weights from the network; on the offline datasets the features
are instead the penultimate layer of this classifier, trained on the train split:

  python -m experiments.train_digits_classifier --config=configs/digits_classifier.py --workdir=DIR
  python -m experiments.train_shapes_classifier --config=configs/shapes_classifier.py --workdir=DIR

Heads. A shared trunk feeds one Dense layer per head; `heads` maps each head's name to its
number of classes, and each head is of one of two kinds:
  categorical (the default): one class per image; labels int [N], -1 where an image has none
    (it is left out of that head's loss and accuracy); trained with the softmax cross-entropy;
    the prediction is the argmax logit.
  multi-label (the heads named in `multi_label`): each class present or absent on its own;
    labels multi-hot [N, classes]; trained with the sigmoid cross-entropy summed over classes;
    the prediction is the set of classes with a positive logit, right when it equals the label's.
The loss is the sum of the heads' losses. The digits classifier is the one-head case,
{"label": 10}, trained on the input pipeline's labels. Config fields a config leaves out
(classifier.pooling, classifier.global_max, optimizer.schedule, optimizer.warmup_steps) take the
digits classifier's values: average pooling, no global maxima, a constant learning rate.

The file DIR/classifier.npz holds the parameters and the architecture (the fields `architecture`
lists), so `load_classifier` rebuilds the network and refuses a file whose architecture differs
from the one expected, naming the field. A file written before heads existed (its architecture
has `num_classes` instead of `heads`) reads as the one head "label".
"""

import itertools
import json
import os
from collections.abc import Collection, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from ddm_jax.checks import PyTree, as_json, check, check_choice, is_int
from ddm_jax.data import DatasetSpec, dataset_spec, train_batches
from ddm_jax.diffusion import encode
from ddm_jax.evaluation.frechet import batched_features

CLASSIFIER_FILE = "classifier.npz"
TRAIN_COMMAND = "python -m experiments.train_digits_classifier --config=configs/digits_classifier.py --workdir=DIR"
POOLINGS = ("avg", "max")  # Of each stage of the Classifier.
SCHEDULES = ("constant", "cosine")  # Of the learning rate (`learning_rate`).
LABEL_HEAD = "label"  # The one head of a classifier of the dataset's class labels (digits).
_PARAMS_PREFIX = "params/"


class Classifier(nn.Module):
    """Integer images k [N, H, W, C] in [0, V) -> (features [N, F], {head: logits [N, classes]}).

    x = encode(k, V); per entry of `channels` a stage: 3x3 convolution, ReLU and 2x2 pooling (the
    average, or the maximum); r = the flattened last stage, and with `global_max` also each
    stage's maximum over positions (translation-invariant evidence of what is present
    anywhere); features = ReLU(Dense_F(r)) and, per head in the order of `heads`,
    logits = Dense_classes(features) (parameters Dense_1, Dense_2, ...).
    """

    vocab_size: int
    heads: tuple[tuple[str, int], ...]  # (name, number of classes) per head
    channels: tuple[int, ...]
    features: int
    pooling: str = "avg"  # One of POOLINGS.
    global_max: bool = False

    @nn.compact
    def __call__(self, k: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        h = encode(k, self.vocab_size)
        pool = nn.max_pool if self.pooling == "max" else nn.avg_pool
        maxima = []
        for channels in self.channels:
            h = pool(nn.relu(nn.Conv(channels, (3, 3))(h)), (2, 2), strides=(2, 2))
            maxima.append(h.max(axis=(1, 2)))
        readout = jnp.concatenate([h.reshape(h.shape[0], -1), *(maxima if self.global_max else ())], axis=1)
        features = nn.relu(nn.Dense(self.features)(readout))
        return features, {name: nn.Dense(classes)(features) for name, classes in self.heads}


def architecture(
    config: ml_collections.ConfigDict,
    spec: DatasetSpec,
    heads: Mapping[str, int] | None = None,
    multi_label: Collection[str] = (),
    image_shape: tuple[int, int, int] | None = None,
) -> dict:
    """What fixes the parameter shapes and the reading of the logits: the input's image_shape (None:
    the data's) and the data's vocab_size, the heads (None: {"label": the dataset's num_classes}) and
    which are multi-label, and the config's classifier.channels and classifier.features (as JSON
    stores them)."""
    return as_json(
        {
            "image_shape": spec.image_shape if image_shape is None else image_shape,
            "vocab_size": spec.vocab_size,
            "heads": {LABEL_HEAD: spec.num_classes} if heads is None else dict(heads),
            "multi_label": sorted(multi_label),
            "channels": tuple(config.classifier.channels),
            "features": config.classifier.features,
            "pooling": config.classifier.get("pooling", "avg"),
            "global_max": config.classifier.get("global_max", False),
        }
    )


def build_classifier(architecture: Mapping) -> Classifier:
    """The Classifier module that `architecture` describes (image_shape is the input's, not a field)."""
    return Classifier(
        vocab_size=architecture["vocab_size"],
        heads=tuple(sorted(architecture["heads"].items())),
        channels=tuple(architecture["channels"]),
        features=architecture["features"],
        pooling=architecture["pooling"],
        global_max=architecture["global_max"],
    )


class TrainedClassifier:
    """A Classifier with its parameters. features(k) [N, F], head_logits(k) {head: [N, classes]}
    and logits(k, head) [N, classes] take integer images [N, *image_shape] in [0, vocab_size);
    the parameters enter the jitted function as arguments, never as compile-time constants."""

    def __init__(self, architecture: Mapping, params: PyTree):
        self.architecture = as_json(architecture)
        self.params = params
        self.image_shape = tuple(self.architecture["image_shape"])
        self.heads = dict(self.architecture["heads"])
        self.multi_label = tuple(self.architecture["multi_label"])
        self.model = build_classifier(self.architecture)
        self._apply = jax.jit(self.model.apply)

    def _outputs(self, k) -> tuple[jax.Array, dict[str, jax.Array]]:
        k = np.asarray(k)
        vocab_size = self.architecture["vocab_size"]
        if not np.issubdtype(k.dtype, np.integer) or k.shape[1:] != self.image_shape:
            raise ValueError(
                f"images of dtype {k.dtype} and shape {k.shape}: expected integers of shape "
                f"[N, {', '.join(map(str, self.image_shape))}] (the classifier's image_shape)"
            )
        if k.size and not (k.min() >= 0 and k.max() < vocab_size):
            raise ValueError(f"image values span [{k.min()}, {k.max()}]: expected values in [0, {vocab_size})")
        return self._apply({"params": self.params}, k)

    def features(self, k) -> jax.Array:
        return self._outputs(k)[0]

    def head_logits(self, k) -> dict[str, jax.Array]:
        return self._outputs(k)[1]

    def logits(self, k, head: str | None = None) -> jax.Array:
        """The logits of `head`, which may be left out when the classifier has only one."""
        return self.head_logits(k)[self.head_name(head)]

    def head_name(self, head: str | None) -> str:
        """`head`, or the only head when None; raises ArgumentError if there is no such head."""
        if head is None:
            check(len(self.heads) == 1, "head", head, f"one of the classifier's heads {tuple(self.heads)}")
            return next(iter(self.heads))
        check_choice("head", head, self.heads)
        return head


def check_heads(heads: Mapping[str, int], multi_label: Collection[str]) -> None:
    """Raises ArgumentError unless heads maps names to class counts >= 1 and multi_label names some of them."""
    check(
        isinstance(heads, Mapping)
        and len(heads) >= 1
        and all(isinstance(name, str) and is_int(classes) and classes >= 1 for name, classes in heads.items()),
        "heads",
        heads,
        "a non-empty mapping of head names to numbers of classes >= 1",
    )
    check(
        not isinstance(multi_label, str) and set(multi_label) <= set(heads),
        "multi_label",
        multi_label,
        f"a collection of the heads' names {tuple(heads)}",
    )


def check_config(config: ml_collections.ConfigDict, heads: Mapping[str, int] | None = None) -> DatasetSpec:
    """Validates the classifier config against the data; returns the dataset spec. No compilation.

    With heads None the dataset must have class labels (the one head "label").
    """
    for section, field in (
        ("classifier", "features"),
        ("training", "batch_size"),
        ("training", "num_steps"),
        ("eval", "batch_size"),
    ):
        value = config[section][field]
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{section}.{field}={value!r} must be an integer >= 1")
    if config.classifier.get("pooling", "avg") not in POOLINGS:
        raise ValueError(f"classifier.pooling={config.classifier.pooling!r} must be one of {POOLINGS}")
    if not isinstance(config.classifier.get("global_max", False), bool):
        raise ValueError(f"classifier.global_max={config.classifier.global_max!r} must be True or False")
    channels = config.classifier.channels
    if not (len(channels) >= 1 and all(isinstance(c, int) and c >= 1 for c in channels)):
        raise ValueError(f"classifier.channels={channels!r} must be a non-empty tuple of integers >= 1")
    if not config.optimizer.lr > 0:
        raise ValueError(f"optimizer.lr={config.optimizer.lr!r} must be > 0")
    if not config.optimizer.weight_decay >= 0:
        raise ValueError(f"optimizer.weight_decay={config.optimizer.weight_decay!r} must be >= 0")
    schedule = config.optimizer.get("schedule", "constant")
    if schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={schedule!r} must be one of {SCHEDULES}")
    warmup_steps = config.optimizer.get("warmup_steps", 0)
    if not (isinstance(warmup_steps, int) and 0 <= warmup_steps < config.training.num_steps):
        raise ValueError(f"optimizer.warmup_steps={warmup_steps!r} must be an integer in [0, training.num_steps)")
    spec = dataset_spec(config.data.dataset, config.data.data_dir)
    if heads is None and spec.num_classes is None:
        raise ValueError(f"data.dataset={spec.name!r} has no class labels; expected a labelled dataset")
    if 2 ** len(channels) > min(spec.image_shape[:2]):
        raise ValueError(
            f"classifier.channels={channels!r} halves the resolution {len(channels)} times; "
            f"expected at most log2 of the smallest side of the {spec.image_shape} images"
        )
    return spec


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule | float:
    """optimizer.lr, constant (schedule "constant", the default), or (schedule "cosine") rising
    linearly from 0 over optimizer.warmup_steps, then decaying to lr / 100 at training.num_steps
    along a half cosine (Loshchilov & Hutter 2017, "SGDR")."""
    lr = config.optimizer.lr
    if config.optimizer.get("schedule", "constant") == "constant":
        return lr
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, config.optimizer.get("warmup_steps", 0), config.training.num_steps, end_value=lr / 100
    )


def head_loss(logits: jax.Array, labels: jax.Array, multi_label: bool) -> jax.Array:
    """One head's loss, a mean over its labelled images (see the module docstring).

    Categorical: -log softmax(logits)[label] over the images whose label is >= 0 (0 if none is).
    Multi-label: sum over classes of -y log sigmoid(l) - (1 - y) log sigmoid(-l), over all images.
    """
    if multi_label:
        return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)).sum(axis=-1).mean()
    labelled = labels >= 0
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(labelled, labels, 0))
    return jnp.sum(jnp.where(labelled, losses, 0.0)) / jnp.maximum(jnp.sum(labelled), 1)


def classifier_loss(
    model: Classifier, params: PyTree, images: jax.Array, labels: Mapping[str, jax.Array], multi_label: Collection[str]
) -> jax.Array:
    """Sum over the heads of `head_loss`; labels maps every head to its labels."""
    logits = model.apply({"params": params}, images)[1]
    return sum(head_loss(logits[name], labels[name], name in multi_label) for name in logits)


def train_step(
    model: Classifier,
    optimizer: optax.GradientTransformation,
    multi_label: Collection[str],
    params: PyTree,
    opt_state: PyTree,
    images: jax.Array,
    labels: Mapping[str, jax.Array],
) -> tuple[PyTree, PyTree, jax.Array]:
    """One optimizer step on `classifier_loss`: (params, opt_state, loss before the step)."""
    loss, grads = jax.value_and_grad(classifier_loss, argnums=1)(model, params, images, labels, multi_label)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_classifier(
    config: ml_collections.ConfigDict,
    heads: Mapping[str, int] | None = None,
    multi_label: Collection[str] = (),
    batches: Iterator[Mapping[str, np.ndarray]] | None = None,
    image_shape: tuple[int, int, int] | None = None,
) -> TrainedClassifier:
    """Trains on the train split of config.data.dataset for training.num_steps AdamW steps.

    Args:
      config: a classifier config (configs/digits_classifier.py, configs/shapes_classifier.py).
      heads: head name -> number of classes; None: the dataset's class labels, one head "label"
        trained on the input pipeline's batches (seeded by training.seed).
      multi_label: the heads whose labels are multi-hot (module docstring).
      batches: with `heads`, endless training batches {"image", and each head's labels}.
      image_shape: the shape of the batches' images where it is not the dataset's (the same
        height and width, other channels: e.g. features computed from the image).

    Returns:
      The trained classifier.
    """
    spec = check_config(config, heads)
    if heads is None:
        batches = train_batches(
            spec, batch_size=config.training.batch_size, seed=config.training.seed, data_dir=config.data.data_dir
        )
    else:
        check_heads(heads, multi_label)
        check(batches is not None, "batches", batches, "training batches holding each head's labels")
    check(
        image_shape is None or (len(image_shape) == 3 and tuple(image_shape[:2]) == spec.image_shape[:2]),
        "image_shape",
        image_shape,
        f"None, or (height, width, channels) with the data's height and width {spec.image_shape[:2]}",
    )
    arch = architecture(config, spec, heads, multi_label, image_shape)
    model = build_classifier(arch)
    params = model.init(jax.random.key(config.training.seed), jnp.zeros((1, *arch["image_shape"]), jnp.int32))["params"]
    optimizer = optax.adamw(learning_rate(config), weight_decay=config.optimizer.weight_decay)
    opt_state = optimizer.init(params)
    multi_label = tuple(arch["multi_label"])
    step = jax.jit(lambda *args: train_step(model, optimizer, multi_label, *args))
    for batch in itertools.islice(batches, config.training.num_steps):
        labels = {name: batch[name] for name in arch["heads"]}
        params, opt_state, _ = step(params, opt_state, batch["image"], labels)
    return TrainedClassifier(arch, params)


def batched_head_logits(classifier: TrainedClassifier, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """classifier.head_logits over images [N, ...] in batches of at most batch_size: {head: [N, classes]}."""
    chunks = [classifier.head_logits(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    return {name: np.concatenate([np.asarray(chunk[name]) for chunk in chunks]) for name in classifier.heads}


def prediction(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """A head's prediction from its logits [N, classes]: argmax [N], or multi-label logits > 0 [N, classes]."""
    return logits > 0 if multi_label else np.argmax(logits, axis=1)


def predict(classifier: TrainedClassifier, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Every head's `prediction` for images [N, ...], computed in batches of at most batch_size."""
    logits = batched_head_logits(classifier, images, batch_size)
    return {name: prediction(values, name in classifier.multi_label) for name, values in logits.items()}


def agreement(predicted: np.ndarray, labels: np.ndarray, multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """(correct, labelled), bool [N] each: whether a head's prediction equals the label, and whether
    the image has one (categorical labels >= 0; every image for multi-label heads, whose whole set
    of classes must be right)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if multi_label:
        return np.all(predicted.astype(bool) == labels.astype(bool), axis=1), np.ones(len(labels), bool)
    return predicted == labels, labels >= 0


def accuracy(
    classifier: TrainedClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int, head: str | None = None
) -> float:
    """Fraction of the labelled images whose prediction of `head` (the only one when None) is their label."""
    head = classifier.head_name(head)
    logits = batched_features(lambda k: classifier.logits(k, head), images, batch_size)
    correct, labelled = agreement(
        prediction(logits, head in classifier.multi_label), labels, head in classifier.multi_label
    )
    return float(np.mean(correct[labelled]))


def save_classifier(path: str | os.PathLike, classifier: TrainedClassifier) -> None:
    """Writes the architecture and parameters to the .npz `path` atomically; never overwrites."""
    path = os.fspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; give another path or move it away yourself (nothing was changed)")
    arrays = {
        _PARAMS_PREFIX + name: np.asarray(value)
        for name, value in traverse_util.flatten_dict(classifier.params, sep="/").items()
    }
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as file:
        np.savez(file, architecture=np.array(json.dumps(classifier.architecture)), **arrays)
    os.replace(temporary, path)


def _current_layout(stored: dict) -> dict:
    """A stored architecture in the current layout. One written before heads existed has
    num_classes, its one head "label" (whose parameters, Dense_1, are where they were), and
    average pooling without global maxima."""
    if "heads" in stored:
        return stored
    fields = {name: value for name, value in stored.items() if name != "num_classes"}
    return as_json(
        {
            **fields,
            "heads": {LABEL_HEAD: stored["num_classes"]},
            "multi_label": [],
            "pooling": "avg",
            "global_max": False,
        }
    )


def load_classifier(
    path: str | os.PathLike, expected: Mapping | None = None, train_command: str = TRAIN_COMMAND
) -> TrainedClassifier:
    """The classifier saved at `path`. Raises ValueError naming the first field of `expected` (a
    subset of `architecture`'s fields, e.g. image_shape and vocab_size of the data to score)
    whose stored value differs; the errors name `train_command`, which writes such a file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no trained classifier at {path}; train one with `{train_command}`, which writes DIR/{CLASSIFIER_FILE}"
        )
    with np.load(path) as stored:
        stored_architecture = _current_layout(json.loads(str(stored["architecture"])))
        params = traverse_util.unflatten_dict(
            {name[len(_PARAMS_PREFIX) :]: stored[name] for name in stored.files if name.startswith(_PARAMS_PREFIX)},
            sep="/",
        )
    for field, value in as_json(expected or {}).items():
        if stored_architecture.get(field) != value:
            raise ValueError(
                f"classifier {path} has {field}={stored_architecture.get(field)!r}, expected "
                f"{field}={value!r}; train a matching one with `{train_command}`"
            )
    return TrainedClassifier(stored_architecture, jax.tree.map(jnp.asarray, params))
