"""The VDM model: its gradients, including the variance-minimising schedule update."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from gaussian_data import optimal_eps
from tiny_runs import tiny_model_config

from ddm_jax import diffusion
from ddm_jax.diffusion import SHAPE_PARAMS, bits_per_dim, schedules
from ddm_jax.models.vdm import VDM
from ddm_jax.training.builders import build_vdm

S = 0.5
VOCAB = 256
IMAGE_SHAPE = (4, 4, 1)
NUM_DIMS = 16


class GaussianDenoiser(nn.Module):
    """The closed-form denoiser of x ~ N(0, S^2), as a parameter-free network."""

    @nn.compact
    def __call__(self, z, gamma, *, cond=None, train=False):
        return optimal_eps(z, gamma, S)


class ScaledDenoiser(nn.Module):
    """One learnable scale on the closed-form denoiser, so the network has a gradient too."""

    @nn.compact
    def __call__(self, z, gamma, *, cond=None, train=False):
        return self.param("scale", nn.initializers.constant(0.8), ()) * optimal_eps(z, gamma, S)


def gaussian_integers(seed, batch):
    x = S * jax.random.normal(jax.random.PRNGKey(seed), (batch, *IMAGE_SHAPE))
    return jnp.clip(jnp.floor((x + 1) * VOCAB / 2), 0, VOCAB - 1).astype(jnp.int32)


def toy_model(network, learn_endpoints=True):
    schedule = schedules.LearnedMonotone(-8.0, 6.0, n_features=32, learn_endpoints=learn_endpoints)
    return VDM(schedule=schedule, network=network, vocab_size=VOCAB)


def test_value_and_grad_gives_elbo_gradients_and_variance_gradient_for_the_shape():
    model = toy_model(ScaledDenoiser())
    params = model.init(jax.random.PRNGKey(0), IMAGE_SHAPE)
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    rng, k = jax.random.PRNGKey(2), gaussian_integers(3, 32)
    (loss, terms), grads = jax.jit(model.value_and_grad)(params, rng, k)

    def mean_bpd(p):
        return model.elbo_terms(p, rng, k, train=True)["bpd"].mean()

    def mean_squared_diffusion_bpd(p):
        return jnp.mean(bits_per_dim(model.elbo_terms(p, rng, k, train=True)["diffusion"], NUM_DIMS) ** 2)

    elbo_grads = jax.grad(mean_bpd)(params)
    variance_grads = jax.grad(mean_squared_diffusion_bpd)(params)
    np.testing.assert_allclose(loss, mean_bpd(params), rtol=1e-5)
    for got, want in [
        (grads["network"], elbo_grads["network"]),
        (grads["schedule"]["endpoints"], elbo_grads["schedule"]["endpoints"]),
        (grads["schedule"][SHAPE_PARAMS], variance_grads["schedule"][SHAPE_PARAMS]),
    ]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6), got, want)
    # The shape's ELBO gradient would be a different (and, in expectation, zero) direction.
    shape_elbo = jax.tree.leaves(elbo_grads["schedule"][SHAPE_PARAMS])
    shape_var = jax.tree.leaves(grads["schedule"][SHAPE_PARAMS])
    assert not all(np.allclose(a, b) for a, b in zip(shape_elbo, shape_var, strict=True))


def test_variance_gradient_lowers_the_variance_of_the_diffusion_loss():
    """VDM's claim on a toy problem: training the schedule's shape lowers the estimator's variance
    while its expectation (fixed endpoints) stays put."""
    model = toy_model(GaussianDenoiser(), learn_endpoints=False)
    params = model.init(jax.random.PRNGKey(0), IMAGE_SHAPE)
    optimizer = optax.adam(3e-2)

    @jax.jit
    def step(params, opt_state, rng):
        _, grads = model.value_and_grad(params, rng, gaussian_integers(rng[0], 128))
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def diffusion_bpd(params):
        terms = model.elbo_terms(params, jax.random.PRNGKey(7), gaussian_integers(8, 8192))
        return bits_per_dim(terms["diffusion"], NUM_DIMS)

    before = np.asarray(diffusion_bpd(params))
    opt_state = optimizer.init(params)
    for i in range(150):
        params, opt_state = step(params, opt_state, jax.random.PRNGKey(100 + i))
    after = np.asarray(diffusion_bpd(params))
    assert after.var() < 0.5 * before.var(), (before.var(), after.var())
    standard_error = np.sqrt(before.var() / before.size + after.var() / after.size)
    assert abs(after.mean() - before.mean()) < 4 * standard_error


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(schedule="sqrt"), "model.schedule='sqrt': expected one of"),
        (dict(network="mlp"), "model.network='mlp': expected one of"),
        (dict(gamma_min=5.0, gamma_max=-13.3), "model.gamma_max=-13.3: expected a value above gamma_min=5.0"),
        (dict(network="unet"), "model.unet.ch_mult=(1, 2, 2, 2, 2): expected at most as many levels"),
        (dict(weighting="simple", schedule="learned_monotone"), "model.weighting='simple': expected 'elbo' with"),
        (dict(parameterization="noise"), "model.parameterization='noise': expected one of"),
        (dict(schedule="ddpm_linear", T=0), "model.T=0: expected an integer >= 1 for schedule='ddpm_linear'"),
        (dict(schedule="ddpm_linear", T=10, ddpm_betas=(0.5, 2.0)), "model.ddpm_betas=2.0: expected a number in"),
        (dict(schedule="learned_monotone", schedule_features=0), "model.schedule_features=0: expected an integer >= 1"),
        (dict(T=-1), "model.T=-1: expected an integer >= 0"),
        (dict(score_net=dict(embedding_dim=2)), "model.score_net.embedding_dim=2: expected an integer >= 4"),
        (dict(score_net=dict(embeding_dim=8)), "model.score_net.embeding_dim=8: expected a field of model.score_net"),
    ],
)
def test_build_vdm_refuses_bad_config_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_vdm(tiny_model_config(**overrides), (8, 8, 1), 17)


def test_sample_returns_integers_in_the_vocabulary():
    model = build_vdm(tiny_model_config(), IMAGE_SHAPE, 17)
    params = model.init(jax.random.PRNGKey(0), IMAGE_SHAPE)
    k, info = model.sample(params, jax.random.PRNGKey(1), 3, IMAGE_SHAPE, steps=4)
    assert k.shape == (3, *IMAGE_SHAPE) and k.min() >= 0 and k.max() < 17 and int(info["nfe"]) == 4


def test_terms_of_shards_over_a_named_axis_equal_the_whole_batch():
    """What pmap does with axis_name, checked with vmap over the same axis: 4 shards of 2 examples
    get the terms of the batch of 8 (the same t and noise per example)."""
    model = build_vdm(tiny_model_config(schedule="learned_monotone"), IMAGE_SHAPE, VOCAB)
    params = model.init(jax.random.PRNGKey(0), IMAGE_SHAPE)
    k, rng = gaussian_integers(3, 8), jax.random.PRNGKey(4)
    whole = model.elbo_terms(params, rng, k)
    shards = jax.vmap(lambda shard: model.elbo_terms(params, rng, shard, axis_name="d"), axis_name="d")(
        k.reshape(4, 2, *IMAGE_SHAPE)
    )
    for name in ("reconstruction", "prior", "diffusion", "bpd"):
        np.testing.assert_allclose(shards[name].reshape(8), whole[name], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("T", [0, 10])
def test_elbo_terms_are_the_three_public_terms(T):
    """VDM.elbo_terms computes exactly reconstruction_loss + prior_loss + diffusion_loss of
    ddm_jax.diffusion, with (rng_reconstruction, rng_diffusion, _) = split(rng, 3)."""
    model = build_vdm(tiny_model_config(schedule="learned_monotone", T=T), IMAGE_SHAPE, VOCAB)
    params = model.init(jax.random.PRNGKey(0), IMAGE_SHAPE)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    k, rng = gaussian_integers(3, 8), jax.random.PRNGKey(4)
    terms = jax.jit(model.elbo_terms)(params, rng, k)
    rng_reconstruction, rng_diffusion, _ = jax.random.split(rng, 3)
    gamma_fn = model.gamma_fn(params["schedule"])
    gamma_0, gamma_1 = diffusion.gamma_endpoints(gamma_fn)
    x = diffusion.encode(k, VOCAB)
    public = {
        "reconstruction": diffusion.reconstruction_loss(rng_reconstruction, k, gamma_0, vocab_size=VOCAB),
        "prior": diffusion.prior_loss(x, gamma_1),
        "diffusion": diffusion.diffusion_loss(
            rng_diffusion, x, model.denoise_fn(params["network"]), gamma_fn, T=T, parameterization="eps"
        ),
    }
    # atol: the reconstruction term at gamma_0 = -13.3 is a softmax of logits near 1e5, whose float32
    # rounding differs between the two compiled programs by up to ~1e-4 nats.
    for name, value in public.items():
        np.testing.assert_allclose(terms[name], value, rtol=1e-5, atol=2e-4, err_msg=name)
    total = sum(public.values()) / (NUM_DIMS * np.log(2.0))
    np.testing.assert_allclose(terms["bpd"], total, rtol=1e-5, atol=2e-5)


def test_simple_weighting_trains_the_network_on_l_simple():
    """weighting="simple": the network's gradient is that of DDPM's L_simple (the reconstruction and
    prior terms do not depend on it), and the reported diffusion term is sum ||eps - eps_hat||^2."""
    model = build_vdm(tiny_model_config(weighting="simple", T=10), IMAGE_SHAPE, VOCAB)
    params = model.init(jax.random.PRNGKey(0), IMAGE_SHAPE)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    k, rng = gaussian_integers(3, 8), jax.random.PRNGKey(4)
    (loss, terms), grads = jax.jit(model.value_and_grad)(params, rng, k)
    _, rng_diffusion, rng_dropout = jax.random.split(rng, 3)
    x = diffusion.encode(k, VOCAB)

    def simple_loss(network_params):
        denoise_fn = model.denoise_fn(network_params, train=True, rng=rng_dropout)
        gamma_fn = model.gamma_fn(params["schedule"])
        return diffusion.diffusion_loss(rng_diffusion, x, denoise_fn, gamma_fn, T=10, weighting="simple")

    np.testing.assert_allclose(terms["diffusion"], simple_loss(params["network"]), rtol=1e-5)
    l_simple_grads = jax.grad(lambda p: simple_loss(p).mean() / (NUM_DIMS * np.log(2.0)))(params["network"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), grads["network"], l_simple_grads)
