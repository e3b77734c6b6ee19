"""Stable Diffusion's schedules in ddm_jax's terms, the latent diffusion model and the
text-to-image pipeline, on the tiny random-weight fixtures (tests/fixtures/sd1_tiny, sd2_tiny;
PyTorch's outputs in reference_outputs.npz, experiments/make_parity_fixtures.py).

The tiny text encoders have 1000 token ids, fewer than CLIP's 49,408, so the pipeline runs on
copies of the fixtures with a tokenizer/ folder of 914 ids (the first 400 merges of CLIP's table).
"""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import sd_generate
from ddm_jax.checks import ArgumentError
from ddm_jax.diffusion import SAMPLERS, alpha_sigma, ddim_step, eps_from, guided_denoise_fn
from ddm_jax.diffusion.schedules import DiscreteBetas
from ddm_jax.evaluation.generate import generate, sample_images
from ddm_jax.evaluation.prompt_sensitivity import clean_latent_change
from ddm_jax.models.clip_text import CLIPTextModel
from ddm_jax.models.clip_tokenizer import END_OF_TEXT, END_OF_TEXT_ID, byte_order_vocabulary, shipped_merges
from ddm_jax.models.latent_diffusion import LatentDiffusion, load_tokenizer, schedule_from_scheduler_config
from ddm_jax.training.generation import check_generation_config
from ddm_jax.training.sharding import batch_sharded, make_mesh, replicate

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
FAMILIES = ("sd1_tiny", "sd2_tiny")
PAD_TOKENS = {"sd1_tiny": END_OF_TEXT, "sd2_tiny": {"content": "!"}}  # as special_tokens_map.json writes them
TINY_MERGES = 400
RTOL = 1e-5  # float32 parity with PyTorch, relative to the largest reference value
PROMPTS = ["a photo of a cat", "an astronaut riding a horse"]
# One pipeline setting shared by the tests and the --mode=generate run, so it compiles once.
PIPELINE = dict(sampler="ddim", steps=3, guidance_scale=7.5, grid="uniform")


def relative_error(found, expected) -> float:
    return float(np.max(np.abs(np.asarray(found, np.float64) - expected)) / np.max(np.abs(expected)))


