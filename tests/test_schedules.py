"""Noise schedules: strictly increasing, endpoints exact, DDPM's betas reproduced."""
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
    return treedef.unflatten([l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


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
    schedule = schedules.DDPMLinear(num_betas=num_betas)
    t = jnp.arange(num_betas) / (num_betas - 1)
    gamma = schedule.apply({}, t)
    np.testing.assert_allclose(gamma, np.log((1 - alphabar) / alphabar), rtol=2e-4, atol=1e-3)
    fine = schedule.apply({}, T_GRID)
    assert np.all(np.diff(np.asarray(fine)) > 0)


def test_build_schedule_refuses_unknown_name_and_inverted_range():
    with pytest.raises(ValueError, match="model.schedule='sqrt'"):
        schedules.build_schedule("sqrt")
    with pytest.raises(ValueError, match="model.gamma_min=5.0 must be below model.gamma_max=-13.3"):
        schedules.build_schedule("fixed_linear", gamma_min=5.0, gamma_max=-13.3)
