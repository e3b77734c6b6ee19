"""The noise-prediction networks: shapes, zero output at init, conditioning, dropout,
ControlNet residuals, input-shape checks and the shared layers against numpy."""

import importlib
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddm_jax.models import (
    GammaEmbedding,
    MultiHeadAttention,
    ScoreNet,
    UNet,
    as_denoise_fn,
    base2_fourier_features,
    num_groups,
    sinusoidal_embedding,
)
from ddm_jax.training import builders

BATCH, SIZE, CHANNELS, COND_DIM, CONTEXT_DIM, CONTEXT_LEN = 2, 8, 3, 3, 5, 4


def build_network(name, gamma_min=-13.3, gamma_max=5.0, **settings):
    """The network config.model.network=name with config.model.<name> = settings, through the builder layer."""
    model = ml_collections.ConfigDict(dict(network=name, gamma_min=gamma_min, gamma_max=gamma_max, **{name: settings}))
    return builders.build_network(model)


def make_net(name):
    if name == "score_net":
        return ScoreNet(
            embedding_dim=16, n_layers=2, dropout=0.5, with_attention=True, attention_every=2, cond_dim=COND_DIM
        )
    return UNet(
        ch=8,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(SIZE // 2,),
        dropout=0.5,
        num_heads=2,
        context_dim=CONTEXT_DIM,
        cond_dim=COND_DIM,
    )


def example_inputs(seed, channels=CHANNELS):
    rng = np.random.default_rng(seed)
    return dict(
        z=jnp.asarray(rng.normal(size=(BATCH, SIZE, SIZE, channels)), jnp.float32),
        gamma=jnp.asarray(rng.uniform(-10.0, 4.0, size=BATCH), jnp.float32),
        cond=jnp.asarray(rng.normal(size=(BATCH, COND_DIM)), jnp.float32),
        context=jnp.asarray(rng.normal(size=(BATCH, CONTEXT_LEN, CONTEXT_DIM)), jnp.float32),
    )


def conditioning(name, inputs):
    """The keyword inputs the net `name` takes besides z and gamma."""
    keys = ("cond",) if name == "score_net" else ("cond", "context")
    return {k: inputs[k] for k in keys}


def perturbed(variables, seed=0, scale=0.2):
    """Every parameter plus scale * N(0, 1) noise (host-side, no compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.normal(size=p.shape).astype(p.dtype), variables)


def key(seed):
    """A PRNG key; the "rbg" implementation compiles the nets' init several times
    faster on CPU than the default threefry."""
    return jax.random.key(seed, impl="rbg")


class Compiled:
    """A net with its variables at init, a perturbed copy and one jitted apply
    (variables are an argument, never a closed-over constant)."""

    def __init__(self, name):
        self.name = name
        self.net = make_net(name)
        inputs = example_inputs(0)
        init = jax.jit(lambda rng, z, gamma, kw: self.net.init(rng, z, gamma, **kw))
        self.variables = init(key(0), inputs["z"], inputs["gamma"], conditioning(name, inputs))
        self.perturbed = perturbed(self.variables)
        self._apply = jax.jit(self._apply_fn, static_argnames="train")

    def _apply_fn(self, variables, z, gamma, kw, rng, train):
        return self.net.apply(variables, z, gamma, train=train, rngs={"dropout": rng}, **kw)

    def __call__(self, variables, inputs, *, train=False, rng=0, **overrides):
        inputs = {**inputs, **overrides}
        return np.asarray(
            self._apply(variables, inputs["z"], inputs["gamma"], conditioning(self.name, inputs), key(rng), train)
        )


@pytest.fixture(scope="module")
def score_net():
    return Compiled("score_net")


@pytest.fixture(scope="module")
def unet():
    return Compiled("unet")


@pytest.fixture
def net(request):
    """The module-scoped Compiled net named by the test's `name` parameter."""
    return request.getfixturevalue(request.node.callspec.params["name"])


NETS = ["score_net", "unet"]


def output_shape(net, z, gamma, **kw):
    """The shape net.apply returns, from tracing init and apply (no compilation)."""
    return jax.eval_shape(lambda rng: net.apply(net.init(rng, z, gamma, **kw), z, gamma, **kw), key(0)).shape


def assert_differ(a, b, min_diff=1e-4):
    assert np.max(np.abs(a - b)) > min_diff


@pytest.mark.parametrize("name", NETS)
def test_same_module_predicts_one_and_three_channels(name):
    net = make_net(name)
    for channels in (1, 3):
        inputs = example_inputs(0, channels)
        assert output_shape(net, inputs["z"], inputs["gamma"], **conditioning(name, inputs)) == inputs["z"].shape


def test_score_net_accepts_any_height_and_width():
    net = make_net("score_net")
    z = jnp.zeros((1, 7, 5, 1))
    assert output_shape(net, z, jnp.zeros(1), cond=jnp.zeros((1, COND_DIM))) == z.shape


@pytest.mark.parametrize("name", NETS)
def test_output_is_exactly_zero_at_init(name, net):
    out = net(net.variables, example_inputs(1))
    assert np.all(out == 0.0)


@pytest.mark.parametrize("name", NETS)
def test_output_depends_on_gamma_z_and_cond(name, net):
    inputs = example_inputs(1)
    out = net(net.perturbed, inputs)
    assert np.all(np.isfinite(out)) and np.max(np.abs(out)) > 1e-3
    assert_differ(out, net(net.perturbed, inputs, gamma=inputs["gamma"] + 1.0))
    assert_differ(out, net(net.perturbed, inputs, z=inputs["z"] + 0.5))
    assert_differ(out, net(net.perturbed, inputs, cond=inputs["cond"] + 1.0))


@pytest.mark.parametrize("name", NETS)
def test_dropout_is_random_in_training_and_off_in_evaluation(name, net):
    inputs = example_inputs(1)
    np.testing.assert_array_equal(net(net.perturbed, inputs, rng=1), net(net.perturbed, inputs, rng=2))
    train_1 = net(net.perturbed, inputs, train=True, rng=1)
    assert_differ(train_1, net(net.perturbed, inputs, train=True, rng=2))
    np.testing.assert_array_equal(train_1, net(net.perturbed, inputs, train=True, rng=1))


def test_unet_output_depends_on_context(unet):
    inputs = example_inputs(1)
    other_context = inputs["context"][:, ::-1] + 1.0
    assert_differ(unet(unet.perturbed, inputs), unet(unet.perturbed, inputs, context=other_context))


def test_as_denoise_fn_matches_apply(score_net):
    inputs = example_inputs(2)
    denoise = jax.jit(lambda v, z, gamma, cond: as_denoise_fn(score_net.net, v, cond=cond)(z, gamma))
    got = denoise(score_net.perturbed, inputs["z"], inputs["gamma"], inputs["cond"])
    np.testing.assert_allclose(got, score_net(score_net.perturbed, inputs), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def unet_with_control(unet):
    apply = jax.jit(
        lambda v, z, gamma, cond, context, control: unet.net.apply(
            v, z, gamma, cond=cond, context=context, control=control
        )
    )
    return unet, apply


def test_zero_control_leaves_the_output_unchanged_and_nonzero_control_changes_it(unet_with_control):
    unet, apply = unet_with_control
    inputs = example_inputs(1)
    without_control = unet(unet.perturbed, inputs)
    shapes = unet.net.control_shapes(inputs["z"].shape)
    zeros = [jnp.zeros(s) for s in shapes]
    args = (unet.perturbed, inputs["z"], inputs["gamma"], inputs["cond"], inputs["context"])
    np.testing.assert_allclose(apply(*args, zeros), without_control, rtol=1e-5, atol=1e-6)
    for i in (0, len(shapes) - 1):  # a skip, and the middle output
        control = [*zeros[:i], jnp.ones(shapes[i]), *zeros[i + 1 :]]
        assert_differ(np.asarray(apply(*args, control)), without_control)


def test_wrong_control_count_or_shape_raises(unet):
    inputs = example_inputs(1)
    shapes = unet.net.control_shapes(inputs["z"].shape)
    kw = conditioning("unet", inputs)

    def trace(control):
        def apply(variables):
            return unet.net.apply(variables, inputs["z"], inputs["gamma"], control=control, **kw)

        jax.eval_shape(apply, unet.variables)

    with pytest.raises(ValueError, match=f"control has {len(shapes) - 1} arrays; expected {len(shapes)}"):
        trace([jnp.zeros(s) for s in shapes[:-1]])
    with pytest.raises(ValueError, match=r"control\[0\] has shape"):
        trace([jnp.zeros((BATCH, 1, 1, 1))] + [jnp.zeros(s) for s in shapes[1:]])


@pytest.mark.parametrize(
    "ch_mult, num_res_blocks, image", [((1, 2), 1, (8, 8, 3)), ((1, 2, 3), 2, (16, 8, 1)), ((2,), 1, (5, 7, 1))]
)
def test_encode_skip_shapes_match_the_helper(ch_mult, num_res_blocks, image):
    net = UNet(ch=8, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=(4,))
    z = jnp.zeros((BATCH, *image))
    h, skips, emb = jax.eval_shape(
        lambda rng: net.apply(net.init(rng, z, jnp.zeros(BATCH)), z, jnp.zeros(BATCH), method=UNet.encode),
        key(0),
    )
    # conv_in, num_res_blocks per level, one downsampling between levels
    assert len(skips) == 1 + len(ch_mult) * num_res_blocks + len(ch_mult) - 1
    assert [s.shape for s in skips] == net.skip_shapes(z.shape)
    assert net.control_shapes(z.shape) == [*net.skip_shapes(z.shape), h.shape]
    assert net.skip_shapes(image) == [s[1:] for s in net.skip_shapes(z.shape)]
    assert emb.shape == (BATCH, 4 * 8)


def test_encode_adds_the_hint_to_the_conv_in_output(unet):
    inputs = example_inputs(1)
    encode = jax.jit(
        lambda v, z, gamma, cond, context, hint: unet.net.apply(
            v, z, gamma, cond=cond, context=context, hint=hint, method=UNet.encode
        )
    )
    args = (unet.perturbed, inputs["z"], inputs["gamma"], inputs["cond"], inputs["context"])
    hint = jnp.asarray(np.random.default_rng(3).normal(size=(BATCH, SIZE, SIZE, 8)), jnp.float32)
    h_0, skips_0, _ = encode(*args, jnp.zeros_like(hint))
    h_1, skips_1, _ = encode(*args, hint)
    np.testing.assert_allclose(skips_1[0] - skips_0[0], hint, rtol=1e-5, atol=1e-5)
    assert_differ(np.asarray(h_1), np.asarray(h_0))


def test_cross_attention_maps_can_be_intercepted(unet):
    inputs = example_inputs(1)
    seen = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "attention_weights" and context.module.name == "cross_attention":
            seen.append(out.shape)
        return out

    kw = conditioning("unet", inputs)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: unet.net.apply(v, inputs["z"], inputs["gamma"], **kw), unet.variables)
    # at 4x4: one block on the way down, the middle, two blocks on the way up
    assert seen == [(BATCH, 2, (SIZE // 2) ** 2, CONTEXT_LEN)] * 4


def test_multi_head_attention_matches_numpy():
    x = np.random.default_rng(4).normal(size=(2, 6, 8)).astype(np.float32)
    context = np.random.default_rng(5).normal(size=(2, 3, 5)).astype(np.float32)
    layer = MultiHeadAttention(num_heads=2)
    params = perturbed(jax.jit(layer.init)(key(0), x, context))
    out = jax.jit(layer.apply)(params, x, context)

    p = jax.tree.map(np.asarray, params["params"])

    def project(a, name):
        return np.einsum("bnc,chd->bnhd", a, p[name]["kernel"]) + p[name]["bias"]

    q, k, v = project(x, "query"), project(context, "key"), project(context, "value")
    logits = np.einsum("bnhd,blhd->bhnl", q, k) / math.sqrt(8 // 2)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bhnl,blhd->bnhd", weights, v)
    expected = np.einsum("bnhd,hdc->bnc", attended, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("first, last, step", [(6, 8, 1), (0, 7, 3), (-1, -1, 1)])
def test_base2_fourier_features_match_numpy(first, last, step):
    z = np.random.default_rng(6).uniform(-1, 1, size=(2, 3, 4, 2)).astype(np.float32)
    exponents = list(range(first, last + 1, step))
    sin, cos = [], []
    for c in range(z.shape[-1]):
        for n in exponents:
            sin.append(np.sin(2.0**n * np.pi * z[..., c]))
            cos.append(np.cos(2.0**n * np.pi * z[..., c]))
    expected = np.concatenate([z, np.stack(sin, -1), np.stack(cos, -1)], axis=-1)
    np.testing.assert_allclose(base2_fourier_features(jnp.asarray(z), first, last, step), expected, atol=2e-4)


@pytest.mark.parametrize("dim", [8, 9])
def test_sinusoidal_embedding_matches_formula(dim):
    x = np.array([0.0, 1.0, 500.0, 999.0])
    half = dim // 2
    args = x[:, None] * 10_000.0 ** (-np.arange(half) / (half - 1))
    expected = np.concatenate([np.sin(args), np.cos(args), np.zeros((4, dim % 2))], axis=1)
    np.testing.assert_allclose(sinusoidal_embedding(jnp.asarray(x), dim), expected, atol=2e-4)


def test_gamma_embedding_matches_numpy():
    gamma_min, gamma_max, dim, features = -13.3, 5.0, 8, 6
    gamma = np.array([gamma_min, 0.0, gamma_max], np.float32)
    cond = np.random.default_rng(7).normal(size=(3, 2)).astype(np.float32)
    layer = GammaEmbedding(dim, features, gamma_min, gamma_max)
    params = perturbed(jax.jit(layer.init)(key(0), gamma, cond))
    out = jax.jit(layer.apply)(params, gamma, cond)

    p = jax.tree.map(np.asarray, params["params"])
    t = (gamma - gamma_min) / (gamma_max - gamma_min)
    args = 1000.0 * t[:, None] * 10_000.0 ** (-np.arange(dim // 2) / (dim // 2 - 1))
    sinusoid = np.concatenate([np.sin(args), np.cos(args)], axis=1)

    def dense(x, name):
        return x @ p[name]["kernel"] + p[name]["bias"]

    def swish(x):
        return x / (1.0 + np.exp(-x))

    hidden = swish(dense(sinusoid, "dense_0") + dense(cond, "cond_proj"))
    np.testing.assert_allclose(out, swish(dense(hidden, "dense_1")), rtol=1e-4, atol=1e-4)


def test_group_count_divides_and_leaves_two_channels_per_group():
    for channels in range(2, 300):
        g = num_groups(channels)
        assert channels % g == 0 and g <= 32 and channels // g >= 2
        assert not any(channels % h == 0 for h in range(g + 1, min(32, channels // 2) + 1))
    assert (num_groups(128), num_groups(64), num_groups(16), num_groups(48), num_groups(1)) == (32, 32, 8, 24, 1)


def test_unet_input_shape_check_names_the_attribute():
    net = UNet(ch_mult=(1, 2, 2, 2))
    message = (
        "ch_mult=(1, 2, 2, 2): expected at most as many levels as the image (of shape (28, 28, 1)) can be halved: "
        "it halves the image 3 times, so height and width must be divisible by 8"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        net.check_input_shape((28, 28, 1))
    net.check_input_shape((32, 32, 3))
    net.check_input_shape((16, 24, 1))
    with pytest.raises(ValueError, match="num_heads=3: expected a divisor of every attention block's width"):
        UNet(ch=16, num_heads=3).check_input_shape((32, 32, 3))


def test_score_net_input_shape_check():
    net = ScoreNet()
    net.check_input_shape((28, 28, 1))
    net.check_input_shape((7, 5, 3))
    with pytest.raises(ValueError, match=re.escape("image_shape=(28, 28): expected (height, width, channels)")):
        net.check_input_shape((28, 28))


@pytest.mark.parametrize(
    "name, kwargs, field",
    [
        ("unet", dict(ch_mult=()), "model.unet.ch_mult=()"),
        ("unet", dict(num_res_blocks=0), "model.unet.num_res_blocks=0"),
        ("unet", dict(dropout=1.0), "model.unet.dropout=1.0"),
        ("unet", dict(gamma_min=5.0, gamma_max=-13.3), "model.gamma_max=-13.3: expected a value > gamma_min=5.0"),
        ("unet", dict(context_dim=0), "model.unet.context_dim=0"),
        ("score_net", dict(embedding_dim=2), "model.score_net.embedding_dim=2"),
        ("score_net", dict(fourier_first=8, fourier_last=6), "model.score_net.fourier_last=6"),
        ("score_net", dict(with_attention=True, embedding_dim=16, num_heads=3), "model.score_net.num_heads=3"),
    ],
)
def test_bad_attributes_raise_naming_the_field(name, kwargs, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        build_network(name, **kwargs)


@pytest.mark.parametrize("name", NETS)
def test_conditioning_inputs_must_match_the_config(name):
    net = make_net(name)
    inputs = example_inputs(0)
    kw = conditioning(name, inputs)

    def trace(**overrides):
        args = {**kw, **overrides}
        jax.eval_shape(lambda rng: net.init(rng, inputs["z"], inputs["gamma"], **args), key(0))

    with pytest.raises(ValueError, match="cond_dim=3 needs a `cond` array"):
        trace(cond=None)
    wrong_shape = r"cond_dim=3 expects `cond` of shape \(2, 3\); got \(2, 4\)"
    with pytest.raises(ValueError, match=wrong_shape):
        trace(cond=jnp.zeros((BATCH, 4)))
    unconditional = net.clone(cond_dim=None)
    with pytest.raises(ValueError, match="cond_dim=None, but `cond`"):
        jax.eval_shape(lambda rng: unconditional.init(rng, inputs["z"], inputs["gamma"], **kw), key(0))


def test_unet_context_must_match_context_dim():
    net = make_net("unet")
    inputs = example_inputs(0)

    def trace(net, context):
        jax.eval_shape(
            lambda rng: net.init(rng, inputs["z"], inputs["gamma"], cond=inputs["cond"], context=context),
            key(0),
        )

    with pytest.raises(ValueError, match="context_dim=5 needs a `context` array"):
        trace(net, None)
    with pytest.raises(ValueError, match=r"expects `context` of shape \(2, L, 5\); got \(2, 4\)"):
        trace(net, inputs["context"][..., 0])
    with pytest.raises(ValueError, match="context_dim=None, but `context`"):
        trace(net.clone(context_dim=None), inputs["context"])


def test_build_network():
    assert isinstance(build_network("score_net", n_layers=1), ScoreNet)
    unet = build_network("unet", ch=32, ch_mult=[1, 2], attn_resolutions=[4])
    assert isinstance(unet, UNet) and (unet.ch_mult, unet.attn_resolutions) == ((1, 2), (4,))
    hash(unet)  # module attributes must be hashable
    with pytest.raises(ValueError, match=r"ch_mult=\[1, 2\]: expected a non-empty tuple"):
        UNet(ch_mult=[1, 2])
    with pytest.raises(ValueError, match=r"model.network='xyz': expected one of \('score_net', 'unet'\)"):
        build_network("xyz")
    with pytest.raises(ValueError, match=r"model.unet.channels=4: expected a field of model.unet$"):
        build_network("unet", channels=4)
    with pytest.raises(ValueError, match=r"model.unet.num_res_block=4: expected .* \(nearest: num_res_blocks"):
        build_network("unet", num_res_block=4)


# Mixed precision: bfloat16 computation, float32 parameters ---------------------------------------


class MixedPrecision:
    """The bfloat16-compute twin of a Compiled (float32) net: its variables at init (same
    rng and inputs), and on the float32 net's perturbed variables (non-zero output layer)
    its output and, when `with_grads`, the gradient of a float32 loss (one jitted function
    gives both; the backward pass triples the compile time, so only one net takes it)."""

    def __init__(self, f32: Compiled, with_grads: bool):
        self.f32 = f32
        self.net = f32.net.clone(dtype=jnp.bfloat16)
        self.inputs = example_inputs(0)
        kw = conditioning(f32.name, self.inputs)
        init = jax.jit(lambda rng, z, gamma, kw: self.net.init(rng, z, gamma, **kw))
        self.variables = init(key(0), self.inputs["z"], self.inputs["gamma"], kw)
        target = jnp.asarray(np.random.default_rng(1).normal(size=self.inputs["z"].shape), jnp.float32)

        def loss(variables, z, gamma, kw):
            out = self.net.apply(variables, z, gamma, **kw)
            return jnp.mean((out - target) ** 2), out

        args = (f32.perturbed, self.inputs["z"], self.inputs["gamma"], kw)
        if with_grads:
            (_, self.output), self.grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(*args)
        else:
            _, self.output = jax.jit(loss)(*args)


@pytest.fixture(scope="module")
def score_net_bf16(score_net):
    return MixedPrecision(score_net, with_grads=True)


@pytest.fixture(scope="module")
def unet_bf16(unet):
    return MixedPrecision(unet, with_grads=False)


@pytest.fixture
def mixed(request):
    """The module-scoped MixedPrecision twin of the net named by the test's `name`."""
    return request.getfixturevalue(request.node.callspec.params["name"] + "_bf16")


@pytest.mark.parametrize("name", NETS)
def test_bfloat16_compute_keeps_the_float32_parameters_of_the_float32_model(name, mixed):
    f32_leaves = jax.tree_util.tree_leaves_with_path(mixed.f32.variables)
    assert jax.tree.structure(mixed.variables) == jax.tree.structure(mixed.f32.variables)
    for (path, expected), leaf in zip(f32_leaves, jax.tree.leaves(mixed.variables), strict=True):
        assert leaf.dtype == jnp.float32, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(leaf, expected, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", NETS)
def test_bfloat16_output_is_float32_and_close_to_the_float32_output(name, mixed):
    assert mixed.output.dtype == jnp.float32
    expected = mixed.f32(mixed.f32.perturbed, mixed.inputs)
    assert np.sqrt(np.mean(expected**2)) > 0.1  # the perturbed output layer is not zero
    error = np.sqrt(np.mean((np.asarray(mixed.output) - expected) ** 2) / np.mean(expected**2))
    # bfloat16 rounds to 2^-9 relative; measured about 1.1e-2 for both nets. The lower
    # bound shows the computation did change precision.
    assert 1e-4 < error < 3e-2


def hlo_types(text, op):
    """Element types (operands, then results) of each `stablehlo.<op>` in lowered text."""
    return [
        re.findall(r"tensor<(?:\d+x)*(\w+)>", line)
        for line in text.splitlines()
        if re.search(rf"stablehlo\.{op}\b", line)
    ]


def lowered_text(net, name, variables, inputs):
    """StableHLO text of net.apply (lowered, not compiled), variables as an argument."""
    apply = jax.jit(lambda variables, z, gamma, kw: net.apply(variables, z, gamma, **kw))
    return apply.lower(variables, inputs["z"], inputs["gamma"], conditioning(name, inputs)).as_text()


@pytest.mark.parametrize("name", NETS)
def test_bfloat16_model_computes_in_bfloat16_with_float32_islands(name, mixed):
    f32_text = lowered_text(mixed.f32.net, name, mixed.f32.perturbed, mixed.inputs)
    assert hlo_types(f32_text, "convolution") and "bf16" not in f32_text

    text = lowered_text(mixed.net, name, mixed.f32.perturbed, mixed.inputs)
    convolutions = hlo_types(text, "convolution")
    assert len(convolutions) == len(hlo_types(f32_text, "convolution"))
    assert set(convolutions[0]) == {"f32"}  # conv_in reads z in float32
    assert all(set(types) == {"bf16"} for types in convolutions[1:])
    products = hlo_types(text, "dot_general")
    float32_products = [types for types in products if types[:2] == ["f32", "f32"]]
    assert len(float32_products) == 3  # the gamma embedding: dense_0, cond_proj, dense_1
    assert len(products) - len(float32_products) > 0
    assert all(types[:2] == ["bf16", "bf16"] for types in products if types not in float32_products)
    # float32: the sinusoid and Fourier features; GroupNorm statistics and the attention
    # softmax's max and sum (jax.nn.softmax on bfloat16 logits takes the max in bfloat16)
    for op in ("sine", "cosine", "reduce"):
        assert hlo_types(text, op) and all(set(types) == {"f32"} for types in hlo_types(text, op)), op


@pytest.mark.parametrize("name", ["score_net"])  # the UNet is built of the same layers
def test_bfloat16_gradients_are_float32_and_finite(name, mixed):
    assert jax.tree.structure(mixed.grads) == jax.tree.structure(mixed.f32.perturbed)
    for path, grad in jax.tree_util.tree_leaves_with_path(mixed.grads):
        assert grad.dtype == jnp.float32, jax.tree_util.keystr(path)
        assert np.all(np.isfinite(grad)), jax.tree_util.keystr(path)
    kernels = {
        jax.tree_util.keystr(path): np.abs(grad).max()
        for path, grad in jax.tree_util.tree_leaves_with_path(mixed.grads)
        if "kernel" in jax.tree_util.keystr(path)
    }
    assert min(kernels.values()) > 0, min(kernels, key=kernels.get)


@pytest.mark.parametrize("name", NETS)
def test_compute_dtype_is_a_config_name_and_other_values_raise_naming_the_field(name):
    assert build_network(name, dtype="bfloat16").dtype == jnp.bfloat16
    assert build_network(name, dtype="float32").dtype == jnp.float32
    assert build_network(name).dtype == jnp.float32
    expected = f"model.{name}.dtype='float16': expected one of ('float32', 'bfloat16')"
    with pytest.raises(ValueError, match=re.escape(expected)):
        build_network(name, dtype="float16")
    with pytest.raises(ValueError, match=re.escape(f"model.{name}.dtype='f4': expected one of")):
        build_network(name, dtype="f4")
    with pytest.raises(ValueError, match=re.escape("dtype='float16': expected one of")):
        make_net(name).clone(dtype=jnp.float16)


@pytest.mark.parametrize(
    "config_name, variant",
    [("vdm_digits", None), ("vdm_cifar10", ""), ("vdm_cifar10", "aug"), ("vdm_imagenet", "32"), ("vdm_imagenet", "64")],
)
def test_vdm_configs_name_a_float32_compute_dtype(config_name, variant):
    module = importlib.import_module(f"configs.{config_name}")
    model = (module.get_config() if variant is None else module.get_config(variant)).model
    for name in NETS:
        if name in model:
            assert model[name].dtype == "float32"
            assert build_network(name, **model[name].to_dict()).dtype == jnp.float32
