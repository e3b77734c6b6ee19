"""Noise schedules: strictly increasing, endpoints exact, DDPM's betas reproduced."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_jax.diffusion import schedules

T_GRID = jnp.linspace(0.0, 1.0, 2001)


def gamma_and_slope(schedule, variables, t=T_GRID):
    return jax.jvp(lambda t: schedule.apply(variables, t), (t,), (jnp.ones_like(t),))


def randomised(variables, seed, scale=3.0):
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten(
        [leaf + scale * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)]
    )


@pytest.mark.parametrize("name", ["fixed_linear", "cosine"])
def test_fixed_schedules_hit_their_endpoints(name):
    schedule = schedules.build_schedule(name, gamma_min=-13.3, gamma_max=5.0)
    gamma, slope = gamma_and_slope(schedule, {})
    np.testing.assert_allclose([gamma[0], gamma[-1]], [-13.3, 5.0], rtol=1e-5)
    assert np.all(np.diff(np.asarray(gamma)) > 0) and np.all(slope > 0)


@pytest.mark.parametrize("learn_endpoints", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_monotone_is_increasing_and_endpoint_exact_for_any_parameters(learn_endpoints, seed):
    schedule = schedules.LearnedMonotone(-13.3, 5.0, n_features=64, learn_endpoints=learn_endpoints)
    variables = randomised(schedule.init(jax.random.PRNGKey(seed), T_GRID), seed)
    gamma, slope = jax.jit(lambda v: gamma_and_slope(schedule, v))(variables)
    if learn_endpoints:
        endpoints = variables["params"]["endpoints"]
        gamma_0 = float(endpoints["gamma_0"])
        gamma_1 = gamma_0 + float(np.exp(endpoints["log_range"]))
    else:
        gamma_0, gamma_1 = -13.3, 5.0
    assert float(gamma[0]) == pytest.approx(gamma_0, abs=1e-5)
    assert float(gamma[-1]) == pytest.approx(gamma_1, abs=1e-4 * max(1.0, abs(gamma_1)))
    assert np.all(np.diff(np.asarray(gamma)) > 0)
    assert np.all(np.asarray(slope) > 0)


def test_learned_monotone_keeps_shape_parameters_apart_from_endpoints():
    variables = schedules.LearnedMonotone(n_features=8).init(jax.random.PRNGKey(0), T_GRID)
    assert set(variables["params"]) == {"endpoints", schedules.SHAPE_PARAMS}


def test_learned_linear_is_linear_between_learned_endpoints_in_either_order():
    schedule = schedules.LearnedLinear(-5.0, 3.0)
    variables = randomised(schedule.init(jax.random.PRNGKey(0), T_GRID), 4)
    gamma, slope = gamma_and_slope(schedule, variables)
    assert np.all(np.asarray(slope) > 0)
    np.testing.assert_allclose(np.diff(np.asarray(gamma), 2), 0.0, atol=1e-4)


def test_ddpm_schedule_reproduces_alphabar_on_its_grid():
    num_betas = 1000
    betas = np.linspace(1e-4, 0.02, num_betas)
    alphabar = np.cumprod(1 - betas)
    schedule = schedules.build_schedule("ddpm_linear", num_betas=num_betas)
    t = jnp.arange(num_betas) / (num_betas - 1)
    gamma = schedule.apply({}, t)
    np.testing.assert_allclose(gamma, np.log((1 - alphabar) / alphabar), rtol=2e-4, atol=1e-3)
    fine = schedule.apply({}, T_GRID)
    assert np.all(np.diff(np.asarray(fine)) > 0)


def test_build_schedule_refuses_unknown_name_and_inverted_range():
    with pytest.raises(ValueError, match="schedule='sqrt': expected one of"):
        schedules.build_schedule("sqrt")
    with pytest.raises(ValueError, match=re.escape("gamma_max=-13.3: expected a value above gamma_min=5.0")):
        schedules.build_schedule("fixed_linear", gamma_min=5.0, gamma_max=-13.3)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(beta_start=0.5, beta_end=2.0), "beta_end=2.0: expected a number in (0.5, 1.0)"),
        (dict(beta_start=0.0, beta_end=0.02), "beta_start=0.0: expected a number in (0.0, 1.0)"),
        (dict(beta_start=0.02, beta_end=0.01), "beta_end=0.01: expected a number in (0.02, 1.0)"),
        (dict(num_betas=1), "num_betas=1: expected an integer >= 2"),
        (dict(kind="cosine"), "kind='cosine': expected one of ('linear', 'scaled_linear')"),
    ],
)
def test_beta_schedules_refuse_betas_outside_the_unit_interval_or_not_increasing(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        schedules.DiscreteBetas(**settings)


def test_monotone_schedule_refuses_zero_features():
    with pytest.raises(ValueError, match=re.escape("n_features=0: expected an integer >= 1")):
        schedules.LearnedMonotone(n_features=0)


def test_scaled_linear_is_stable_diffusions_schedule():
    """SD's betas: linspace(sqrt(0.00085), sqrt(0.012), 1000)^2; gamma(n / 999) = log((1 - ab_n) / ab_n)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphabar = np.cumprod(1.0 - betas)
    schedule = schedules.build_schedule("scaled_linear", num_betas=1000)
    timesteps = np.array([0, 1, 250, 500, 981, 999])
    gamma = schedule.apply({}, jnp.asarray(timesteps / 999.0, jnp.float32))
    np.testing.assert_allclose(gamma, np.log((1 - alphabar[timesteps]) / alphabar[timesteps]), rtol=1e-4, atol=1e-4)


def test_schedules_take_python_scalars_and_gamma_endpoints_agree():
    schedule = schedules.LearnedMonotone(-13.3, 5.0, n_features=8)
    variables = schedule.init(jax.random.PRNGKey(0), jnp.zeros((1,)))
    gamma_fn = lambda t: schedule.apply(variables, t)
    gamma_0, gamma_1 = schedules.gamma_endpoints(gamma_fn)
    np.testing.assert_allclose([gamma_fn(0.0), gamma_fn(1.0)], [gamma_0, gamma_1], rtol=1e-6)
    np.testing.assert_allclose([gamma_0, gamma_1], [-13.3, 5.0], rtol=1e-5)
