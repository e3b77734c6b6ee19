"""Samplers of z_0 ~ p(z_0): from z_1 ~ N(0, I) down a decreasing time grid t_0 = 1 > ... > t_steps = 0.

One interface for all (score_sde's registry, read the same way): every sampler in SAMPLERS is

    sampler(rng, denoise_fn, gamma_fn, shape, *, steps, parameterization="eps", grid="uniform",
            z_1=None, return_trajectory=False, **its own settings) -> (z_0, info)

runs under jit (steps static) and returns z_0, the latent the VDM decodes with p(k | z_0), and
info = {"nfe": the number of denoise_fn calls (an int32 array), "trajectory": [steps + 1, *shape]
from z_1 to z_0 (only with return_trajectory)}. `denoise_fn(z, gamma [B])` may be any function,
e.g. a classifier-free-guided one (`diffusion.guidance`).

Noise convention, shared by all samplers: z_1 = normal(fold_in(rng, steps)) unless z_1 is
given, and the step that lands on grid point n (n = steps - 1 - j for step j, so n = 0 is
t = 0) draws normal(fold_in(rng, n)). DDIM with eta = 1 and ancestral sampling therefore see the
same noise.

Along the grid a step goes from t to s < t; every step function takes (z_t, prediction, gamma_t,
gamma_s, ...) in that order. With c = -expm1(gamma_s - gamma_t) = 1 - SNR_t / SNR_s:
  ancestral      p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t))     (Ho et al. 2020, Algorithm 2; VDM eq. 33)
  ddim           z_s = alpha_s x_hat + sigma_s sqrt(1 - eta^2 c) eps_hat + eta sigma_s sqrt(c) noise
  dpm_solver_pp  exponential integrator of the PF-ODE in lambda = log(alpha / sigma) = -gamma / 2
  ode            the probability-flow ODE with an adaptive Runge-Kutta solver (diffrax)
"""

import inspect

import diffrax
import jax
import jax.numpy as jnp

from ddm_jax.checks import check, check_choice, check_int, check_interval, is_real
from ddm_jax.diffusion.parameterization import PARAMETERIZATIONS, eps_from, x0_from_eps
from ddm_jax.diffusion.process import alpha_sigma, broadcast_to_data, posterior_coefficient
from ddm_jax.diffusion.time_grids import GRIDS, time_grid

# Tsit5 has 7 stages, the last of which is the first of the next step (first same as last).
_TSIT5_NEW_EVALUATIONS_PER_STEP = 6


# Steps: (z_t, prediction, gamma_t, gamma_s) -> z_s ------------------------------------------------


def ancestral_step(z_t, eps_hat, gamma_t, gamma_s, noise):
    """z_s = (alpha_s / alpha_t)(z_t - sigma_t c eps_hat) + sqrt(sigma_s^2 c) noise, c = -expm1(gamma_s - gamma_t).

    With DDPM's betas this is Algorithm 2's update with sigma_t^2 = beta~_t.
    """
    gamma_s, gamma_t = broadcast_to_data(gamma_s, z_t), broadcast_to_data(gamma_t, z_t)
    c = posterior_coefficient(gamma_s, gamma_t)
    alpha_s, _ = alpha_sigma(gamma_s)
    alpha_t, sigma_t = alpha_sigma(gamma_t)
    mean = (alpha_s / alpha_t) * (z_t - sigma_t * c * eps_hat)
    return mean + jnp.sqrt(jax.nn.sigmoid(gamma_s) * c) * noise


def ddim_step(z_t, eps_hat, gamma_t, gamma_s, *, eta=0.0, noise=None):
    """DDIM (Song et al. 2021, eq. 12) in gamma form, c = -expm1(gamma_s - gamma_t):

    z_s = alpha_s x_hat + sigma_s sqrt(1 - eta^2 c) eps_hat + eta sigma_s sqrt(c) noise,
    x_hat = (z_t - sigma_t eps_hat) / alpha_t. eta = 1 has the ancestral variance sigma_s^2 c
    (and the ancestral mean). noise=None is the deterministic step and needs eta = 0 (a Python
    number); it also runs forward in time (gamma_s > gamma_t): DDIM inversion.
    """
    check(
        noise is not None or (is_real(eta) and eta == 0),
        "noise",
        noise,
        f"a noise array like z_t for eta={eta!r} (noise=None is the deterministic step, eta = 0)",
    )
    gamma_s, gamma_t = broadcast_to_data(gamma_s, z_t), broadcast_to_data(gamma_t, z_t)
    alpha_s, sigma_s = alpha_sigma(gamma_s)
    x_hat = x0_from_eps(eps_hat, z_t, gamma_t)
    if noise is None:
        return alpha_s * x_hat + sigma_s * eps_hat
    c = posterior_coefficient(gamma_s, gamma_t)
    return alpha_s * x_hat + sigma_s * (jnp.sqrt(1.0 - eta**2 * c) * eps_hat + eta * jnp.sqrt(c) * noise)


