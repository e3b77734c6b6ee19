"""The VAE objective: its terms against independent numpy computations, the KL against Monte Carlo,
and reparameterised gradients against finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddm_jax.models.autoencoder_kl import AutoencoderKL, gaussian_kl, sample_latent, vae_terms

VAE = AutoencoderKL(
    block_out_channels=(4, 8),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=2,
    norm_num_groups=2,
)


@pytest.fixture(scope="module")
def params_and_images():
    x = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 3), minval=-1.0, maxval=1.0)
    params = VAE.init(jax.random.PRNGKey(1), x)["params"]
    return params, x


DECODER_LOGPDF = {  # scipy's densities of standard deviation `std`, independent of the package's
    "gaussian": lambda x, x_hat, std: stats.norm.logpdf(x, x_hat, std),
    "laplace": lambda x, x_hat, std: stats.laplace.logpdf(x, x_hat, std / np.sqrt(2)),
}


@pytest.mark.parametrize("likelihood", sorted(DECODER_LOGPDF))
def test_terms_equal_reconstruction_plus_beta_kl_computed_independently(params_and_images, likelihood):
    params, x = params_and_images
    rng, decoder_std, beta = jax.random.PRNGKey(2), 0.1, 0.25
    terms = jax.jit(
        lambda p, x: vae_terms(VAE, p, rng, x, decoder_std=decoder_std, beta=beta, decoder_likelihood=likelihood)
    )(params, x)
    mean, logvar = (np.asarray(a, np.float64) for a in VAE.apply({"params": params}, x, method="encode"))
    eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(rng, b), mean.shape[1:])) for b in range(3)])
    z = mean + np.exp(logvar / 2) * eps.astype(np.float64)  # example b's noise: normal(fold_in(rng, b))
    x_hat = np.asarray(VAE.apply({"params": params}, jnp.asarray(z, jnp.float32), method="decode"), np.float64)
    log_likelihood = DECODER_LOGPDF[likelihood](np.asarray(x, np.float64), x_hat, decoder_std)
    reconstruction = -log_likelihood.reshape(3, -1).sum(-1)
    closed_kl = 0.5 * (np.exp(logvar) + mean**2 - 1 - logvar).reshape(3, -1).sum(-1)  # independent of gaussian_kl
    np.testing.assert_allclose(terms["reconstruction"], reconstruction, rtol=1e-4)
    np.testing.assert_allclose(terms["kl"], closed_kl, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(terms["loss"], reconstruction + beta * closed_kl, rtol=1e-4)
    np.testing.assert_allclose(terms["elbo"], reconstruction + closed_kl, rtol=1e-4)


def test_gaussian_kl_matches_monte_carlo():
    mean, logvar = jnp.array([[0.3, -1.2]]), jnp.array([[-0.5, 0.7]])
    z = np.asarray(sample_latent(jax.random.PRNGKey(3), jnp.broadcast_to(mean, (400_000, 2)), logvar), np.float64)
    log_ratio = (stats.norm.logpdf(z, mean, np.exp(logvar / 2)) - stats.norm.logpdf(z)).sum(-1)
    standard_error = log_ratio.std() / np.sqrt(len(log_ratio))
    assert abs(float(gaussian_kl(mean, logvar)[0]) - log_ratio.mean()) < 4 * standard_error


def test_reparameterised_gradients_match_finite_differences(params_and_images):
    """d loss / d theta along a random direction of the parameters, by autodiff and by central
    differences of the same (fixed-noise) loss."""
    params, x = params_and_images
    rng = jax.random.PRNGKey(4)
    loss = jax.jit(lambda p: vae_terms(VAE, p, rng, x, decoder_std=0.3, beta=0.5)["loss"].sum())
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    direction = treedef.unflatten([jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)])
    autodiff = sum(
        float(jnp.vdot(g, d))
        for g, d in zip(jax.tree.leaves(jax.grad(loss)(params)), jax.tree.leaves(direction), strict=True)
    )
    h = 1e-3
    moved = lambda sign: jax.tree.map(lambda p, d: p + sign * h * d, params, direction)
    finite = (float(loss(moved(1.0))) - float(loss(moved(-1.0)))) / (2 * h)
    assert finite == pytest.approx(autodiff, rel=2e-2)
    # The gradient flows through the sample: with the latent noise, the encoder's logvar gets one.
    encoder_grads = jax.grad(loss)(params)["quant_conv"]["kernel"]
    assert float(jnp.abs(encoder_grads[..., VAE.latent_channels :]).max()) > 0
