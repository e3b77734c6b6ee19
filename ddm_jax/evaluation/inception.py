"""The FID Inception-v3 (TF graph of 2015-12-05, as in TTUR and pytorch-fid) in Flax linen, NHWC.

The layers and their names follow torchvision's Inception3 with pytorch-fid's FID blocks
(FIDInceptionA/C/E_1/E_2), so a torch state dict maps onto the Flax tree name by name
(`torch_state_dict_to_flax`). The FID graph differs from torchvision's in:
  - the pool branch of Mixed_5b-d, Mixed_6b-e and Mixed_7b averages over the unpadded
    3x3 window (torch count_include_pad=False);
  - the pool branch of Mixed_7c takes a 3x3 max instead of an average;
  - a 1008-way fc (the TF graph's output size) instead of 1000.
Every conv has no bias and is followed by BatchNorm (eps 1e-3, running statistics) and ReLU.

Input convention of `inception_feature_fn`: RGB images [N, H, W, 3] with values in [0, 255]
(uint8 or float, e.g. `evaluation.images.to_uint8` output), as pytorch-fid computes it:
x / 255, bilinear resize to 299 x 299 (half-pixel centres, no antialiasing: torch's
F.interpolate(mode="bilinear", align_corners=False)), then 2 x - 1.

Weights are not downloaded: the user converts pytorch-fid's file once (see
`WEIGHTS_HELP`). The real weights were never available while this was written: the suite
tests names, shapes and layouts; a one-off comparison with pytorch-fid 0.3.0's torch
model on random weights, converted by experiments/convert_inception_weights.py, agreed
to 6e-7 relative in pool3 features (inputs of 32 to 500 pixels) and in logits. Agreement with published
FID values is unchecked.
"""

import functools
import os
import types
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

INPUT_SIZE = 299
NUM_LOGITS = 1008
TORCH_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_HELP = (
    "The FID Inception-v3 weights are not downloaded at run time. Download pytorch-fid's "
    f"weights {TORCH_WEIGHTS_URL} and convert them once (needs torch, which is not a "
    "dependency of ddm_jax):\n"
    "  python -m experiments.convert_inception_weights "
    "--torch_weights=pt_inception-2015-12-05-6726825d.pth --npz={path}\n"
    "(run from the ddm_jax repository root)."
)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU.

    padding "SAME" is only used with stride 1 and odd kernels, where it is torch's
    symmetric padding of kernel // 2.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features, self.kernel_size, strides=self.strides, padding=self.padding, use_bias=False, name="conv"
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    """3x3 max pool: unpadded for stride 2 (reductions); padded by 1 (with -inf) for stride 1."""
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding="VALID" if stride == 2 else "SAME")


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average over the window's in-image pixels only (count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b-d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1 (pool_features), concatenated."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        branch5x5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        branch5x5 = BasicConv2d(64, (5, 5), name="branch5x5_2")(branch5x5)
        branch3x3dbl = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, (3, 3), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, (3, 3), name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a, a stride-2 reduction: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2, concatenated."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv2d(384, (3, 3), strides=2, padding="VALID", name="branch3x3")(x)
        branch3x3dbl = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, (3, 3), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, (3, 3), strides=2, padding="VALID", name="branch3x3dbl_3")(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, max_pool_3x3(x, stride=2)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avg pool-1x1, 192 channels each.

    channels_7x7 is the width inside the factorised 7x7 branches.
    """

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        branch1x1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        branch7x7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        branch7x7 = BasicConv2d(c7, (1, 7), name="branch7x7_2")(branch7x7)
        branch7x7 = BasicConv2d(192, (7, 1), name="branch7x7_3")(branch7x7)
        branch7x7dbl = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        branch7x7dbl = BasicConv2d(c7, (7, 1), name="branch7x7dbl_2")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(c7, (1, 7), name="branch7x7dbl_3")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(c7, (7, 1), name="branch7x7dbl_4")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(192, (1, 7), name="branch7x7dbl_5")(branch7x7dbl)
        branch_pool = BasicConv2d(192, (1, 1), name="branch_pool")(avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a, a stride-2 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2, concatenated."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        branch3x3 = BasicConv2d(320, (3, 3), strides=2, padding="VALID", name="branch3x3_2")(branch3x3)
        branch7x7x3 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        branch7x7x3 = BasicConv2d(192, (1, 7), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, (7, 1), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, (3, 3), strides=2, padding="VALID", name="branch7x7x3_4")(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, max_pool_3x3(x, stride=2)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b-c: 1x1 | 1x1-(1x3 & 3x1) | 1x1-3x3-(1x3 & 3x1) | pool-1x1, concatenated.

    pool is "avg" (Mixed_7b, unpadded average) or "max" (Mixed_7c, FID graph only).
    """

    pool: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        branch3x3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        branch3x3 = [
            BasicConv2d(384, (1, 3), name="branch3x3_2a")(branch3x3),
            BasicConv2d(384, (3, 1), name="branch3x3_2b")(branch3x3),
        ]
        branch3x3dbl = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(384, (3, 3), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = [
            BasicConv2d(384, (1, 3), name="branch3x3dbl_3a")(branch3x3dbl),
            BasicConv2d(384, (3, 1), name="branch3x3dbl_3b")(branch3x3dbl),
        ]
        pooled = {"avg": avg_pool_3x3, "max": functools.partial(max_pool_3x3, stride=1)}[self.pool](x)
        branch_pool = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, *branch3x3, *branch3x3dbl, branch_pool], axis=-1)