def dpm_solver_pp_step(z_t, x0_estimate, gamma_t, gamma_s):
    """z_s = (sigma_s / sigma_t) z_t - alpha_s expm1(-h) D, h = lambda_s - lambda_t = (gamma_t - gamma_s) / 2.

    DPM-Solver++ (Lu et al. 2022, Algorithm 2) with lambda = log(alpha / sigma) = -gamma / 2.
    D = x_hat(z_t) is the first-order step (equal to DDIM, eta = 0); the 2M step uses
    D = x_hat_t + (x_hat_t - x_hat_previous) / (2 r), r = h_previous / h.
    """
    gamma_s, gamma_t = broadcast_to_data(gamma_s, z_t), broadcast_to_data(gamma_t, z_t)
    alpha_s, sigma_s = alpha_sigma(gamma_s)
    _, sigma_t = alpha_sigma(gamma_t)
    return (sigma_s / sigma_t) * z_t - alpha_s * jnp.expm1(0.5 * (gamma_s - gamma_t)) * x0_estimate


# Shared machinery ------------------------------------------------------------------------------


def check_sampler_settings(steps, parameterization: str, grid: str) -> None:
    """The settings every sampler shares, checked before anything is traced."""
    check_int("steps", steps, minimum=1)
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    check_choice("grid", grid, GRIDS)


def per_example_time(value, z) -> jax.Array:
    """A scalar t or gamma as a [B] array for the batch z, in float32 (z's dtype when wider): in
    z's bfloat16 or float16 it would be quantised (bfloat16 steps gamma by 0.0625 in [8, 16))."""
    return jnp.full((z.shape[0],), value, jnp.result_type(z.dtype, jnp.float32))


def predicted_eps(denoise_fn, parameterization: str, z, gamma):
    """eps_hat(z; gamma) for a scalar gamma (broadcast to the batch) from a prediction of any kind."""
    gamma = per_example_time(gamma, z)
    return eps_from(denoise_fn(z, gamma), z, gamma, parameterization)


def _initial_latent(rng, shape, steps, z_1):
    return jax.random.normal(jax.random.fold_in(rng, steps), shape) if z_1 is None else z_1


def _step_noise(rng, shape, steps, j):
    return jax.random.normal(jax.random.fold_in(rng, steps - 1 - j), shape)


def _info(nfe, trajectory=None) -> dict:
    info = {"nfe": jnp.asarray(nfe, jnp.int32)}
    if trajectory is not None:
        info["trajectory"] = trajectory
    return info


def _scan_grid(step, z, state, gammas, *, return_trajectory: bool, nfe_per_step: int = 1):
    """(z_end, info): (z, state) <- step(z, state, j, gamma_t, gamma_s) for consecutive grid points."""

    def body(carry, inputs):
        z, state = step(*carry, *inputs)
        return (z, state), (z if return_trajectory else None)

    steps = gammas.shape[0] - 1
    (z_end, _), path = jax.lax.scan(body, (z, state), (jnp.arange(steps), gammas[:-1], gammas[1:]))
    trajectory = jnp.concatenate([z[None], path]) if return_trajectory else None
    return z_end, _info(steps * nfe_per_step, trajectory)


# Fixed-step samplers ---------------------------------------------------------------------------


def ancestral_sample(
    rng,
    denoise_fn,
    gamma_fn,
    shape,
    *,
    steps: int,
    parameterization: str = "eps",
    grid: str = "uniform",
    z_1=None,
    return_trajectory: bool = False,
):
    """z_0 by `steps` ancestral steps p(z_s | z_t) = q(z_s | z_t, x_hat(z_t)) (Ho et al. 2020, Algorithm 2)."""
    check_sampler_settings(steps, parameterization, grid)

    def step(z_t, state, j, gamma_t, gamma_s):
        eps_hat = predicted_eps(denoise_fn, parameterization, z_t, gamma_t)
        return ancestral_step(z_t, eps_hat, gamma_t, gamma_s, _step_noise(rng, shape, steps, j)), state

    gammas = gamma_fn(time_grid(grid, gamma_fn, steps))
    return _scan_grid(step, _initial_latent(rng, shape, steps, z_1), None, gammas, return_trajectory=return_trajectory)


