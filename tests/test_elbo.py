"""The ELBO terms against independent computations and the closed forms of Gaussian data."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_data import continuous_diffusion_loss, discrete_diffusion_loss, optimal_denoiser, optimal_eps
from scipy import stats
from scipy.special import logsumexp

from ddm_jax import diffusion
from ddm_jax.diffusion import schedules

GAMMA_0, GAMMA_1 = -10.0, 6.0
S = 0.5  # data standard deviation
NUM_DIMS = 3
BATCH = 40_000


def gamma_fn_of(schedule):
    variables = schedule.init(jax.random.PRNGKey(0), jnp.zeros((1,)))
    return lambda t: schedule.apply(variables, t)


def gaussian_batch(seed, batch=BATCH):
    return S * jax.random.normal(jax.random.PRNGKey(seed), (batch, NUM_DIMS))


def mean_and_stderr(values):
    values = np.asarray(values, np.float64)
    return values.mean(), values.std() / np.sqrt(values.size)


def test_encode_decode_roundtrip():
    k = jnp.arange(17)
    x = diffusion.encode(k, 17)
    np.testing.assert_allclose(x, 2 * (np.arange(17) + 0.5) / 17 - 1, rtol=1e-6)
    np.testing.assert_array_equal(diffusion.decode(x, 17), k)


def test_prior_loss_closed_form_matches_monte_carlo():
    x = jnp.array([[0.9, -0.3, 0.0, 1.0]])
    gamma_1 = 2.0
    closed = float(diffusion.prior_loss(x, gamma_1)[0])
    alpha, sigma = (float(a) for a in diffusion.alpha_sigma(jnp.float32(gamma_1)))
    rng = np.random.default_rng(0)
    z = alpha * np.asarray(x[0]) + sigma * rng.standard_normal((400_000, 4))
    log_ratio = (stats.norm.logpdf(z, alpha * np.asarray(x[0]), sigma) - stats.norm.logpdf(z)).sum(-1)
    mc, se = mean_and_stderr(log_ratio)
    assert abs(closed - mc) < 4 * se + 1e-6, (closed, mc, se)


@pytest.mark.parametrize("vocab_size, gamma_0", [(17, -3.0), (256, -7.0), (5, 1.0)])
def test_reconstruction_matches_direct_sum_over_values(vocab_size, gamma_0):
    rng = jax.random.PRNGKey(1)
    k = jax.random.randint(jax.random.PRNGKey(2), (4, 3, 2, 1), 0, vocab_size)
    loss = diffusion.reconstruction_loss(rng, k, gamma_0, vocab_size=vocab_size)
    # Independent computation: the same z_0, then log N(z_0; alpha x_v, sigma^2) normalised over v.
    x = np.asarray(diffusion.encode(k, vocab_size), np.float64)
    # Example b's noise is normal(fold_in(rng, b)) (per-example draws, the same on any device).
    eps = np.stack(
        [np.asarray(jax.random.normal(jax.random.fold_in(rng, b), k.shape[1:]), np.float64) for b in range(k.shape[0])]
    )
    alpha, sigma = np.sqrt(1 / (1 + np.exp(gamma_0))), np.sqrt(1 / (1 + np.exp(-gamma_0)))
    z_0 = alpha * x + sigma * eps
    x_values = 2 * (np.arange(vocab_size) + 0.5) / vocab_size - 1
    log_density = stats.norm.logpdf(z_0[..., None], alpha * x_values, sigma)
    log_p = np.take_along_axis(log_density, np.asarray(k)[..., None], -1)[..., 0] - logsumexp(log_density, -1)
    np.testing.assert_allclose(loss, -log_p.reshape(4, -1).sum(-1), rtol=2e-4, atol=1e-4)


def test_reconstruction_of_fine_vocabulary_at_low_noise_is_near_zero():
    k = jnp.arange(256).reshape(1, 256)
    loss = diffusion.reconstruction_loss(jax.random.PRNGKey(0), k, -13.3, vocab_size=256)
    # sigma_0 = exp(-6.65) ~ 0.0013 against bins of half-width 1/256: about 1e-3 nats per dim.
    assert 0.0 <= float(loss[0]) / 256 < 5e-3


def test_sample_times_are_low_discrepancy_and_on_the_grid():
    t = diffusion.sample_times(jax.random.PRNGKey(3), 8)
    np.testing.assert_allclose(np.sort(np.diff(np.sort(np.asarray(t)))), np.full(7, 1 / 8), atol=1e-6)
    t = diffusion.sample_times(jax.random.PRNGKey(3), 64, T=10)
    assert np.all(t > 0) and np.all(t <= 1)
    np.testing.assert_allclose(np.asarray(t) * 10, np.round(np.asarray(t) * 10), atol=1e-5)


def expected_loss(schedule, T, parameterization="eps", seed=0, antithetic=True):
    gamma_fn = gamma_fn_of(schedule)
    loss_fn = jax.jit(
        lambda rng, x: diffusion.diffusion_loss(
            rng,
            x,
            optimal_denoiser(S, parameterization),
            gamma_fn,
            T=T,
            parameterization=parameterization,
            antithetic=antithetic,
        )
    )
    return loss_fn(jax.random.PRNGKey(seed), gaussian_batch(seed + 100))


@pytest.mark.parametrize("parameterization", diffusion.PARAMETERIZATIONS)
@pytest.mark.parametrize("T", [0, 4])
def test_diffusion_loss_matches_analytic_expectation(parameterization, T):
    schedule = schedules.FixedLinear(GAMMA_0, GAMMA_1)
    if T == 0:
        analytic = continuous_diffusion_loss(GAMMA_0, GAMMA_1, S, NUM_DIMS)
    else:
        analytic = discrete_diffusion_loss(np.linspace(GAMMA_0, GAMMA_1, T + 1), S, NUM_DIMS)
    mc, se = mean_and_stderr(expected_loss(schedule, T, parameterization, antithetic=False))
    assert abs(mc - analytic) < 4 * se, (mc, analytic, se)


@pytest.mark.parametrize("T", [0, 7])
def test_equivalent_predictions_give_the_same_loss_in_every_parameterization(T):
    schedule = schedules.FixedLinear(GAMMA_0, GAMMA_1)
    reference = expected_loss(schedule, T, "eps")
    for parameterization in ("x0", "v", "score"):
        np.testing.assert_allclose(
            expected_loss(schedule, T, parameterization), reference, rtol=2e-3, atol=1e-4, err_msg=parameterization
        )


def test_discrete_loss_approaches_continuous_as_T_grows():
    schedule = schedules.FixedLinear(GAMMA_0, GAMMA_1)
    continuous = continuous_diffusion_loss(GAMMA_0, GAMMA_1, S, NUM_DIMS)
    gaps = []
    for T in (2, 10, 1000):
        mc, se = mean_and_stderr(expected_loss(schedule, T))
        gaps.append(abs(mc - continuous))
        assert abs(mc - discrete_diffusion_loss(np.linspace(GAMMA_0, GAMMA_1, T + 1), S, NUM_DIMS)) < 4 * se
    assert gaps[0] > gaps[1] > 0
    assert gaps[2] < 4 * se  # at T = 1000 within Monte-Carlo error of the continuous loss
    assert discrete_diffusion_loss(np.linspace(GAMMA_0, GAMMA_1, 2 + 1), S, NUM_DIMS) > continuous


def scaled_denoiser(z, gamma):
    """A denoiser that is a function of (z, gamma) only but is not optimal."""
    return 0.6 * optimal_eps(z, gamma, 2.0 * S) + 0.1 * jnp.tanh(z)


def test_continuous_loss_does_not_depend_on_schedule_shape():
    """Same endpoints, different shapes: the same expected continuous-time loss (VDM eq. 14)."""
    monotone = schedules.LearnedMonotone(GAMMA_0, GAMMA_1, n_features=16, learn_endpoints=False)
    variables = monotone.init(jax.random.PRNGKey(0), jnp.zeros((1,)))
    variables = jax.tree.map(lambda p: p + 2.0 * jax.random.normal(jax.random.PRNGKey(5), p.shape), variables)
    gamma_fns = {
        "linear": gamma_fn_of(schedules.FixedLinear(GAMMA_0, GAMMA_1)),
        "cosine": gamma_fn_of(schedules.Cosine(GAMMA_0, GAMMA_1)),
        "monotone": lambda t: monotone.apply(variables, t),
    }
    x = gaussian_batch(7, 100_000)
    estimates = {}
    for name, gamma_fn in gamma_fns.items():
        losses = jax.jit(lambda rng, x: diffusion.diffusion_loss(rng, x, scaled_denoiser, gamma_fn))(
            jax.random.PRNGKey(8), x
        )
        estimates[name] = mean_and_stderr(losses)
    # Independent reference: D/2 int E||eps - f(z, gamma)||^2 dgamma by quadrature over gamma.
    gammas = np.linspace(GAMMA_0, GAMMA_1, 4001)
    alpha, sigma = np.sqrt(1 / (1 + np.exp(gammas))), np.sqrt(1 / (1 + np.exp(-gammas)))
    eps = np.random.default_rng(0).standard_normal((2000, 1))
    xs = S * np.random.default_rng(1).standard_normal((2000, 1))
    z = alpha * xs + sigma * eps
    f = np.asarray(scaled_denoiser(jnp.asarray(z.T[..., None]), jnp.asarray(gammas)))[..., 0].T
    integrand = np.mean((eps - f) ** 2, 0)
    reference = 0.5 * NUM_DIMS * np.trapezoid(integrand, gammas)
    for name, (mc, se) in estimates.items():
        assert abs(mc - reference) < 4 * se + 0.02 * reference, (name, mc, reference, se)
    means = [m for m, _ in estimates.values()]
    ses = [se for _, se in estimates.values()]
    assert max(means) - min(means) < 4 * max(ses) * np.sqrt(2)


def test_simple_loss_is_unweighted_eps_mse():
    x = gaussian_batch(0, 64)
    schedule = gamma_fn_of(schedules.FixedLinear(GAMMA_0, GAMMA_1))
    denoise = lambda z, g: 0.3 * z
    rng = jax.random.PRNGKey(4)
    simple = diffusion.diffusion_loss(rng, x, denoise, schedule, T=10, weighting="simple")
    rng_t, rng_eps = jax.random.split(rng)
    t = diffusion.sample_times(rng_t, 64, T=10)
    eps = jnp.stack([jax.random.normal(jax.random.fold_in(rng_eps, b), x.shape[1:]) for b in range(64)])
    alpha, sigma = diffusion.alpha_sigma(schedule(t)[:, None])
    z = alpha * x + sigma * eps
    np.testing.assert_allclose(simple, ((eps - 0.3 * z) ** 2).sum(-1), rtol=1e-5)


def test_min_snr_weight_is_simple_clipped_at_snr_5():
    """w = 2 min(SNR, 5) / SNR (Hang et al. 2023): L_simple's 2 up to SNR 5, then 10 / SNR."""
    snr = jnp.array([0.01, 1.0, 5.0, 10.0, 100.0])
    weight = diffusion.loss_weight("min_snr", -jnp.log(snr), jnp.zeros_like(snr))
    np.testing.assert_allclose(weight, [2.0, 2.0, 2.0, 1.0, 0.1], rtol=1e-6)


