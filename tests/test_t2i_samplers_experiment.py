"""experiments/t2i_samplers.py: its settings syntax and the UNet calls its records state."""

import jax.numpy as jnp
import numpy as np
import pytest

from ddm_jax.checks import ArgumentError
from ddm_jax.diffusion.schedules import DiscreteBetas
from experiments.t2i_samplers import parsed_setting, unet_calls

SD_SCHEDULE = DiscreteBetas(kind="scaled_linear", num_betas=1000, beta_start=0.00085, beta_end=0.012)


def test_a_setting_carries_the_samplers_settings_and_a_guidance_interval():
    assert parsed_setting("ddim:50:eta=0.5:grid=log_snr") == ("ddim", 50, {"eta": 0.5, "grid": "log_snr"})
    assert parsed_setting("ancestral:25:guidance_interval=-2.55..inf") == (
        "ancestral",
        25,
        {"guidance_interval": (-2.55, float("inf"))},
    )


@pytest.mark.parametrize(
    "setting, argument",
    [
        ("ddim:many", "--settings"),
        ("euler:50", "--settings"),
        ("ancestral:50:eta=0.5", "eta"),
        ("ancestral:50:guidance_interval=2..-2", "guidance_interval"),
        ("ancestral:50:guidance_interval=low..high", "guidance_interval"),
        ("ancestral:50:guidance_interval=1", "guidance_interval"),
    ],
)
def test_a_bad_setting_is_refused_naming_what_is_wrong(setting, argument):
    with pytest.raises(ArgumentError) as error:
        parsed_setting(setting)
    assert error.value.argument == argument


def test_unet_calls_count_two_at_the_guided_steps_and_one_elsewhere():
    """A grid sampler calls the denoiser at t = 1, 1 - 1/steps, ..., 1/steps (uniform grid)."""
    steps = 25
    gammas = np.asarray(SD_SCHEDULE(jnp.asarray(np.linspace(1.0, 0.0, steps + 1)[:-1], jnp.float32)))
    assert unet_calls(SD_SCHEDULE, steps, {}, 1.0) == steps
    assert unet_calls(SD_SCHEDULE, steps, {}, 0.0) == steps
    assert unet_calls(SD_SCHEDULE, steps, {}, 4.0) == 2 * steps
    interval = (-2.55, 2.13)
    inside = int(((gammas > interval[0]) & (gammas <= interval[1])).sum())
    assert 0 < inside < steps
    assert unet_calls(SD_SCHEDULE, steps, {"guidance_interval": interval}, 4.0) == steps + inside
    assert unet_calls(SD_SCHEDULE, steps, {"guidance_interval": (10.0, np.inf)}, 4.0) == steps
