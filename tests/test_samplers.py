"""Samplers, time grids and DDIM inversion against closed forms for correlated Gaussian data.

Data x ~ N(0, Sigma) with a full 3 x 3 covariance Sigma = U diag(l) U^T. Then q(z_t) = N(0, C_t),
C_t = U diag(v_t) U^T with v_t = alpha_t^2 l + sigma_t^2, the optimal denoiser is
E[eps | z_t] = sigma_t C_t^-1 z_t, and the probability-flow ODE is linear:
z_t = U diag(sqrt(v_t / v_1)) U^T z_1, the exact map every deterministic sampler approximates.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_data import (
    EIGENVALUES,
    GAMMA_0,
    GAMMA_1,
    MIXING,
    correlated_denoiser,
    exact_flow,
    gamma_fn,
    in_eigenbasis,
    marginal_variances,
)

from ddm_jax import diffusion
from ddm_jax.diffusion import samplers, time_grids
from ddm_jax.evaluation.frechet import feature_statistics, frechet_distance

NUM_SAMPLES = 20_000


def cosine_inverse(gamma):
    """t of the cosine schedule, gamma = 2 log tan(a t + b), solved in float64."""
    b = np.arctan(np.exp(GAMMA_0 / 2.0))
    a = np.arctan(np.exp(GAMMA_1 / 2.0)) - b
    return (np.arctan(np.exp(np.asarray(gamma, np.float64) / 2.0)) - b) / a


def assert_moments(samples, covariance):
    """Mean 0 and covariance within 5 Monte-Carlo standard deviations, entry by entry."""
    samples = np.asarray(samples, np.float64)
    n = samples.shape[0]
    variances = np.diag(covariance)
    assert np.all(np.abs(samples.mean(0)) < 5 * np.sqrt(variances / n)), samples.mean(0)
    standard_errors = np.sqrt((np.outer(variances, variances) + covariance**2) / n)
    error = np.cov(samples, rowvar=False) - covariance
    assert np.all(np.abs(error) < 5 * standard_errors), error / standard_errors


def rms(a, b):
    return float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64)))))


# Time grids --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", time_grids.GRIDS)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_grids_decrease_strictly_from_one_to_zero(name, steps):
    grid = np.asarray(time_grids.time_grid(name, gamma_fn, steps))
    assert grid.shape == (steps + 1,)
    assert grid[0] == 1.0 and grid[-1] == 0.0
    assert np.all(np.diff(grid) < 0)


def test_uniform_grid_is_uniform_in_t():
    np.testing.assert_allclose(time_grids.time_grid("uniform", gamma_fn, 8), np.linspace(1, 0, 9), atol=1e-7)


def test_log_snr_grid_is_uniform_in_gamma():
    grid = jax.jit(lambda: time_grids.time_grid("log_snr", gamma_fn, 12))()
    expected = cosine_inverse(np.linspace(GAMMA_1, GAMMA_0, 13))
    np.testing.assert_allclose(grid, expected, atol=2e-6)
    np.testing.assert_allclose(gamma_fn(grid), np.linspace(GAMMA_1, GAMMA_0, 13), atol=2e-4)


def test_edm_grid_is_karras_rho_7_in_sigma():
    steps, rho = 10, 7.0
    sigma_max, sigma_min = np.exp(GAMMA_1 / 2), np.exp(GAMMA_0 / 2)
    i = np.arange(steps + 1)
    sigmas = (sigma_max ** (1 / rho) + i / steps * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    grid = time_grids.time_grid("edm", gamma_fn, steps)
    np.testing.assert_allclose(grid, cosine_inverse(2 * np.log(sigmas)), atol=2e-6)


def test_unknown_grid_and_bad_steps_raise():
    with pytest.raises(ValueError, match=r"grid='karras'.*uniform"):
        time_grids.time_grid("karras", gamma_fn, 10)
    with pytest.raises(ValueError, match="steps=0"):
        time_grids.time_grid("uniform", gamma_fn, 0)


# Samplers ----------------------------------------------------------------------------------------

SAMPLER_CASES = {
    "ancestral": dict(steps=1000, parameterization="x0"),
    "ddim_eta_0": dict(steps=500, eta=0.0, parameterization="v"),
    "ddim_eta_0.5": dict(steps=500, eta=0.5, grid="log_snr"),
    "ddim_eta_1": dict(steps=1000, eta=1.0, parameterization="score"),
    "dpm_solver_pp": dict(steps=50, parameterization="x0"),
    "ode": dict(steps=10, grid="edm"),
}


@pytest.mark.parametrize("case", SAMPLER_CASES)
def test_samples_and_their_x0_predictions_have_the_data_moments(case):
    """z_0 ~ N(0, C_0); x_hat(z_0) = E[x | z_0] ~ N(0, Sigma - (Sigma^-1 + SNR_0 I)^-1)."""
    name, settings = case.split("_eta")[0], dict(SAMPLER_CASES[case])
    parameterization = settings.pop("parameterization", "eps")
    denoise_fn = correlated_denoiser(parameterization)
    z_0, info = jax.jit(
        lambda rng: samplers.sample(
            name, rng, denoise_fn, gamma_fn, (NUM_SAMPLES, 3), parameterization=parameterization, **settings
        )
    )(jax.random.PRNGKey(0))
    if name == "ode":
        assert 20 < int(info["nfe"]) < 1000
    else:
        assert int(info["nfe"]) == settings["steps"]
    assert_moments(z_0, in_eigenbasis(marginal_variances(GAMMA_0)))
    gamma_0 = jnp.full((NUM_SAMPLES,), GAMMA_0)
    x_hat = diffusion.x0_from_eps(correlated_denoiser()(z_0, gamma_0), z_0, gamma_0)
    posterior_variances = 1.0 / (1.0 / EIGENVALUES + np.exp(-GAMMA_0))
    assert_moments(x_hat, in_eigenbasis(EIGENVALUES - posterior_variances))


def test_ddim_with_eta_1_is_ancestral_sampling():
    """The same noise draws give the same path: eta = 1 has the ancestral mean and variance."""
    run = lambda name, **settings: jax.jit(
        lambda rng: samplers.sample(
            name, rng, correlated_denoiser(), gamma_fn, (512, 3), steps=40, grid="log_snr", **settings
        )
    )(jax.random.PRNGKey(7))[0]
    ancestral, ddim = run("ancestral"), run("ddim", eta=1.0)
    np.testing.assert_allclose(ddim, ancestral, rtol=1e-4, atol=1e-5)
    assert rms(run("ddim", eta=0.5), ancestral) > 0.1


def test_ancestral_mean_is_the_posterior_mean_at_the_predicted_x0():
    """ancestral_step (eps form) = mu_q + sigma_q noise of process.posterior at x = x0_from_eps(eps_hat)."""
    z_t, eps_hat, noise = jax.random.normal(jax.random.PRNGKey(2), (3, 4, 3))
    gamma_t, gamma_s = jnp.array([-3.0, 0.5, 2.0, 7.0]), jnp.array([-5.0, -0.2, 1.9, 3.0])
    mean, variance = diffusion.posterior(z_t, diffusion.x0_from_eps(eps_hat, z_t, gamma_t), gamma_s, gamma_t)
    np.testing.assert_allclose(samplers.ancestral_step(z_t, eps_hat, gamma_t, gamma_s, 0.0), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        samplers.ancestral_step(z_t, eps_hat, gamma_t, gamma_s, noise),
        mean + np.sqrt(variance) * noise,
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_latents_get_float32_gamma_and_t(dtype):
    """The denoiser sees the gamma (and, in the PF-ODE drift, the gamma of t) that float32 latents
    get; in bfloat16, gamma = 9.3 would be 9.3125 and t = 0.3 would be 0.30078125."""

    def gamma_seen(run, latent_dtype):
        seen = []

        def denoiser(z, gamma):
            seen.append(gamma)
            return jnp.zeros_like(z)

        run(denoiser, jnp.ones((2, 3), latent_dtype))
        return seen[0]

    runs = {
        "predicted_eps": lambda denoiser, z: samplers.predicted_eps(denoiser, "eps", z, jnp.float32(9.3)),
        "drift": lambda denoiser, z: samplers.probability_flow_drift(denoiser, gamma_fn)(jnp.float32(0.3), z),
    }
    for name, run in runs.items():
        low, full = gamma_seen(run, dtype), gamma_seen(run, jnp.float32)
        assert low.dtype == jnp.float32, name
        np.testing.assert_array_equal(low, full, err_msg=name)
    np.testing.assert_array_equal(gamma_seen(runs["drift"], dtype), gamma_fn(jnp.full((2,), 0.3, jnp.float32)))


@pytest.fixture(scope="module")
def noise_z_1():
    return jax.random.normal(jax.random.PRNGKey(1), (4096, 3))


def deterministic_path_error(name, steps, z_1, grid="edm"):
    z_0, _ = jax.jit(
        lambda z: samplers.sample(
            name, jax.random.PRNGKey(0), correlated_denoiser(), gamma_fn, z.shape, steps=steps, grid=grid, z_1=z
        )
    )(z_1)
    return rms(z_0, exact_flow(z_1, GAMMA_0)), z_0


def test_dpm_solver_pp_converges_at_second_order_and_ddim_at_first(noise_z_1):
    errors = {steps: deterministic_path_error("dpm_solver_pp", steps, noise_z_1)[0] for steps in (20, 40)}
    assert errors[20] / errors[40] > 3.0, errors  # second order: 4
    ddim = {steps: deterministic_path_error("ddim", steps, noise_z_1)[0] for steps in (20, 40)}
    assert 1.6 < ddim[20] / ddim[40] < 2.4, ddim  # first order: 2
    assert errors[40] < ddim[40] / 5


def numpy_dpm_solver_pp_2m(z_1, times):
    """Lu et al. (2022), Algorithm 2, in float64 with lambda = log(alpha / sigma) from the cosine schedule."""
    b = np.arctan(np.exp(GAMMA_0 / 2.0))
    a = np.arctan(np.exp(GAMMA_1 / 2.0)) - b
    lam = -np.log(np.tan(a * np.asarray(times, np.float64) + b))  # -gamma / 2
    alpha, sigma = np.sqrt(1 / (1 + np.exp(-2 * lam))), np.sqrt(1 / (1 + np.exp(2 * lam)))

    def data_prediction(z, i):  # E[x | z_t] = alpha Sigma C_t^-1 z
        v = alpha[i] ** 2 * EIGENVALUES + sigma[i] ** 2
        return z @ in_eigenbasis(alpha[i] * EIGENVALUES / v)

    z = np.asarray(z_1, np.float64)
    x_previous = None
    for i in range(1, len(times)):
        h = lam[i] - lam[i - 1]
        x_current = data_prediction(z, i - 1)
        if x_previous is None:
            d = x_current
        else:
            r = (lam[i - 1] - lam[i - 2]) / h
            d = (1 + 1 / (2 * r)) * x_current - x_previous / (2 * r)
        z = sigma[i] / sigma[i - 1] * z - alpha[i] * (np.exp(-h) - 1) * d
        x_previous = x_current
    return z


def test_dpm_solver_pp_is_algorithm_2_of_the_paper(noise_z_1):
    """On the EDM grid, whose step ratios r vary, against an independent float64 implementation."""
    steps = 6
    times = np.asarray(time_grids.time_grid("edm", gamma_fn, steps), np.float64)
    _, z_0 = deterministic_path_error("dpm_solver_pp", steps, noise_z_1[:256])
    np.testing.assert_allclose(z_0, numpy_dpm_solver_pp_2m(noise_z_1[:256], times), rtol=1e-3, atol=1e-4)


def test_dpm_solver_pp_with_20_steps_is_closer_in_frechet_distance_than_with_5(noise_z_1):
    exact = feature_statistics(exact_flow(noise_z_1, GAMMA_0))
    distance = {
        steps: frechet_distance(
            *feature_statistics(deterministic_path_error("dpm_solver_pp", steps, noise_z_1)[1]), *exact
        )
        for steps in (5, 20)
    }
    assert distance[20] < distance[5] / 5, distance


def test_ode_trajectory_follows_the_exact_flow_on_its_grid(noise_z_1):
    z_0, info = jax.jit(
        lambda z: samplers.ode_sample(
            None, correlated_denoiser(), gamma_fn, z.shape, steps=6, grid="log_snr", return_trajectory=True, z_1=z
        )
    )(noise_z_1)
    trajectory = info["trajectory"]
    assert trajectory.shape == (7, *noise_z_1.shape)
    gammas = np.linspace(GAMMA_1, GAMMA_0, 7)
    for row, gamma in zip(np.asarray(trajectory), gammas, strict=True):
        assert rms(row, exact_flow(noise_z_1, gamma)) < 1e-3
    np.testing.assert_array_equal(trajectory[-1], z_0)


@pytest.mark.parametrize("name", ["ancestral", "ddim", "dpm_solver_pp"])
def test_trajectories_run_from_z_1_to_z_0(name, noise_z_1):
    z_0, info = jax.jit(
        lambda z: samplers.sample(
            name,
            jax.random.PRNGKey(2),
            correlated_denoiser(),
            gamma_fn,
            z.shape,
            steps=5,
            z_1=z,
            return_trajectory=True,
        )
    )(noise_z_1)
    trajectory = info["trajectory"]
    assert trajectory.shape == (6, *noise_z_1.shape)
    np.testing.assert_array_equal(trajectory[0], noise_z_1)
    np.testing.assert_array_equal(trajectory[-1], z_0)


# DDIM inversion ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_z_0():
    """z_0 ~ q(z_0) = N(0, C_0)."""
    x = jax.random.normal(jax.random.PRNGKey(3), (4096, 3)) @ jnp.asarray(MIXING.T, jnp.float32)
    return diffusion.q_sample(x, jnp.float32(GAMMA_0), jax.random.normal(jax.random.PRNGKey(4), x.shape))


def invert_and_reconstruct(z_0, steps, fixed_point_iterations=0):
    def run(z_0):
        z_1, _ = samplers.ddim_invert(
            correlated_denoiser(),
            gamma_fn,
            z_0,
            steps=steps,
            grid="log_snr",
            fixed_point_iterations=fixed_point_iterations,
        )
        return z_1, samplers.ddim_sample(
            None, correlated_denoiser(), gamma_fn, z_0.shape, steps=steps, grid="log_snr", z_1=z_1
        )[0]

    return jax.jit(run)(z_0)


@pytest.mark.parametrize("steps", [10, 25])
def test_exact_ddim_inversion_then_sampling_reconstructs_to_float_tolerance(data_z_0, steps):
    """Fixed-point inversion (20 iterations for 10 steps, the default 10 for 25): the DDIM sample
    from the inverted z_1 is z_0 up to float32 rounding (|z_0| up to 3.7)."""
    z_1, reconstruction = invert_and_reconstruct(data_z_0, steps, fixed_point_iterations=20 if steps == 10 else 10)
    assert rms(reconstruction, data_z_0) < 5e-6
    assert np.abs(np.asarray(reconstruction) - np.asarray(data_z_0)).max() < 5e-5
    assert rms(z_1, data_z_0) > 0.5  # it did travel to the noise end


def test_first_order_ddim_inversion_error_shrinks_linearly_in_steps(data_z_0):
    """No fixed-point iterations: first order in the step size, 4 times the steps, a quarter of the error."""
    errors = {}
    for steps in (25, 100, 400):
        z_1, reconstruction = invert_and_reconstruct(data_z_0, steps)
        errors[steps] = rms(reconstruction, data_z_0)
    assert errors[25] / errors[100] > 3 and errors[100] / errors[400] > 3, errors
    assert errors[400] < 0.015, errors
    # Inversion alone approximates the exact flow run forward: z_1 = U diag(sqrt(v_1 / v_0)) U^T z_0.
    forward = np.asarray(data_z_0, np.float64) @ in_eigenbasis(
        np.sqrt(marginal_variances(GAMMA_1) / marginal_variances(GAMMA_0))
    )
    assert rms(z_1, forward) < 0.01


def test_ddim_inversion_trajectory_runs_from_z_0_to_z_1(data_z_0):
    z_1, info = samplers.ddim_invert(
        correlated_denoiser(), gamma_fn, data_z_0[:8], steps=3, return_trajectory=True, fixed_point_iterations=2
    )
    trajectory = info["trajectory"]
    assert trajectory.shape == (4, 8, 3) and int(info["nfe"]) == 3 * (1 + 2)
    np.testing.assert_array_equal(trajectory[0], data_z_0[:8])
    np.testing.assert_array_equal(trajectory[-1], z_1)


# User mistakes -----------------------------------------------------------------------------------


def never_called(z, gamma):
    raise AssertionError("the denoiser ran: the error came after tracing")


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: samplers.sample("euler", None, never_called, gamma_fn, (2, 3), steps=10),
            r"sampler='euler': expected one of \('ancestral', 'ddim', 'dpm_solver_pp', 'ode'\)",
        ),
        (lambda: samplers.sample("ddim", None, never_called, gamma_fn, (2, 3), steps=0), "steps=0"),
        (lambda: samplers.sample("ancestral", None, never_called, gamma_fn, (2, 3), steps=-1), "steps=-1"),
        (
            lambda: samplers.sample("ancestral", None, never_called, gamma_fn, (2, 3), steps=4, eta=0.5),
            r"eta=0.5: expected a setting of sampler 'ancestral'",
        ),
        (lambda: samplers.sample("ode", None, never_called, gamma_fn, (2, 3), steps=2.5), "steps=2.5"),
        (
            lambda: samplers.sample("ddim", None, never_called, gamma_fn, (2, 3), steps=10, eta=1.5),
            r"eta=1.5: expected a number in \[0.0, 1.0\]",
        ),
        (lambda: samplers.sample("ddim", None, never_called, gamma_fn, (2, 3), steps=10, eta=-0.1), "eta=-0.1"),
        (
            lambda: samplers.sample("dpm_solver_pp", None, never_called, gamma_fn, (2, 3), steps=10, grid="cos"),
            "grid='cos'",
        ),
        (
            lambda: samplers.sample("ddim", None, never_called, gamma_fn, (2, 3), steps=10, parameterization="y"),
            "parameterization='y'",
        ),
        (
            lambda: samplers.ddim_step(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 1.0, 0.0, eta=0.5),
            r"noise=None: expected a noise array like z_t for eta=0.5",
        ),
        (
            lambda: samplers.ddim_step(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 1.0, 0.0, eta=jnp.float32(0.0)),
            r"noise=None: expected a noise array like z_t for eta=Array",
        ),
        (lambda: samplers.ddim_invert(never_called, gamma_fn, jnp.zeros((2, 3)), steps=0), "steps=0"),
        (
            lambda: samplers.ddim_invert(never_called, gamma_fn, jnp.zeros((2, 3)), steps=4, fixed_point_iterations=-1),
            "fixed_point_iterations=-1",
        ),
    ],
)
def test_user_mistakes_raise_before_tracing(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# One interface ------------------------------------------------------------------------------------

SHARED_SETTINGS = {"steps": inspect.Parameter.empty, "parameterization": "eps", "grid": "uniform", "z_1": None}


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_has_the_shared_signature(name):
    parameters = inspect.signature(samplers.SAMPLERS[name]).parameters
    assert list(parameters)[:4] == ["rng", "denoise_fn", "gamma_fn", "shape"]
    for setting, default in {**SHARED_SETTINGS, "return_trajectory": False}.items():
        assert parameters[setting].kind is inspect.Parameter.KEYWORD_ONLY, setting
        assert parameters[setting].default is default, setting


@pytest.mark.parametrize("return_trajectory", [False, True])
@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_returns_z_0_and_info_with_its_nfe(name, return_trajectory):
    calls = []

    def counting_denoiser(z, gamma):
        calls.append(None)  # counted at trace time: once per network evaluation in the traced program
        return correlated_denoiser()(z, gamma)

    z_0, info = samplers.sample(
        name,
        jax.random.PRNGKey(0),
        correlated_denoiser(),
        gamma_fn,
        (16, 3),
        steps=4,
        return_trajectory=return_trajectory,
    )
    assert z_0.shape == (16, 3) and z_0.dtype == jnp.float32
    assert set(info) == ({"nfe", "trajectory"} if return_trajectory else {"nfe"})
    assert info["nfe"].dtype == jnp.int32 and info["nfe"].shape == ()
    if name != "ode":  # fixed-step samplers: one network call per step, traced once inside the scan
        assert int(info["nfe"]) == 4
        samplers.sample(name, jax.random.PRNGKey(0), counting_denoiser, gamma_fn, (16, 3), steps=4)
        assert len(calls) == 1
    if return_trajectory:
        np.testing.assert_array_equal(info["trajectory"][-1], z_0)
        assert info["trajectory"].shape == (5, 16, 3)