def write_tiny_tokenizer(folder: pathlib.Path, pad_token) -> None:
    """tokenizer/ with vocab.json and merges.txt of CLIP's first TINY_MERGES merges (ids < 1000)
    and special_tokens_map.json naming `pad_token`."""
    merges = shipped_merges()[:TINY_MERGES]
    folder.mkdir()
    vocabulary = {token: i for i, token in enumerate(byte_order_vocabulary(merges))}
    (folder / "vocab.json").write_text(json.dumps(vocabulary))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *(f"{a} {b}" for a, b in merges)]) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Copies of the fixtures with a tiny tokenizer/."""
    folders = {}
    for name in FAMILIES:
        folder = tmp_path_factory.mktemp("checkpoints") / name
        shutil.copytree(FIXTURES / name, folder)
        write_tiny_tokenizer(folder / "tokenizer", PAD_TOKENS[name])
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def loaded(checkpoints) -> dict:
    return {name: LatentDiffusion.load(folder) for name, folder in checkpoints.items()}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, loaded):
    model, params = loaded[request.param]
    return request.param, model, params, np.load(FIXTURES / request.param / "reference_outputs.npz")


encode_prompts = jax.jit(lambda model, params, ids: model.encode_prompts(params, ids), static_argnums=0)
predict = jax.jit(lambda model, params, z, gamma, context: model.predict(params, z, gamma, context), static_argnums=0)


@functools.partial(jax.jit, static_argnames=("model", "scale"))
def guided_prediction(model, unet_params, z, gamma, context, null_context, *, scale):
    return guided_denoise_fn(model.conditional_fn(unet_params), context, null_context, scale)(z, gamma)


# SD's schedules as gamma schedules.


@pytest.mark.parametrize(
    "kind, num_betas, beta_start, beta_end", [("scaled_linear", 1000, 0.00085, 0.012), ("linear", 10, 1e-4, 0.2)]
)
def test_timestep_of_gamma_inverts_the_schedule(kind, num_betas, beta_start, beta_end):
    schedule = DiscreteBetas(kind=kind, num_betas=num_betas, beta_start=beta_start, beta_end=beta_end)
    n = np.arange(num_betas)
    gamma_n = schedule(jnp.asarray(n / (num_betas - 1), jnp.float32))
    np.testing.assert_allclose(schedule.timestep_of_gamma(gamma_n), n, rtol=0, atol=1e-4)
    gamma = jnp.linspace(gamma_n[0], gamma_n[-1], 2001)
    found = schedule(schedule.timestep_of_gamma(gamma) / (num_betas - 1))
    np.testing.assert_allclose(found, gamma, rtol=0, atol=2e-5)
    ends = schedule.timestep_of_gamma(jnp.array([gamma_n[0] - 1.0, gamma_n[-1] + 1.0]))
    np.testing.assert_array_equal(ends, [0, num_betas - 1])


@pytest.mark.parametrize("name, parameterization", [("sd1_tiny", "eps"), ("sd2_tiny", "v")])
def test_scheduler_config_is_sd_scaled_linear_schedule(name, parameterization):
    config = json.loads((FIXTURES / name / "scheduler" / "scheduler_config.json").read_text())
    schedule, found = schedule_from_scheduler_config(config)
    assert found == parameterization
    # alphabar_n = prod_{m <= n} (1 - beta_m), beta = (linspace of sqrt(beta)) ^ 2, in float64.
    alphabar = np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    gamma = schedule(jnp.asarray(np.arange(1000) / 999, jnp.float32))
    np.testing.assert_allclose(gamma, np.log((1 - alphabar) / alphabar), rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "key, value",
    [
        ("rescale_betas_zero_snr", True),
        ("thresholding", True),
        ("clip_sample", True),
        ("trained_betas", [0.1, 0.2]),
        ("variance_type", "learned_range"),
        ("beta_schedule", "squaredcos_cap_v2"),
        ("prediction_type", "flow_prediction"),
    ],
)
def test_scheduler_options_ddm_jax_cannot_honour_are_refused(key, value):
    config = json.loads((FIXTURES / "sd1_tiny" / "scheduler" / "scheduler_config.json").read_text())
    with pytest.raises(ArgumentError) as error:
        schedule_from_scheduler_config({**config, key: value})
    assert error.value.argument == key


def test_load_names_the_scheduler_config_key(tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(FIXTURES / "sd1_tiny", folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "thresholding": True}))
    with pytest.raises(ArgumentError, match="scheduler_config.json: thresholding=True"):
        LatentDiffusion.load(folder)


# One classifier-free-guided DDIM step against diffusers.


def test_guided_ddim_step_matches_diffusers(family):
    """diffusers' DDIMScheduler.step (eta 0) from timestep 701 to 601 of the guided prediction is
    ddim_step between gamma(701/999) and gamma(601/999) of its eps (for v: eps = sigma z + alpha v).
    diffusers' alphas_cumprod is a float32 product, ours float64 then float32: they differ by
    9e-7 relative at 701, and the step by 1.4e-7."""
    name, model, _, ref = family
    n = model.schedule.num_betas - 1
    gamma_t = jnp.full((1,), model.gamma_fn(ref["cfg_timestep"] / n))
    gamma_s = jnp.full((1,), model.gamma_fn(ref["cfg_prev_timestep"] / n))
    uncond, cond = ref["cfg_noise_pred_uncond"], ref["cfg_noise_pred_cond"]
    guided = uncond + ref["cfg_guidance_scale"] * (cond - uncond)
    eps = eps_from(guided, ref["cfg_latents"], gamma_t, model.parameterization)
    z_s = ddim_step(ref["cfg_latents"], eps, gamma_t, gamma_s)
    assert model.parameterization == {"sd1_tiny": "eps", "sd2_tiny": "v"}[name]
    assert relative_error(z_s, ref["cfg_next_latents"]) < RTOL


def test_model_reproduces_the_guided_step(family):
    """The same step with the model's own text encoder, gamma -> timestep map and guided UNet call."""
    _, model, params, ref = family
    context = encode_prompts(model, params["text_encoder"], ref["cfg_cond_ids"])
    null_context = encode_prompts(model, params["text_encoder"], ref["cfg_uncond_ids"])
    assert relative_error(context, ref["cfg_cond_embeddings"]) < RTOL
    assert relative_error(null_context, ref["cfg_uncond_embeddings"]) < RTOL
    n = model.schedule.num_betas - 1
    gamma_t = jnp.full((1,), model.gamma_fn(ref["cfg_timestep"] / n))
    gamma_s = jnp.full((1,), model.gamma_fn(ref["cfg_prev_timestep"] / n))
    assert float(model.timestep(gamma_t)[0]) == float(ref["cfg_timestep"])
    z = ref["cfg_latents"]
    guided = guided_prediction(
        model, params["unet"], z, gamma_t, context, null_context, scale=float(ref["cfg_guidance_scale"])
    )
    uncond, cond = ref["cfg_noise_pred_uncond"], ref["cfg_noise_pred_cond"]
    assert relative_error(guided, uncond + ref["cfg_guidance_scale"] * (cond - uncond)) < RTOL
    z_s = ddim_step(z, eps_from(guided, z, gamma_t, model.parameterization), gamma_t, gamma_s)
    assert relative_error(z_s, ref["cfg_next_latents"]) < RTOL


