"""Noise schedules gamma(t) = -log SNR(t), t in [0, 1], each strictly increasing.

Every schedule is a linen module mapping t [B] -> gamma [B]; fixed ones have no parameters.
`gamma_fn = lambda t: schedule.apply(variables, t)` is the function the ELBO terms take.

Learned schedules keep their endpoints exactly: gamma(0) = gamma_0 and gamma(1) = gamma_1,
and keep everything that shapes the curve between them in the sub-tree "shape", which the
VDM trains on the variance of the diffusion-loss estimate instead of its mean (Kingma et al.
2021, section 5.2; docs/conventions.md).
Every schedule takes t as an array of any shape, or a Python scalar.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ddm_jax.checks import check, check_choice, check_int, check_interval

SHAPE_PARAMS = "shape"


class FixedLinear(nn.Module):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t."""

    gamma_min: float = -13.3
    gamma_max: float = 5.0

    def __call__(self, t):
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t


class LearnedEndpoints(nn.Module):
    """Learned scalars gamma_0 < gamma_1: gamma_1 = gamma_0 + exp(log_range), so order holds for any value."""

    gamma_min: float
    gamma_max: float

    @nn.compact
    def __call__(self):
        gamma_0 = self.param("gamma_0", nn.initializers.constant(self.gamma_min), ())
        log_range = self.param("log_range", nn.initializers.constant(np.log(self.gamma_max - self.gamma_min)), ())
        return gamma_0, gamma_0 + jnp.exp(log_range)


class LearnedLinear(nn.Module):
    """gamma(t) = gamma_0 + (gamma_1 - gamma_0) t with learned endpoints (VDM's learned linear)."""

    gamma_min: float = -13.3
    gamma_max: float = 5.0

    @nn.compact
    def __call__(self, t):
        gamma_0, gamma_1 = LearnedEndpoints(self.gamma_min, self.gamma_max, name="endpoints")()
        return gamma_0 + (gamma_1 - gamma_0) * t


class PositiveDense(nn.Module):
    """Dense layer with kernel softplus(w) > 0, so it is strictly increasing in every input."""

    features: int
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(1.0)

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        y = x @ jax.nn.softplus(kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class MonotoneShape(nn.Module):
    """g~(t) = l1(t) + l3(phi(l2(l1(t)))) / n_features with positive weights: strictly increasing.

    The VDM paper's monotone network (phi = sigmoid); l1's kernel starts at softplus = 1, so the
    schedule starts close to linear and bends as training minimises the estimator's variance.
    """

    n_features: int = 1024

    @nn.compact
    def __call__(self, t):
        inverse_softplus_one = float(np.log(np.expm1(1.0)))
        h = PositiveDense(1, kernel_init=nn.initializers.constant(inverse_softplus_one), name="l1")(t)
        bend = PositiveDense(self.n_features, name="l2")(2.0 * h - 1.0)
        bend = PositiveDense(1, use_bias=False, name="l3")(2.0 * (nn.sigmoid(bend) - 0.5))
        return h + bend / self.n_features


class LearnedMonotone(nn.Module):
    """gamma(t) = gamma_0 + (gamma_1 - gamma_0) (g~(t) - g~(0)) / (g~(1) - g~(0)) (VDM, eq. 19 with exact endpoints).

    The endpoints are learned (`learn_endpoints`) or fixed to (gamma_min, gamma_max); either way
    gamma(0) and gamma(1) are exact, whatever the shape parameters.
    """

    gamma_min: float = -13.3
    gamma_max: float = 5.0
    n_features: int = 1024
    learn_endpoints: bool = True

    def __post_init__(self):
        check_int("n_features", self.n_features, minimum=1)
        super().__post_init__()

    @nn.compact
    def __call__(self, t):
        t = jnp.asarray(t, jnp.float32)
        if self.learn_endpoints:
            gamma_0, gamma_1 = LearnedEndpoints(self.gamma_min, self.gamma_max, name="endpoints")()
        else:
            gamma_0, gamma_1 = self.gamma_min, self.gamma_max
        # g~ at t, 0 and 1 in one call, so the endpoints go through the same arithmetic.
        g = MonotoneShape(self.n_features, name=SHAPE_PARAMS)(
            jnp.concatenate([t.reshape(-1), jnp.array([0.0, 1.0], t.dtype)])[:, None]
        )[:, 0]
        g_t, g_0, g_1 = g[:-2].reshape(t.shape), g[-2], g[-1]
        fraction = (g_t - g_0) / (g_1 - g_0)
        return gamma_0 + (gamma_1 - gamma_0) * fraction


class Cosine(nn.Module):
    """gamma(t) = 2 log tan(a t + b): the cosine schedule (alphabar = cos^2(pi t / 2)) truncated to
    [gamma_min, gamma_max], with b = atan(exp(gamma_min / 2)), a = atan(exp(gamma_max / 2)) - b."""

    gamma_min: float = -13.3
    gamma_max: float = 5.0

    def __call__(self, t):
        b = np.arctan(np.exp(self.gamma_min / 2.0))
        a = np.arctan(np.exp(self.gamma_max / 2.0)) - b
        return 2.0 * jnp.log(jnp.tan(a * t + b))


BETA_KINDS = ("linear", "scaled_linear")


def betas(kind: str, num_betas: int, beta_start: float, beta_end: float) -> np.ndarray:
    """beta_1..beta_N in float64: linear in i (DDPM), or linear in sqrt(beta) ("scaled_linear",
    Stable Diffusion's: beta_i = (sqrt(beta_start) + (i - 1)/(N - 1) (sqrt(beta_end) - sqrt(beta_start)))^2).

    Raises ArgumentError unless N >= 2 and 0 < beta_start < beta_end < 1.
    """
    check_choice("kind", kind, BETA_KINDS)
    check_int("num_betas", num_betas, minimum=2)
    check_interval("beta_start", beta_start, 0.0, 1.0, closed_low=False)
    check_interval("beta_end", beta_end, beta_start, 1.0, closed_low=False)
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_betas, dtype=np.float64)
    return np.square(np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), num_betas, dtype=np.float64))