class FIDInceptionV3(nn.Module):
    """Images [N, H, W, 3] in [-1, 1] (H, W >= 75; 299 for FID) -> (pool3 features [N, 2048],
    logits [N, 1008]). Inference only: BatchNorm uses the running statistics."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = BasicConv2d(32, (3, 3), strides=2, padding="VALID", name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), padding="VALID", name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), name="Conv2d_2b_3x3")(x)
        x = max_pool_3x3(x, stride=2)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), padding="VALID", name="Conv2d_4a_3x3")(x)
        x = max_pool_3x3(x, stride=2)
        x = InceptionA(pool_features=32, name="Mixed_5b")(x)
        x = InceptionA(pool_features=64, name="Mixed_5c")(x)
        x = InceptionA(pool_features=64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(channels_7x7=128, name="Mixed_6b")(x)
        x = InceptionC(channels_7x7=160, name="Mixed_6c")(x)
        x = InceptionC(channels_7x7=160, name="Mixed_6d")(x)
        x = InceptionC(channels_7x7=192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(pool="avg", name="Mixed_7b")(x)
        x = InceptionE(pool="max", name="Mixed_7c")(x)
        features = jnp.mean(x, axis=(1, 2))
        return features, nn.Dense(NUM_LOGITS, name="fc")(features)


def preprocess(images: jax.Array) -> jax.Array:
    """RGB [N, H, W, 3] in [0, 255] -> [N, 299, 299, 3] in [-1, 1], as pytorch-fid: x / 255,
    bilinear resize (half-pixel centres, no antialiasing), 2 x - 1."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
    return 2.0 * x - 1.0