# Guidance.


def test_guidance_scales_one_and_zero_and_the_batched_call(loaded):
    model, params = loaded["sd1_tiny"]
    ref = np.load(FIXTURES / "sd1_tiny" / "reference_outputs.npz")
    context = encode_prompts(model, params["text_encoder"], ref["cfg_cond_ids"])
    null_context = encode_prompts(model, params["text_encoder"], ref["cfg_uncond_ids"])
    z, gamma = ref["cfg_latents"], model.gamma_fn(jnp.full((1,), 0.3))
    cond = predict(model, params["unet"], z, gamma, context)
    uncond = predict(model, params["unet"], z, gamma, null_context)
    for scale, expected in ((1.0, cond), (0.0, uncond), (7.5, uncond + 7.5 * (cond - uncond))):
        found = guided_prediction(model, params["unet"], z, gamma, context, null_context, scale=scale)
        assert relative_error(found, expected) < RTOL, scale
    assert relative_error(cond, uncond) > 1e-3  # the two halves differ, so the checks above can fail


def test_guidance_interval_guides_inside_it_and_takes_the_conditional_prediction_elsewhere():
    """(gamma_low, gamma_high] = (-1, 1]: rows at gamma 1 and 0.5 are guided, rows at -1 and 3 are
    conditional; a batch with no row inside is conditional throughout (the branch of one half)."""

    def conditional_fn(z, gamma, condition):
        return z * condition[:, None] + gamma[:, None] ** 2

    @jax.jit
    def interval_guided(z, gamma, condition, null_condition):
        return guided_denoise_fn(conditional_fn, condition, null_condition, 3.0, (-1.0, 1.0))(z, gamma)

    z, gamma = jnp.arange(12.0).reshape(4, 3), jnp.array([1.0, 0.5, -1.0, 3.0])
    condition, null_condition = jnp.array([1.0, 2.0, -1.0, 0.5]), jnp.array([0.0, 1.0, 3.0, -2.0])
    conditional = np.asarray(conditional_fn(z, gamma, condition))
    unconditional = np.asarray(conditional_fn(z, gamma, null_condition))
    guided = unconditional + 3.0 * (conditional - unconditional)
    found = interval_guided(z, gamma, condition, null_condition)
    np.testing.assert_allclose(found, np.concatenate([guided[:2], conditional[2:]]), rtol=1e-6)
    outside = jnp.array([-1.0, -3.0, 3.0, 1.5])
    found = interval_guided(z, outside, condition, null_condition)
    np.testing.assert_allclose(found, conditional_fn(z, outside, condition), rtol=1e-6)
    assert not np.allclose(guided, conditional)  # guidance changes the rows, so the checks above can fail