def test_v_mse_weighting_is_the_mse_of_v():
    """With weighting "v_mse" the loss is ||v - v_hat||^2 of the v-prediction, computed directly."""
    x = gaussian_batch(0, 64)
    schedule = gamma_fn_of(schedules.FixedLinear(GAMMA_0, GAMMA_1))
    predict_v = lambda z, g: 0.3 * z
    rng = jax.random.PRNGKey(5)
    loss = diffusion.diffusion_loss(rng, x, predict_v, schedule, T=10, parameterization="v", weighting="v_mse")
    rng_t, rng_eps = jax.random.split(rng)
    t = diffusion.sample_times(rng_t, 64, T=10)
    eps = jnp.stack([jax.random.normal(jax.random.fold_in(rng_eps, b), x.shape[1:]) for b in range(64)])
    alpha, sigma = diffusion.alpha_sigma(schedule(t)[:, None])
    z = alpha * x + sigma * eps
    np.testing.assert_allclose(loss, ((alpha * eps - sigma * x - 0.3 * z) ** 2).sum(-1), rtol=1e-4)


def test_unknown_parameterization_and_weighting_are_refused():
    x = gaussian_batch(0, 4)
    with pytest.raises(
        ValueError, match=re.escape("parameterization='noise': expected one of ('eps', 'x0', 'v', 'score')")
    ):
        diffusion.diffusion_loss(jax.random.PRNGKey(0), x, lambda z, g: z, lambda t: t, parameterization="noise")
    expected = "weighting='l1': expected one of ('elbo', 'simple', 'min_snr', 'v_mse')"
    with pytest.raises(ValueError, match=re.escape(expected)):
        diffusion.diffusion_loss(jax.random.PRNGKey(0), x, lambda z, g: z, lambda t: t, weighting="l1")


