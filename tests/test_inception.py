"""FID Inception-v3 on random weights: shapes, parameter count, FID-specific pooling, the weight
file, and the torch -> Flax conversion.

The real weights are not available here, so no test compares with published features or FID
values; the network is compiled a few times at most (one per input shape).
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from ddm_jax.evaluation import frechet, inception

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_NAMES = {
    "conv/kernel": "conv.weight",
    "bn/scale": "bn.weight",
    "bn/bias": "bn.bias",
    "bn/mean": "bn.running_mean",
    "bn/var": "bn.running_var",
    "fc/kernel": "fc.weight",
    "fc/bias": "fc.bias",
}
FAKE_TORCH = """
import numpy as np

class Tensor:
    def __init__(self, array):
        self.array = array

    def numpy(self):
        return self.array

def load(path, map_location, weights_only):
    assert map_location == "cpu" and weights_only
    with np.load(path) as f:
        return {name: Tensor(f[name]) for name in f.files}
"""


def random_variables(seed=0) -> dict:
    """Random kernels (He-scaled), BatchNorm scales and variances in [0.5, 1.5), small biases and means."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in inception.expected_shapes().items():
        leaf = path.rsplit("/", 1)[-1]
        if leaf == "kernel":
            flat[path] = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[:-1])))
        elif leaf in ("scale", "var"):
            flat[path] = 0.5 + rng.random(shape, np.float32)
        else:
            flat[path] = 0.1 * rng.standard_normal(shape, np.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def flat(variables) -> dict:
    return traverse_util.flatten_dict(variables, sep="/")


def to_torch_state_dict(variables) -> dict:
    """Flax variables -> torch Inception3's state dict, from torch's conventions: Conv2d weight
    [out, in, kh, kw], Linear weight [out, in], BatchNorm weight/bias/running_mean/running_var
    and a num_batches_tracked counter per BatchNorm."""
    state_dict = {}
    for path, value in flat(variables).items():
        _, *module, kind, leaf = path.split("/")
        name = ".".join([*module, TORCH_NAMES[f"{kind}/{leaf}"]])
        state_dict[name] = {4: lambda v: v.transpose(3, 2, 0, 1), 2: lambda v: v.T}.get(value.ndim, lambda v: v)(value)
        if leaf == "var":
            state_dict[".".join([*module, "bn.num_batches_tracked"])] = np.array(0)
    return state_dict


def uniform_images(n, size, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def variables():
    return random_variables()


@pytest.fixture(scope="module")
def feature_fn(variables):
    return inception.inception_feature_fn(variables)


@pytest.fixture(scope="module")
def features_299(feature_fn):
    return np.asarray(feature_fn(uniform_images(2, 299)))


def test_features_of_a_299_batch_are_2048_per_image(features_299):
    assert features_299.shape == (2, 2048)
    assert np.all(np.isfinite(features_299))
    assert np.all(features_299 >= 0)  # an average of ReLU outputs
    assert np.abs(features_299[0] - features_299[1]).max() > 1e-3


def test_a_smaller_input_is_resized_to_299(feature_fn):
    """32 x 32 images give the features of their own bilinear upsampling to 299 x 299."""
    small = uniform_images(2, 32, seed=2)
    upsampled = np.asarray(jax.image.resize(small, (2, 299, 299, 3), "bilinear", antialias=False))
    got = np.asarray(feature_fn(small))
    assert got.shape == (2, 2048)
    np.testing.assert_allclose(got, np.asarray(feature_fn(upsampled)), rtol=1e-4, atol=1e-5)


def test_is_a_feature_fn_for_frechet_batched_features(feature_fn, features_299):
    """frechet_distance_of gets its features from batched_features (the distance itself, eigen-
    decompositions of 2048 x 2048 covariances, is too slow for this suite)."""
    images = np.concatenate([uniform_images(2, 299), uniform_images(1, 299, seed=6)])
    features = frechet.batched_features(feature_fn, images, batch_size=2)
    assert features.shape == (3, 2048) and features.dtype == np.float64
    np.testing.assert_allclose(features[:2], features_299, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "images, expected",
    [
        (np.zeros((2, 32, 32, 3)) - 1.0, r"span \[-1.0, -1.0\]; expected \[0, 255\]"),
        (np.zeros((2, 32, 32, 1)), r"shape \(2, 32, 32, 1\); expected \[N, H, W, 3\]"),
        (np.zeros((32, 32, 3)), r"shape \(32, 32, 3\)"),
    ],
)
def test_images_outside_the_convention_are_refused(feature_fn, images, expected):
    with pytest.raises(ValueError, match=expected):
        feature_fn(images)


def torch_bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """torch F.interpolate(mode="bilinear", align_corners=False) along one axis, as a matrix."""
    src = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0.0)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    matrix = np.zeros((size_out, size_in))
    np.add.at(matrix, (np.arange(size_out), low), 1.0 - (src - low))
    np.add.at(matrix, (np.arange(size_out), high), src - low)
    return matrix


@pytest.mark.parametrize("size", [17, 299, 420])
def test_preprocess_is_pytorch_fid_resize_then_2x_minus_1(size):
    images = uniform_images(1, size, seed=3)
    resize = torch_bilinear_matrix(size, 299)
    expected = 2.0 * np.einsum("ph,qw,nhwc->npqc", resize, resize, images / 255.0, optimize=True) - 1.0
    got = np.asarray(inception.preprocess(images))
    np.testing.assert_allclose(got, expected, atol=1e-4)  # float32 sample positions


def test_parameter_count_is_the_fid_inception_v3s():
    """torchvision documents 27,161,264 parameters for inception_v3 with its auxiliary head.
    That head is BasicConv2d(768, 128, 1) + BasicConv2d(128, 768, 5) + Linear(768, 1000), each
    BasicConv2d a bias-free conv and a BatchNorm weight and bias per output channel. The FID
    network has no auxiliary head and a 1008-way fc: 8 more outputs of 2048 weights and a bias.
    Running means and variances are torch buffers and Flax batch_stats: 2 x 17,216 BatchNorm
    channels (counted on pytorch-fid's torch model), over 94 BatchNorm layers."""
    aux = (768 * 128 + 2 * 128) + (128 * 768 * 5 * 5 + 2 * 768) + (768 * 1000 + 1000)
    expected = 27_161_264 - aux + (1008 - 1000) * (2048 + 1)
    assert expected == 23_850_960
    shapes = inception.expected_shapes()
    count = {
        collection: sum(int(np.prod(shape)) for path, shape in shapes.items() if path.startswith(collection + "/"))
        for collection in ("params", "batch_stats")
    }
    assert count == {"params": expected, "batch_stats": 2 * 17_216}
    assert sum(path.endswith("/bn/mean") for path in shapes) == 94
    assert len(shapes) == 94 * 5 + 2  # conv kernel, BN scale, bias, mean, var; fc kernel, bias


@pytest.mark.parametrize(
    "path, shape",
    [
        ("params/Conv2d_1a_3x3/conv/kernel", (3, 3, 3, 32)),
        ("params/Conv2d_1a_3x3/bn/scale", (32,)),
        ("batch_stats/Conv2d_1a_3x3/bn/var", (32,)),
        ("params/Conv2d_4a_3x3/conv/kernel", (3, 3, 80, 192)),
        ("params/Mixed_5b/branch_pool/conv/kernel", (1, 1, 192, 32)),
        ("params/Mixed_5d/branch5x5_2/conv/kernel", (5, 5, 48, 64)),
        ("params/Mixed_6a/branch3x3/conv/kernel", (3, 3, 288, 384)),
        ("params/Mixed_6b/branch7x7_2/conv/kernel", (1, 7, 128, 128)),
        ("params/Mixed_6e/branch7x7dbl_2/conv/kernel", (7, 1, 192, 192)),
        ("params/Mixed_7a/branch7x7x3_4/conv/kernel", (3, 3, 192, 192)),
        ("params/Mixed_7b/branch1x1/conv/kernel", (1, 1, 1280, 320)),
        ("params/Mixed_7c/branch1x1/conv/kernel", (1, 1, 2048, 320)),
        ("params/Mixed_7c/branch3x3_2a/conv/kernel", (1, 3, 384, 384)),
        ("params/Mixed_7c/branch3x3_2b/conv/kernel", (3, 1, 384, 384)),
        ("params/Mixed_7c/branch3x3dbl_1/conv/kernel", (1, 1, 2048, 448)),
        ("params/Mixed_7c/branch3x3dbl_2/conv/kernel", (3, 3, 448, 384)),
        ("params/Mixed_7c/branch3x3dbl_3b/conv/kernel", (3, 1, 384, 384)),
        ("params/Mixed_7c/branch_pool/conv/kernel", (1, 1, 2048, 192)),
        ("params/fc/kernel", (2048, 1008)),
        ("params/fc/bias", (1008,)),
    ],
)
def test_layer_shapes(path, shape):
    assert inception.expected_shapes()[path] == shape


def test_unpadded_average_and_max_pools_at_the_border():
    """count_include_pad=False: a constant image stays constant at the border. The stride-1 max
    pads with -inf: an all-negative image keeps its own maxima at the border, not 0."""
    ones = np.ones((1, 5, 5, 2), np.float32)
    np.testing.assert_array_equal(inception.avg_pool_3x3(ones), ones)
    image = -1.0 - np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
    pooled = np.asarray(inception.max_pool_3x3(image, stride=1))
    assert pooled.shape == image.shape
    assert pooled[0, 0, 0, 0] == -1.0 and pooled[0, 4, 4, 0] == -19.0
    assert inception.max_pool_3x3(np.ones((1, 35, 35, 1)), stride=2).shape == (1, 17, 17, 1)


def test_basic_conv2d_is_a_bias_free_conv_then_batchnorm_eps_1e_3_then_relu():
    """Against numpy on a (1, 3) kernel with torch's symmetric padding (0, 1); the variances are
    small, so eps = 1e-3 matters."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 5, 2)).astype(np.float32)
    kernel = rng.standard_normal((1, 3, 2, 6)).astype(np.float32)
    scale, bias, mean = (rng.standard_normal(6).astype(np.float32) for _ in range(3))
    var = rng.uniform(1e-3, 1e-2, 6).astype(np.float32)
    variables = {
        "params": {"conv": {"kernel": kernel}, "bn": {"scale": scale, "bias": bias}},
        "batch_stats": {"bn": {"mean": mean, "var": var}},
    }
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    conv = sum(np.einsum("nhwi,io->nhwo", padded[:, :, j : j + 5], kernel[0, j]) for j in range(3))
    expected = np.maximum((conv - mean) / np.sqrt(var + 1e-3) * scale + bias, 0.0)
    got = inception.BasicConv2d(6, (1, 3)).apply(variables, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_pool_branches_of_the_mixed_blocks(variables):
    """The pool branch of Mixed_5c, 6c and 7b sees the unpadded 3x3 average of the block input;
    Mixed_7c's sees the 3x3 max (FID graph); it is the last channels of the block output.
    Input 139 leaves a 3 x 3 map at Mixed_7."""
    blocks = [
        ("Mixed_5b", "Mixed_5c", "avg"),
        ("Mixed_6b", "Mixed_6c", "avg"),
        ("Mixed_7a", "Mixed_7b", "avg"),
        ("Mixed_7b", "Mixed_7c", "max"),
    ]
    captured = {name for source, block, _ in blocks for name in (source, block, block + "/branch_pool")}

    def apply(variables, x):
        return inception.FIDInceptionV3().apply(
            variables,
            x,
            mutable=["intermediates"],
            capture_intermediates=lambda module, _: "/".join(module.scope.path) in captured,
        )[1]

    x = inception.preprocess(uniform_images(1, 139, seed=4))
    intermediates = flat(jax.jit(apply)(variables, x)["intermediates"])
    pools = {"avg": inception.avg_pool_3x3, "max": lambda h: inception.max_pool_3x3(h, stride=1)}
    for source, block, pool in blocks:
        block_input = intermediates[f"{source}/__call__"][0]
        got = np.asarray(intermediates[f"{block}/branch_pool/__call__"][0])
        branch = {name: tree[block]["branch_pool"] for name, tree in variables.items()}
        conv = inception.BasicConv2d(got.shape[-1], (1, 1))
        expected = {kind: np.asarray(conv.apply(branch, fn(block_input))) for kind, fn in pools.items()}
        np.testing.assert_allclose(got, expected[pool], rtol=1e-5, atol=1e-5, err_msg=block)
        other = expected["max" if pool == "avg" else "avg"]
        assert np.abs(got - other).max() > 1e-2, block
        block_output = np.asarray(intermediates[f"{block}/__call__"][0])
        np.testing.assert_array_equal(block_output[..., -got.shape[-1] :], got, err_msg=block)


def test_weight_file_round_trip(tmp_path, variables, features_299):
    path = str(tmp_path / "inception.npz")
    inception.save_inception_variables(variables, path)
    loaded = inception.load_inception_variables(path)
    assert flat(loaded).keys() == flat(variables).keys()
    for key, value in flat(variables).items():
        np.testing.assert_array_equal(flat(loaded)[key], value, err_msg=key)
    features = np.asarray(inception.inception_feature_fn(loaded)(uniform_images(2, 299)))
    np.testing.assert_array_equal(features, features_299)


def test_missing_file_says_how_to_convert_the_weights(tmp_path):
    path = str(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError) as error:
        inception.load_inception_variables(path)
    message = str(error.value)
    assert inception.TORCH_WEIGHTS_URL in message
    assert (
        "python -m experiments.convert_inception_weights "
        f"--torch_weights=pt_inception-2015-12-05-6726825d.pth --npz={path}"
    ) in message


@pytest.mark.parametrize(
    "damage, expected",
    [
        (
            lambda f: f.pop("params/Mixed_6c/branch7x7dbl_3/conv/kernel"),
            "missing 'params/Mixed_6c/branch7x7dbl_3/conv/kernel' (1, 7, 160, 160)",
        ),
        (
            lambda f: f.update({"batch_stats/Mixed_7c/branch_pool/bn/var": np.ones(191, np.float32)}),
            "'batch_stats/Mixed_7c/branch_pool/bn/var' has shape (191,), expected (192,)",
        ),
        (
            lambda f: f.update({"params/AuxLogits/fc/bias": np.ones(1000, np.float32)}),
            "unexpected 'params/AuxLogits/fc/bias'",
        ),
    ],
)
def test_a_damaged_weight_file_names_the_key(tmp_path, variables, damage, expected):
    entries = flat(variables)
    damage(entries)
    path = str(tmp_path / "damaged.npz")
    np.savez(path, **entries)
    with pytest.raises(ValueError, match="1 problem") as error:
        inception.load_inception_variables(path)
    assert expected in str(error.value)


def test_torch_state_dict_maps_onto_the_flax_tree(variables):
    state_dict = to_torch_state_dict(variables)
    assert state_dict["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state_dict["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert state_dict["fc.weight"].shape == (1008, 2048)
    converted = inception.torch_state_dict_to_flax(state_dict)
    expected = flat(variables)
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(converted[key], value, err_msg=key)
    with pytest.raises(ValueError, match="Mixed_5b.branch1x1.conv.bias"):
        inception.torch_state_dict_to_flax({**state_dict, "Mixed_5b.branch1x1.conv.bias": np.zeros(64)})


def test_conversion_script_with_a_stand_in_for_torch(tmp_path, variables):
    """The documented command end to end; torch.load is replaced by an .npz reader."""
    (tmp_path / "torch.py").write_text(FAKE_TORCH)
    torch_file, out = tmp_path / "state_dict.npz", tmp_path / "inception.npz"
    np.savez(torch_file, **to_torch_state_dict(variables))
    command = [
        sys.executable,
        "-m",
        "experiments.convert_inception_weights",
        f"--torch_weights={torch_file}",
        f"--npz={out}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT]), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = flat(inception.load_inception_variables(str(out)))
    for key, value in flat(variables).items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode != 0 and "exists; not overwriting" in rerun.stderr