def test_negative_prompt_replaces_the_unconditional_half(loaded):
    """At w = 0 the images are the negative prompt's alone: those of that prompt at w = 1."""
    model, params = loaded["sd1_tiny"]
    settings = {**PIPELINE, "rng": jax.random.key(3)}
    unconditional = generate(
        model, params, PROMPTS, negative_prompts=["a red square", "blue"], **{**settings, "guidance_scale": 0.0}
    )
    conditional = generate(model, params, ["a red square", "blue"], **{**settings, "guidance_scale": 1.0})
    np.testing.assert_array_equal(unconditional, conditional)
    assert not np.array_equal(unconditional, generate(model, params, PROMPTS, **{**settings, "guidance_scale": 1.0}))


def test_a_guidance_interval_without_a_step_inside_gives_the_conditional_images(loaded):
    """SD's noise levels lie in gamma = -log SNR within (-8, 6): an interval above them guides no step."""
    model, params = loaded["sd1_tiny"]
    settings = {**PIPELINE, "rng": jax.random.key(3)}
    conditional = generate(model, params, PROMPTS, **{**settings, "guidance_scale": 1.0})
    unguided = generate(model, params, PROMPTS, **settings, guidance_interval=(10.0, float("inf")))
    np.testing.assert_array_equal(unguided, conditional)
    assert not np.array_equal(conditional, generate(model, params, PROMPTS, **settings))


# The pipeline.


def pipeline_floats(model, params, prompts, sampler, rng):
    """What `generate` computes before uint8: the float images of `sample_images`, on the 1-device mesh."""
    mesh = make_mesh(1)
    sharding = batch_sharded(mesh)
    ids = jax.device_put((model.tokenize(prompts), model.tokenize([""] * len(prompts))), sharding)
    settings = {**PIPELINE, "sampler": sampler}
    return sample_images(
        replicate(params, mesh),
        *ids,
        rng,
        model=model,
        guidance_scale=settings["guidance_scale"],
        sampler=sampler,
        steps=settings["steps"],
        latent_shape=model.latent_shape(),
        settings=(("grid", settings["grid"]),),
        batch_sharding=sharding,
    )


def test_pipeline_on_a_mesh_gives_uint8_images_of_the_default_size(family):
    _, model, params, _ = family
    images = generate(model, params, PROMPTS, rng=jax.random.key(0), mesh=make_mesh(1), **PIPELINE)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8  # sample_size 8 x VAE factor 2
    assert images.std() > 1  # not a constant image
    # An image depends on its own prompt and row of the key, not on the other prompts.
    other = generate(model, params, [PROMPTS[0], "a cat"], rng=jax.random.key(0), mesh=make_mesh(1), **PIPELINE)
    np.testing.assert_array_equal(other[0], images[0])
    assert not np.array_equal(other[1], images[1])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_gives_finite_images(loaded, sampler):
    model, params = loaded["sd1_tiny"]
    images, info = pipeline_floats(model, params, PROMPTS, sampler, jax.random.key(1))
    assert images.shape == (2, 16, 16, 3) and images.dtype == jnp.float32
    assert np.isfinite(images).all() and images.std() > 1e-3
    assert int(info["nfe"]) >= PIPELINE["steps"] or sampler == "ode"


def test_long_prompt_is_truncated_with_a_warning(loaded):
    model, params = loaded["sd1_tiny"]
    long_prompt = " ".join(["a cat on a mat"] * 30)  # 120 words
    with pytest.warns(UserWarning, match=r"texts\[0\] has \d+ tokens, more than max_length - 2 = 75"):
        images = generate(model, params, [long_prompt, PROMPTS[1]], rng=jax.random.key(0), **PIPELINE)
    assert images.shape == (2, 16, 16, 3)
    ids = model.tokenize([long_prompt])
    assert ids.shape == (1, 77) and ids[0, -1] == model.tokenizer.end_id


def test_prompts_that_are_not_unicode_text_are_one_clear_error(loaded):
    model, params = loaded["sd1_tiny"]
    with pytest.raises(ArgumentError) as error:
        generate(model, params, [b"\xffbytes", "fine"], rng=jax.random.key(0), **PIPELINE)
    assert error.value.argument == "prompts[0]"
    with pytest.raises(ArgumentError) as error:
        generate(model, params, PROMPTS, negative_prompts=["ok", "lone \ud800 surrogate"], rng=jax.random.key(0))
    assert error.value.argument == "negative_prompts[1]"