def ddim_sample(
    rng,
    denoise_fn,
    gamma_fn,
    shape,
    *,
    steps: int,
    parameterization: str = "eps",
    grid: str = "uniform",
    z_1=None,
    return_trajectory: bool = False,
    eta: float = 0.0,
):
    """z_0 by `steps` DDIM steps (`ddim_step`); eta = 0 is deterministic given z_1, eta = 1 ancestral."""
    check_sampler_settings(steps, parameterization, grid)
    check_interval("eta", eta, 0.0, 1.0, closed_high=True)

    def step(z_t, state, j, gamma_t, gamma_s):
        eps_hat = predicted_eps(denoise_fn, parameterization, z_t, gamma_t)
        noise = _step_noise(rng, shape, steps, j) if eta > 0 else None
        return ddim_step(z_t, eps_hat, gamma_t, gamma_s, eta=eta, noise=noise), state

    gammas = gamma_fn(time_grid(grid, gamma_fn, steps))
    return _scan_grid(step, _initial_latent(rng, shape, steps, z_1), None, gammas, return_trajectory=return_trajectory)


def dpm_solver_pp_sample(
    rng,
    denoise_fn,
    gamma_fn,
    shape,
    *,
    steps: int,
    parameterization: str = "eps",
    grid: str = "uniform",
    z_1=None,
    return_trajectory: bool = False,
):
    """z_0 by DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the first step first order, then multistep.

    Deterministic given z_1. The paper's own grid is uniform in log-SNR (grid="log_snr").
    """
    check_sampler_settings(steps, parameterization, grid)

    def step(z_t, state, j, gamma_t, gamma_s):
        x0_previous, h_previous = state
        x0_hat = x0_from_eps(predicted_eps(denoise_fn, parameterization, z_t, gamma_t), z_t, gamma_t)
        h = 0.5 * (gamma_t - gamma_s)
        correction = jnp.where(j == 0, 0.0, h / (2.0 * h_previous))  # 1 / (2 r); none on the first step
        estimate = x0_hat + correction * (x0_hat - x0_previous)
        return dpm_solver_pp_step(z_t, estimate, gamma_t, gamma_s), (x0_hat, h)

    z = _initial_latent(rng, shape, steps, z_1)
    gammas = gamma_fn(time_grid(grid, gamma_fn, steps))
    return _scan_grid(step, z, (jnp.zeros_like(z), jnp.ones(())), gammas, return_trajectory=return_trajectory)


def ddim_invert(
    denoise_fn,
    gamma_fn,
    z_0,
    *,
    steps: int,
    parameterization: str = "eps",
    grid: str = "uniform",
    fixed_point_iterations: int = 10,
    return_trajectory: bool = False,
):
    """(z_1, info) from z_0 by inverting deterministic DDIM (eta = 0) step by step, from t = 0 up the grid.

    The sampling step from t to s is z_s = alpha_s x_hat(z_t) + sigma_s eps_hat(z_t; t); its
    inverse is the z_t that solves z_t = alpha_t (z_s - sigma_s e) / alpha_s + sigma_t e with
    e = eps_hat(z_t; t). The first guess takes e at (z_s, s) (the usual first-order inversion);
    each of `fixed_point_iterations` iterations re-evaluates e at the current z_t. When the
    iteration contracts (a small step; Pan et al. 2023, "Effective real image editing with
    accelerated iterative diffusion inversion"), `ddim_sample` from the z_1 returned reconstructs
    z_0 to float tolerance; 0 iterations is the first-order inversion, whose error shrinks only
    linearly in 1 / steps. info["nfe"] = steps (1 + fixed_point_iterations); the trajectory runs
    from z_0 to z_1 (increasing t).
    """
    check_sampler_settings(steps, parameterization, grid)
    check_int("fixed_point_iterations", fixed_point_iterations, minimum=0)

    def step(z_s, state, j, gamma_s, gamma_t):
        def with_eps_at(z_t):
            return ddim_step(z_s, predicted_eps(denoise_fn, parameterization, z_t, gamma_t), gamma_s, gamma_t)

        first_order = ddim_step(z_s, predicted_eps(denoise_fn, parameterization, z_s, gamma_s), gamma_s, gamma_t)
        return jax.lax.fori_loop(0, fixed_point_iterations, lambda _, z_t: with_eps_at(z_t), first_order), state

    gammas = gamma_fn(time_grid(grid, gamma_fn, steps))[::-1]
    return _scan_grid(
        step, z_0, None, gammas, return_trajectory=return_trajectory, nfe_per_step=1 + fixed_point_iterations
    )


# Probability-flow ODE --------------------------------------------------------------------------