@pytest.mark.parametrize("T", [-1, 2.5])
def test_diffusion_loss_refuses_a_T_that_is_not_an_integer_at_least_0(T):
    def never_called(z, gamma):
        raise AssertionError("the denoiser ran: the error came after tracing")

    with pytest.raises(ValueError, match=re.escape(f"T={T!r}: expected an integer >= 0")):
        diffusion.diffusion_loss(jax.random.PRNGKey(0), gaussian_batch(0, 4), never_called, lambda t: t, T=T)


@pytest.mark.parametrize("parameterization, sign", [("eps", 1.0), ("v", 1.0), ("x0", -1.0), ("score", -1.0)])
def test_target_and_eps_scale_map_a_prediction_error_to_eps_space(parameterization, sign):
    """eps - eps_hat = sign * scale * (target - prediction), eps_hat from `eps_from` (an independent conversion)."""
    x, eps, prediction = jax.random.normal(jax.random.PRNGKey(6), (3, 5, 2))
    gamma = jnp.array([-6.0, -1.0, 0.0, 2.5, 8.0])
    z = diffusion.q_sample(x, gamma, eps)
    target, scale = diffusion.target_and_eps_scale(x, eps, z, gamma, parameterization)
    eps_hat = diffusion.eps_from(prediction, z, gamma, parameterization)
    np.testing.assert_allclose(eps - eps_hat, sign * scale * (target - prediction), rtol=1e-4, atol=1e-4)


