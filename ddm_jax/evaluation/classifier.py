"""A small CNN classifier of integer images: the feature network of the Frechet distance offline.

Inception features (FID) need weights from the network; on the offline datasets (digits) the
features are instead the penultimate layer of this classifier, trained on the train split:

  python -m experiments.train_digits_classifier --config=configs/digits_classifier.py --workdir=DIR

writes DIR/classifier.npz. The file holds the parameters and the architecture (the fields
`architecture` lists), so `load_classifier` rebuilds the network and refuses a file whose
architecture differs from the one expected, naming the field.
"""

import itertools
import json
import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from ddm_jax.checks import PyTree, as_json
from ddm_jax.data import DatasetSpec, dataset_spec, train_batches
from ddm_jax.diffusion import encode
from ddm_jax.evaluation.frechet import batched_features

CLASSIFIER_FILE = "classifier.npz"
TRAIN_COMMAND = "python -m experiments.train_digits_classifier --config=configs/digits_classifier.py --workdir=DIR"
_PARAMS_PREFIX = "params/"


class Classifier(nn.Module):
    """Integer images k [N, H, W, C] in [0, V) -> (features [N, F], logits [N, classes]).

    x = encode(k, V); per entry of `channels` a 3x3 convolution, ReLU and 2x2 average pooling;
    then features = ReLU(Dense_F(flatten)) and logits = Dense_classes(features).
    """

    vocab_size: int
    num_classes: int
    channels: tuple[int, ...]
    features: int

    @nn.compact
    def __call__(self, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = encode(k, self.vocab_size)
        for channels in self.channels:
            h = nn.avg_pool(nn.relu(nn.Conv(channels, (3, 3))(h)), (2, 2), strides=(2, 2))
        features = nn.relu(nn.Dense(self.features)(h.reshape(h.shape[0], -1)))
        return features, nn.Dense(self.num_classes)(features)


def architecture(config: ml_collections.ConfigDict, spec: DatasetSpec) -> dict:
    """What fixes the parameter shapes: the data's image_shape, vocab_size, num_classes and the
    config's classifier.channels and classifier.features (lists for tuples, as JSON stores them)."""
    return as_json(
        {
            "image_shape": spec.image_shape,
            "vocab_size": spec.vocab_size,
            "num_classes": spec.num_classes,
            "channels": tuple(config.classifier.channels),
            "features": config.classifier.features,
        }
    )


def build_classifier(architecture: Mapping) -> Classifier:
    """The Classifier module that `architecture` describes (image_shape is the input's, not a field)."""
    return Classifier(
        vocab_size=architecture["vocab_size"],
        num_classes=architecture["num_classes"],
        channels=tuple(architecture["channels"]),
        features=architecture["features"],
    )


class TrainedClassifier:
    """A Classifier with its parameters. features(k) [N, F] and logits(k) [N, classes] take
    integer images [N, *image_shape] in [0, vocab_size); the parameters enter the jitted
    function as arguments, never as compile-time constants."""

    def __init__(self, architecture: Mapping, params: PyTree):
        self.architecture = as_json(architecture)
        self.params = params
        self.image_shape = tuple(self.architecture["image_shape"])
        self.model = build_classifier(self.architecture)
        self._apply = jax.jit(self.model.apply)

    def _outputs(self, k) -> tuple[jax.Array, jax.Array]:
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

    def logits(self, k) -> jax.Array:
        return self._outputs(k)[1]


def check_config(config: ml_collections.ConfigDict) -> DatasetSpec:
    """Validates the classifier config against the data; returns the dataset spec. No compilation."""
    for section, field in (
        ("classifier", "features"),
        ("training", "batch_size"),
        ("training", "num_steps"),
        ("eval", "batch_size"),
    ):
        value = config[section][field]
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{section}.{field}={value!r} must be an integer >= 1")
    channels = config.classifier.channels
    if not (len(channels) >= 1 and all(isinstance(c, int) and c >= 1 for c in channels)):
        raise ValueError(f"classifier.channels={channels!r} must be a non-empty tuple of integers >= 1")
    if not config.optimizer.lr > 0:
        raise ValueError(f"optimizer.lr={config.optimizer.lr!r} must be > 0")
    if not config.optimizer.weight_decay >= 0:
        raise ValueError(f"optimizer.weight_decay={config.optimizer.weight_decay!r} must be >= 0")
    spec = dataset_spec(config.data.dataset, config.data.data_dir)
    if spec.num_classes is None:
        raise ValueError(f"data.dataset={spec.name!r} has no class labels; expected a labelled dataset")
    if 2 ** len(channels) > min(spec.image_shape[:2]):
        raise ValueError(
            f"classifier.channels={channels!r} halves the resolution {len(channels)} times; "
            f"expected at most log2 of the smallest side of the {spec.image_shape} images"
        )
    return spec


def cross_entropy(model: Classifier, params: PyTree, images: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the batch of -log softmax(logits)[label]."""
    logits = model.apply({"params": params}, images)[1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(
    model: Classifier,
    optimizer: optax.GradientTransformation,
    params: PyTree,
    opt_state: PyTree,
    images: jax.Array,
    labels: jax.Array,
) -> tuple[PyTree, PyTree, jax.Array]:
    """One optimizer step on the cross-entropy: (params, opt_state, loss before the step)."""
    loss, grads = jax.value_and_grad(cross_entropy, argnums=1)(model, params, images, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_classifier(config: ml_collections.ConfigDict) -> TrainedClassifier:
    """Trains on the train split of config.data.dataset for training.num_steps AdamW steps."""
    spec = check_config(config)
    arch = architecture(config, spec)
    model = build_classifier(arch)
    params = model.init(jax.random.key(config.training.seed), jnp.zeros((1, *spec.image_shape), jnp.int32))["params"]
    optimizer = optax.adamw(config.optimizer.lr, weight_decay=config.optimizer.weight_decay)
    opt_state = optimizer.init(params)
    step = jax.jit(lambda *args: train_step(model, optimizer, *args))
    batches = train_batches(
        spec, batch_size=config.training.batch_size, seed=config.training.seed, data_dir=config.data.data_dir
    )
    for batch in itertools.islice(batches, config.training.num_steps):
        params, opt_state, _ = step(params, opt_state, batch["image"], batch["label"])
    return TrainedClassifier(arch, params)


def accuracy(classifier: TrainedClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    """Fraction of images whose argmax logit is their label."""
    logits = batched_features(classifier.logits, images, batch_size)
    return float(np.mean(logits.argmax(axis=1) == labels))


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


def load_classifier(path: str | os.PathLike, expected: Mapping | None = None) -> TrainedClassifier:
    """The classifier saved at `path`. Raises ValueError naming the first field of `expected` (a
    subset of `architecture`'s fields, e.g. image_shape and vocab_size of the data to score)
    whose stored value differs."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no trained classifier at {path}; train one with `{TRAIN_COMMAND}`, which writes DIR/{CLASSIFIER_FILE}"
        )
    with np.load(path) as stored:
        stored_architecture = json.loads(str(stored["architecture"]))
        params = traverse_util.unflatten_dict(
            {name[len(_PARAMS_PREFIX) :]: stored[name] for name in stored.files if name.startswith(_PARAMS_PREFIX)},
            sep="/",
        )
    for field, value in as_json(expected or {}).items():
        if stored_architecture.get(field) != value:
            raise ValueError(
                f"classifier {path} has {field}={stored_architecture.get(field)!r}, expected "
                f"{field}={value!r}; train a matching one with `{TRAIN_COMMAND}`"
            )
    return TrainedClassifier(stored_architecture, jax.tree.map(jnp.asarray, params))