def log_alphabar(betas: np.ndarray) -> np.ndarray:
    """log alphabar_i = sum_{j <= i} log(1 - beta_j), i = 1..N."""
    return np.cumsum(np.log1p(-betas))


class DiscreteBetas(nn.Module):
    """N betas (DDPM's linear ones, or SD's scaled-linear ones) as a gamma schedule, exact at
    t_i = (i - 1) / (N - 1), i = 1..N.

    gamma(t_i) = log((1 - alphabar_i) / alphabar_i), and -log alphabar is interpolated linearly
    between grid points, which keeps gamma strictly increasing. The N betas thus become a VDM with
    T = N - 1 discrete steps from alphabar_N down to alphabar_1, whose reconstruction term plays
    the part of DDPM's L_0 = -log p(x_0 | x_1). A model indexed by the timestep n = i - 1 in
    [0, N - 1] (DDPM's and SD's UNets) sees n = (N - 1) t.
    """

    kind: str = "linear"
    num_betas: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        betas(self.kind, self.num_betas, self.beta_start, self.beta_end)  # checks the fields
        super().__post_init__()

    def neg_log_alphabar(self) -> np.ndarray:
        """-log alphabar_i at the grid points t_i, i = 1..N, in float32: the table gamma interpolates."""
        return (-log_alphabar(betas(self.kind, self.num_betas, self.beta_start, self.beta_end))).astype(np.float32)

    def __call__(self, t):
        grid = np.linspace(0.0, 1.0, self.num_betas)
        c = jnp.interp(jnp.asarray(t), grid, self.neg_log_alphabar())
        return jnp.log(jnp.expm1(c))

    def timestep_of_gamma(self, gamma):
        """The continuous timestep n = (N - 1) t in [0, N - 1] at which the schedule equals gamma.

        The exact inverse of `__call__`: -log alphabar = log(1 + e^gamma) = softplus(gamma) is
        interpolated linearly between the grid points, so n is the linear interpolation of
        0, 1, ..., N - 1 at softplus(gamma) over the table. Integer timesteps map to themselves up
        to float32 rounding (< 1e-4 for SD's 1000 betas); gamma outside [gamma(0), gamma(1)] gives
        the nearest end, 0 or N - 1. Any shape; float32.
        """
        c = jax.nn.softplus(jnp.asarray(gamma, jnp.float32))
        return jnp.interp(c, self.neg_log_alphabar(), np.arange(self.num_betas, dtype=np.float32))


SCHEDULES = {
    "fixed_linear": FixedLinear,
    "learned_linear": LearnedLinear,
    "learned_monotone": LearnedMonotone,
    "cosine": Cosine,
    "ddpm_linear": functools.partial(DiscreteBetas, kind="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": functools.partial(DiscreteBetas, kind="scaled_linear", beta_start=0.00085, beta_end=0.012),
}


def build_schedule(name: str, **settings) -> nn.Module:
    """The schedule named `name` (a key of SCHEDULES) with its keyword settings.

    Raises ArgumentError for an unknown name or gamma_min >= gamma_max, before anything runs.
    """
    check_choice("schedule", name, SCHEDULES)
    if "gamma_min" in settings and "gamma_max" in settings:
        gamma_min, gamma_max = settings["gamma_min"], settings["gamma_max"]
        check(gamma_min < gamma_max, "gamma_max", gamma_max, f"a value above gamma_min={gamma_min}")
    return SCHEDULES[name](**settings)


def gamma_endpoints(gamma_fn) -> tuple[jax.Array, jax.Array]:
    """(gamma(0), gamma(1)) of a schedule function, from one call on t = [0, 1]."""
    gamma = gamma_fn(jnp.array([0.0, 1.0]))
    return gamma[0], gamma[1]