def test_posterior_matches_bayes_rule_in_alphabar_form():
    """The gamma form of q(z_s | z_t, x) equals the seed's mu_q and Sigma_q in alphabar form."""
    gamma_s, gamma_t = jnp.float32(-2.0), jnp.float32(0.5)
    ab_s, ab_t = 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(0.5))  # alphabar = sigmoid(-gamma)
    a_t = ab_t / ab_s  # the one-step alpha_t of the seed
    x, z_t = jnp.array([[0.3, -0.7]]), jnp.array([[1.1, 0.2]])
    mean, var = diffusion.posterior(z_t, x, gamma_s, gamma_t)
    mu_q = (np.sqrt(a_t) * (1 - ab_s) * np.asarray(z_t) + np.sqrt(ab_s) * (1 - a_t) * np.asarray(x)) / (1 - ab_t)
    sigma_q2 = (1 - a_t) * (1 - ab_s) / (1 - ab_t)
    np.testing.assert_allclose(mean, mu_q, rtol=1e-5)
    np.testing.assert_allclose(np.broadcast_to(var, (1, 2)), np.full((1, 2), sigma_q2), rtol=1e-5)


@pytest.mark.parametrize("antithetic", [True, False])
def test_a_shard_draws_its_rows_of_the_whole_batch(antithetic):
    """Rows 4..7 of a batch of 8 get the times and noise they get when the whole batch is drawn."""
    rng, rows = jax.random.PRNGKey(5), jnp.arange(4, 8)
    whole = diffusion.sample_times(rng, 8, T=10, antithetic=antithetic)
    shard = diffusion.sample_times(rng, 8, T=10, antithetic=antithetic, rows=rows)
    np.testing.assert_array_equal(shard, whole[4:])
    np.testing.assert_array_equal(
        diffusion.per_example_normal(rng, (4, 3), rows), diffusion.per_example_normal(rng, (8, 3))[4:]
    )