def probability_flow_drift(denoise_fn, gamma_fn, parameterization: str = "eps"):
    """The drift f(t, z) of the probability-flow ODE dz/dt = f, in gamma form:

    f(t, z) = 1/2 gamma'(t) sigma_t (eps_hat(z; gamma_t) - sigma_t z).

    Derivation: the VP SDE dz = -1/2 beta z dt + sqrt(beta) dW has alpha_t^2 = exp(-int_0^t beta),
    so beta(t) = d/dt log(1 + e^gamma) = sigmoid(gamma) gamma' = sigma_t^2 gamma'(t). Its PF-ODE
    (Song et al. 2021, eq. 13) is dz/dt = -1/2 beta (z + score) with score = -eps_hat / sigma_t
    (Tweedie), i.e. -1/2 sigma_t^2 gamma' (z - eps_hat / sigma_t), the form above.
    gamma'(t) comes from autodiff of gamma_fn. t is a scalar; z is a batch [B, ...].
    """

    def drift(t, z):
        t = per_example_time(t, z)
        gamma, gamma_slope = jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
        eps_hat = eps_from(denoise_fn(z, gamma), z, gamma, parameterization)
        _, sigma = alpha_sigma(broadcast_to_data(gamma, z))
        return 0.5 * broadcast_to_data(gamma_slope, z) * sigma * (eps_hat - sigma * z)

    return drift


def solve_adaptive(
    vector_field,
    y0,
    t0: float,
    t1: float,
    *,
    initial_steps: int,
    rtol: float,
    atol: float,
    save_times=None,
    max_steps: int = 4096,
):
    """y(t1) for dy/dt = vector_field(t, y), y(t0) = y0, by Tsit5 with a PID step-size controller (diffrax).

    The initial step is (t1 - t0) / initial_steps; y may be a pytree; the error norm (RMS) and
    the steps are shared by the whole batch. Returns (y(t1), y at save_times or None, NFE) with
    NFE = 1 + 6 (attempted steps): Tsit5 reuses its last stage as the next step's first.
    """
    saveat = diffrax.SaveAt(t1=True) if save_times is None else diffrax.SaveAt(ts=save_times)
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: vector_field(t, y)),
        diffrax.Tsit5(),
        t0=t0,
        t1=t1,
        dt0=(t1 - t0) / initial_steps,
        y0=y0,
        saveat=saveat,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
    )
    final = jax.tree.map(lambda y: y[-1], solution.ys)
    nfe = 1 + _TSIT5_NEW_EVALUATIONS_PER_STEP * solution.stats["num_steps"]
    return final, (None if save_times is None else solution.ys), nfe


def ode_sample(
    rng,
    denoise_fn,
    gamma_fn,
    shape,
    *,
    steps: int,
    parameterization: str = "eps",
    grid: str = "uniform",
    z_1=None,
    return_trajectory: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
):
    """z_0 by solving the probability-flow ODE (`probability_flow_drift`) from t = 1 to 0 adaptively.

    steps sets the initial step size 1 / steps and the grid of the returned trajectory; the
    solver picks its own steps, and info["nfe"] counts its denoiser evaluations.
    """
    check_sampler_settings(steps, parameterization, grid)
    z = _initial_latent(rng, shape, steps, z_1)
    save_times = time_grid(grid, gamma_fn, steps) if return_trajectory else None
    drift = probability_flow_drift(denoise_fn, gamma_fn, parameterization)
    z_0, trajectory, nfe = solve_adaptive(
        drift, z, 1.0, 0.0, initial_steps=steps, rtol=rtol, atol=atol, save_times=save_times
    )
    return z_0, _info(nfe, trajectory)


SAMPLERS = {
    "ancestral": ancestral_sample,
    "ddim": ddim_sample,
    "dpm_solver_pp": dpm_solver_pp_sample,
    "ode": ode_sample,
}


def check_settings(name: str, settings) -> None:
    """Raises ArgumentError for an unknown sampler or a setting it does not take (e.g. eta for
    "ancestral"); the values are checked by the sampler itself."""
    check_choice("sampler", name, SAMPLERS)
    parameters = inspect.signature(SAMPLERS[name]).parameters
    accepted = tuple(key for key, parameter in parameters.items() if parameter.kind is parameter.KEYWORD_ONLY)
    for key, value in settings.items():
        check(key in accepted, key, value, f"a setting of sampler {name!r}: one of {accepted}")


def sample(name: str, rng, denoise_fn, gamma_fn, shape, *, steps: int, **settings):
    """(z_0, info) of the sampler `name` (a key of SAMPLERS) with its keyword settings (`check_settings`)."""
    check_settings(name, settings)
    return SAMPLERS[name](rng, denoise_fn, gamma_fn, shape, steps=steps, **settings)