def check_images(images) -> np.ndarray:
    """images as a host array, or ValueError unless they are [N, H, W, 3] RGB in [0, 255]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"Inception features: images of shape {images.shape}; expected [N, H, W, 3] RGB with N >= 1")
    low, high = images.min(), images.max()
    if low < 0 or high > 255:
        raise ValueError(
            f"Inception features: image values span [{low}, {high}]; expected [0, 255] "
            "(uint8 scale, e.g. evaluation.images.to_uint8)"
        )
    return images


def _pool3_features(variables, images: jax.Array) -> jax.Array:
    return FIDInceptionV3().apply(variables, preprocess(images))[0]


def inception_feature_fn(variables):
    """feature_fn(images [N, H, W, 3] in [0, 255]) -> pool3 features [N, 2048], for
    `frechet.frechet_distance_of`. The variables are an argument of the jitted function, not
    constants folded into it; it compiles once per input shape."""
    jitted = functools.partial(jax.jit(_pool3_features), jax.device_put(variables))
    return lambda images: jitted(check_images(images))


@functools.cache
def expected_shapes() -> Mapping[str, tuple[int, ...]]:
    """Flat variable path ("params/Mixed_7c/branch_pool/conv/kernel", ...) -> shape (read-only)."""
    abstract = jax.eval_shape(
        FIDInceptionV3().init, jax.random.key(0), jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    )
    return types.MappingProxyType(
        {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(abstract, sep="/").items()}
    )


def check_flat_variables(flat: dict, source: str) -> None:
    """ValueError naming every missing, unexpected or mis-shaped path of flat variables."""
    expected = expected_shapes()
    problems = (
        [f"missing {path!r} {shape}" for path, shape in expected.items() if path not in flat]
        + [f"unexpected {path!r}" for path in flat if path not in expected]
        + [
            f"{path!r} has shape {tuple(np.shape(flat[path]))}, expected {shape}"
            for path, shape in expected.items()
            if path in flat and tuple(np.shape(flat[path])) != shape
        ]
    )
    if problems:
        raise ValueError(
            f"{source}: {len(problems)} problem(s) with the FID Inception-v3 variables: {'; '.join(problems)}"
        )


def save_inception_variables(variables, path: str) -> None:
    """Writes variables as an .npz, one float32 array per flat path, at exactly `path`."""
    flat = traverse_util.flatten_dict(variables, sep="/")
    check_flat_variables(flat, "variables to save")
    with open(path, "wb") as f:
        np.savez(f, **{key: np.asarray(value, np.float32) for key, value in flat.items()})


def load_inception_variables(path: str) -> dict:
    """{"params", "batch_stats"} of FIDInceptionV3 from an .npz written by
    `save_inception_variables` (or the conversion script). FileNotFoundError says how to
    make the file; ValueError names each missing, unexpected or mis-shaped key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No FID Inception weights at {path!r}. " + WEIGHTS_HELP.format(path=path))
    with np.load(path) as npz:
        flat = {key: npz[key] for key in npz.files}
    check_flat_variables(flat, path)
    return traverse_util.unflatten_dict(flat, sep="/")


# torch parameter suffix -> (Flax collection, Flax suffix, axes permutation to Flax layout or None).
_TORCH_TO_FLAX = {
    "conv.weight": ("params", "conv/kernel", (2, 3, 1, 0)),  # OIHW -> HWIO
    "bn.weight": ("params", "bn/scale", None),
    "bn.bias": ("params", "bn/bias", None),
    "bn.running_mean": ("batch_stats", "bn/mean", None),
    "bn.running_var": ("batch_stats", "bn/var", None),
    "fc.weight": ("params", "fc/kernel", (1, 0)),  # [out, in] -> [in, out]
    "fc.bias": ("params", "fc/bias", None),
}


def torch_state_dict_to_flax(state_dict: dict) -> dict[str, np.ndarray]:
    """torch Inception3 names and layouts ("Mixed_5b.branch1x1.conv.weight" [O, I, kh, kw]) ->
    flat Flax paths ("params/Mixed_5b/branch1x1/conv/kernel" [kh, kw, I, O]), float32.
    BatchNorm's num_batches_tracked counters are dropped; any other unknown name raises."""
    flat = {}
    for name, value in state_dict.items():
        parts = name.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        suffix = ".".join(parts[-2:])
        if suffix not in _TORCH_TO_FLAX:
            raise ValueError(
                f"torch parameter {name!r}: unknown kind {suffix!r}; expected one of {sorted(_TORCH_TO_FLAX)}"
            )
        collection, flax_suffix, axes = _TORCH_TO_FLAX[suffix]
        value = np.asarray(value, np.float32)
        flat["/".join([collection, *parts[:-2], flax_suffix])] = value if axes is None else value.transpose(axes)
    return flat
