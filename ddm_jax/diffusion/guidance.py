"""Classifier-free guidance as a transform of the denoiser (Ho & Salimans 2022, eq. 6).

    prediction = prediction_uncond + s (prediction_cond - prediction_uncond)

Eq. 6 writes (1 + w) eps_cond - w eps_uncond; the scale s here is its 1 + w (diffusers'
guidance_scale), so s = 1 is the conditional prediction alone and s = 0 the unconditional one. Every
parameterization (eps, x0, v, score) is affine in the prediction with coefficients that depend
only on (z, gamma), which both halves share, so guiding the raw prediction is the same as guiding
eps_hat. Both halves run as one batched call of the network; s = 1 and s = 0 need one half only.

Guidance in a limited interval (Kynkaanniemi et al. 2024) guides only at the noise levels
gamma_low < gamma <= gamma_high (gamma = -log SNR; their sigma, EDM's, is exp(gamma / 2)) and
takes the conditional prediction alone elsewhere: they find guidance harmful at high noise and
unneeded at low noise. A step with no example inside the interval runs the conditional half alone.
"""

import jax
import jax.numpy as jnp


def guided_denoise_fn(
    conditional_fn,
    condition,
    null_condition,
    guidance_scale: float,
    guidance_interval: tuple[float, float] | None = None,
):
    """denoise_fn(z, gamma) of classifier-free guidance with scale s = `guidance_scale` (a Python float).

    Args:
      conditional_fn: (z [B, ...], gamma [B], condition [B, ...]) -> prediction [B, ...].
      condition: the conditioning of each example, [B, ...] (e.g. text embeddings).
      null_condition: the unconditional ("empty prompt") or negative-prompt conditioning, the
        shape of `condition`.
      guidance_scale: s = 1 + w of eq. 6; 1 and 0 skip the batched call and run the needed half alone.
      guidance_interval: None (guidance at every noise level) or (gamma_low, gamma_high), Python
        floats: guidance where gamma_low < gamma <= gamma_high, the conditional prediction elsewhere.
    Returns:
      A function of (z, gamma) for any sampler of `diffusion.SAMPLERS`.
    """
    if guidance_scale == 1.0:
        return lambda z, gamma: conditional_fn(z, gamma, condition)
    if guidance_scale == 0.0 and guidance_interval is None:
        return lambda z, gamma: conditional_fn(z, gamma, null_condition)
    both_conditions = jnp.concatenate([null_condition, condition])

    def guided(z, gamma, scale):
        doubled = jax.tree.map(lambda a: jnp.concatenate([a, a]), (z, gamma))
        unconditional, conditional = jnp.split(conditional_fn(*doubled, both_conditions), 2)
        return (unconditional + scale * (conditional - unconditional)).astype(conditional.dtype)

    if guidance_interval is None:
        return lambda z, gamma: guided(z, gamma, guidance_scale)
    low, high = guidance_interval

    def conditional_only(z, gamma, _):
        return conditional_fn(z, gamma, condition)

    def denoise_fn(z, gamma):
        inside = (gamma > low) & (gamma <= high)
        scale = jnp.where(inside, guidance_scale, 1.0).reshape(-1, *[1] * (z.ndim - 1))
        return jax.lax.cond(jnp.any(inside), guided, conditional_only, z, gamma, scale)

    return denoise_fn