@pytest.mark.parametrize(
    "settings, argument",
    [
        (dict(height=18), "height"),
        (dict(width=0), "width"),
        (dict(sampler="ancestral", eta=0.5), "eta"),
        (dict(sampler="euler"), "sampler"),
        (dict(z_1=np.zeros((2, 8, 8, 4))), "z_1"),
        (dict(guidance_scale="high"), "guidance_scale"),
        (dict(guidance_interval=(2.0, -2.0)), "guidance_interval"),
        (dict(guidance_interval=(0.0,)), "guidance_interval"),
        (dict(steps=0), "steps"),
        (dict(negative_prompts=["a", "b", "c"]), "negative_prompts"),
    ],
)
def test_pipeline_arguments_are_checked_first(loaded, settings, argument):
    model, params = loaded["sd1_tiny"]
    with pytest.raises(ArgumentError) as error:
        generate(model, params, PROMPTS, rng=jax.random.key(0), **settings)
    assert error.value.argument == argument


# Loading and saving.


def test_a_tokenizer_with_ids_beyond_the_text_encoder_is_refused():
    """The fixtures have no tokenizer/: CLIP's shipped ids (up to 49407) do not fit a vocab of 1000."""
    with pytest.raises(ArgumentError, match=r"vocab_size=1000, but the shipped CLIP vocabulary has ids up to 49407"):
        LatentDiffusion.load(FIXTURES / "sd1_tiny")


def test_pad_token_ids(loaded, tmp_path):
    """From the tokenizer folder: SD-1's end token (the tiny vocabulary's last id), SD-2's "!" (0);
    without one, the family's: 49407 for OpenAI CLIP (quick_gelu), 0 for OpenCLIP (gelu)."""
    assert loaded["sd1_tiny"][0].pad_token_id == loaded["sd1_tiny"][0].tokenizer.end_id == 513 + TINY_MERGES
    assert loaded["sd2_tiny"][0].pad_token_id == 0
    for hidden_act, pad_token_id in (("quick_gelu", END_OF_TEXT_ID), ("gelu", 0)):
        _, found = load_tokenizer(tmp_path, CLIPTextModel(vocab_size=49408, hidden_act=hidden_act))
        assert found == pad_token_id


def test_save_and_load_give_the_same_model(loaded, tmp_path):
    model, params = loaded["sd2_tiny"]
    model.save(tmp_path / "saved", params)
    again, params_again = LatentDiffusion.load(tmp_path / "saved")
    assert again == model and again.pad_token_id == model.pad_token_id
    np.testing.assert_array_equal(again.tokenize(PROMPTS), model.tokenize(PROMPTS))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_again), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    with pytest.raises(ArgumentError, match="never overwritten"):
        model.save(tmp_path / "saved", params)


def test_latents_are_the_scaled_vae_latents(family):
    _, model, params, ref = family
    latents = jax.jit(model.encode_images)(params["vae"], ref["vae_image"])
    assert relative_error(latents, model.vae.scaling_factor * ref["vae_mean"]) < RTOL
    images = jax.jit(model.decode_latents)(params["vae"], model.vae.scaling_factor * ref["vae_latent"])
    assert relative_error(images, ref["vae_decoded"]) < RTOL


# python -m ddm_jax.main --mode=generate


@pytest.mark.parametrize(
    "field, value, prompts, argument",
    [
        ("checkpoint", None, PROMPTS, "checkpoint"),
        ("steps", 0, PROMPTS, "steps"),
        ("sampler", "euler", PROMPTS, "sampler"),
        ("grid", "cosine", PROMPTS, "grid"),
        ("eta", 1.5, PROMPTS, "eta"),
        ("guidance_interval", (1.0, float("nan")), PROMPTS, "guidance_interval"),
        ("dtype", "float64", PROMPTS, "dtype"),
        ("output", "../elsewhere", PROMPTS, "output"),
        ("num_images", 0, PROMPTS, "num_images"),
        ("steps", 3, None, "--prompt"),
        ("steps", 3, ["fine", "lone \ud800"], "--prompt[1]"),
    ],
)
def test_generate_config_errors_name_the_field(checkpoints, field, value, prompts, argument):
    config = sd_generate.get_config()
    config.checkpoint = str(checkpoints["sd1_tiny"])
    config[field] = value
    with pytest.raises(ArgumentError) as error:
        check_generation_config(config, prompts)
    assert error.value.argument == argument


def test_generate_config_repeats_each_prompt_num_images_times(checkpoints):
    config = sd_generate.get_config()
    config.checkpoint, config.num_images = str(checkpoints["sd1_tiny"]), 2
    assert check_generation_config(config, PROMPTS) == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2


def run_main(*flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ddm_jax.main", "--mode=generate", "--config=configs/sd_generate.py", *flags]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_generate_mode_writes_the_images_of_the_pipeline(loaded, checkpoints, tmp_path):
    flags = [f"--config.steps={PIPELINE['steps']}", f"--config.guidance_scale={PIPELINE['guidance_scale']}"]
    result = run_main(
        f"--workdir={tmp_path}",
        f"--config.checkpoint={checkpoints['sd1_tiny']}",
        *flags,
        *map("--prompt={}".format, PROMPTS),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    paths = result.stdout.split()
    assert paths == [str(tmp_path / "images" / f"000{k}.png") for k in range(2)]
    model, params = loaded["sd1_tiny"]
    expected = generate(model, params, PROMPTS, rng=jax.random.key(0), **PIPELINE)
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(path)) for path in paths]), expected)


def test_generate_mode_reports_the_tokenizer_mismatch_in_one_line(tmp_path):
    result = run_main(f"--workdir={tmp_path}", f"--config.checkpoint={FIXTURES / 'sd1_tiny'}", "--prompt=a cat")
    assert result.returncode != 0
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"ddm_jax: checkpoint='{FIXTURES / 'sd1_tiny'}': expected a tokenizer whose ids fit")
    )
    assert not (tmp_path / "images").exists()


EIGHT_DEVICES = r"""
import sys, jax, numpy as np
from ddm_jax.evaluation.generate import generate
from ddm_jax.models.latent_diffusion import LatentDiffusion
from ddm_jax.training.sharding import make_mesh

assert jax.device_count() == 8, jax.devices()
model, params = LatentDiffusion.load(sys.argv[1])
prompts = [f"prompt {k}" for k in range(8)]
images = [generate(model, params, prompts, rng=jax.random.key(0), mesh=make_mesh(n), sampler="ddim", steps=2)
          for n in (8, 1)]
assert images[0].shape == (8, 16, 16, 3)
np.testing.assert_array_equal(images[0], images[1])
print("same images on 8 devices and on 1")
"""


def test_eight_devices_give_the_images_of_one(checkpoints):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, str(checkpoints["sd1_tiny"])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "same images on 8 devices and on 1" in result.stdout


def test_clean_latent_change_is_the_rms_of_the_two_x0_predictions(family):
    """`clean_latent_change` against the clean latents computed by hand from each prompt's own call
    (eps for SD-1, v for SD-2: x0 = (z - sigma eps) / alpha = alpha z - sigma v), and 0 for a word
    that does not change."""
    _, model, params, _ = family
    prompts, others = ["a red star", "a blue ring"], ["a red ring", "a green ring"]
    latents = jax.random.normal(jax.random.PRNGKey(0), (2, *model.latent_shape()))
    rng = jax.random.PRNGKey(1)
    found = clean_latent_change(model, params, latents, prompts, others, (700, 50), rng)
    eps = jax.random.normal(rng, latents.shape)
    for n, change in found.items():
        gamma = model.gamma_fn(jnp.full((2,), n / 999))
        alpha, sigma = (a[:, None, None, None] for a in alpha_sigma(gamma))
        z = alpha * latents + sigma * eps
        x0 = []
        for texts in (prompts, others):
            context = encode_prompts(model, params["text_encoder"], model.tokenize(texts))
            prediction = predict(model, params["unet"], z, gamma, context)
            by_eps = (z - sigma * prediction) / alpha
            x0.append(by_eps if model.parameterization == "eps" else alpha * z - sigma * prediction)
        np.testing.assert_allclose(change, np.sqrt(np.mean(np.square(x0[0] - x0[1]))), rtol=1e-4)
        assert change > 0
    same = clean_latent_change(model, params, latents, prompts, prompts, (700,), rng)
    assert same[700] < 1e-6
