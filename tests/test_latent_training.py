"""Training the latent text-to-image base on shapes: the VAE stage, the text-to-image stage, and the
exported folder as an SD checkpoint (loaded, and generating through --mode=generate)."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import shapes_t2i, shapes_vae
from ddm_jax import diffusion
from ddm_jax.checks import ArgumentError
from ddm_jax.data import load_split
from ddm_jax.models import load_diffusers, save_diffusers
from ddm_jax.models.latent_diffusion import LatentDiffusion
from ddm_jax.training import trainer
from ddm_jax.training.experiment import Experiment
from ddm_jax.training.sharding import shard_batch
from ddm_jax.training.train_state import apply_updates, create_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2


def tiny(config, data_dir):
    """A few steps on shapes/32_small with every interval at STEPS."""
    config.data.dataset, config.data.data_dir = "shapes/32_small", data_dir
    config.training.update(
        num_steps=STEPS, log_every=STEPS, eval_every=STEPS, checkpoint_every=STEPS, sample_every=STEPS, batch_size=8
    )
    config.optimizer.update(warmup_steps=1, decay_steps=STEPS)
    return config


def tiny_vae_config(data_dir):
    config = tiny(shapes_vae.get_config(), data_dir)
    config.model.vae.update(block_out_channels=(8, 8, 8), norm_num_groups=4)
    config.training.num_samples = 4
    config.eval.batch_size = 100
    return config


def tiny_t2i_config(data_dir, vae_folder):
    config = tiny(shapes_t2i.get_config(), data_dir)
    config.model.vae_folder = vae_folder
    config.model.text_encoder.update(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
    config.model.unet.update(
        block_out_channels=(16, 16), norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2
    )
    config.training.num_samples = 2
    config.eval.update(batch_size=100, num_examples=16, sampling_steps=2)
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two stages trained STEPS steps each; (data_dir, vae result, t2i result, t2i workdir)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    vae = trainer.train_and_evaluate(tiny_vae_config(data_dir), str(tmp_path_factory.mktemp("vae")))
    workdir = str(tmp_path_factory.mktemp("t2i"))
    t2i = trainer.train_and_evaluate(tiny_t2i_config(data_dir, os.path.dirname(vae["vae"])), workdir)
    return data_dir, vae, t2i, workdir


def test_the_vae_stage_reports_psnr_and_kl_and_exports_with_its_scaling_factor(runs):
    data_dir, vae_result, _, _ = runs
    assert vae_result["num_examples"] == 200 and np.isfinite(vae_result["psnr"]) and vae_result["kl_nats"] >= 0
    vae, params = load_diffusers(vae_result["vae"], "vae")
    images = load_split("shapes/32_small", "train", data_dir)["image"]
    mean, _ = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(params, images / 127.5 - 1.0)
    np.testing.assert_allclose(vae.scaling_factor, 1.0 / np.std(np.asarray(mean)), rtol=1e-4)
    assert vae.scaling_factor == pytest.approx(vae_result["scaling_factor"])


@pytest.fixture(scope="module")
def model_and_params(runs):
    _, _, t2i_result, _ = runs
    return LatentDiffusion.load(t2i_result["diffusers"])


def test_the_exported_base_loads_as_an_sd_checkpoint_and_generates_with_mode_generate(runs, tmp_path):
    _, _, t2i_result, _ = runs
    folder = t2i_result["diffusers"]
    assert {"unet", "vae", "text_encoder", "scheduler", "tokenizer", "model_index.json"} <= set(os.listdir(folder))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as file:
        scheduler = json.load(file)
    assert (scheduler["beta_schedule"], scheduler["prediction_type"]) == ("scaled_linear", "epsilon")
    command = [
        sys.executable, "-m", "ddm_jax.main", "--mode=generate", "--config=configs/sd_generate.py",
        f"--workdir={tmp_path}", f"--config.checkpoint={folder}", "--config.steps=2", "--config.guidance_scale=2.0",
        "--prompt=a large red star on the left, on a white background",
    ]  # fmt: skip
    output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert output.returncode == 0, output.stderr[-3000:]
    assert os.path.isfile(tmp_path / "images" / "0000.png")


def test_the_prediction_depends_on_the_prompt_through_cross_attention(model_and_params):
    model, params = model_and_params
    tokens = model.tokenize(["a large red star on the left", "two shapes: a blue ring and a yellow square"])
    context = model.encode_prompts(params["text_encoder"], tokens)
    z = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 4))
    gamma = model.gamma_fn(jnp.array([0.5]))
    first, second = (model.predict(params["unet"], z, gamma, context[i : i + 1]) for i in range(2))
    assert float(jnp.abs(first - second).max()) > 1e-4 * float(jnp.abs(first).max())


def test_prompt_dropout_trains_on_the_empty_prompt_under_jit(runs, tmp_path):
    data_dir, vae_result, _, _ = runs
    config = tiny_t2i_config(data_dir, os.path.dirname(vae_result["vae"]))
    task = Experiment(config, str(tmp_path)).task
    params = task.model_params(task.init(jax.random.PRNGKey(1)))
    batch = {key: value[:6] for key, value in task.held_out.items() if key != "caption"}
    empty = {**batch, "tokens": np.repeat(task.null_tokens, 6, axis=0)}
    loss = jax.jit(task.per_example_loss, static_argnames=("prompt_dropout",))
    rng = jax.random.PRNGKey(2)
    np.testing.assert_allclose(loss(params, rng, batch, prompt_dropout=1.0), loss(params, rng, empty))
    assert not np.allclose(loss(params, rng, batch), loss(params, rng, empty))


def first_step(config, workdir):
    """The parameters before and after one train step from the run's initial state, and its loss."""
    config.optimizer.warmup_steps = 0  # the first step moves the parameters
    experiment = Experiment(config, workdir)
    state = experiment.initial_state()
    before = jax.device_get(state.params)  # the step donates the state's buffers
    batch = next(experiment.task.train_batches(0))
    batch = shard_batch({key: value[None] for key, value in batch.items()}, experiment.mesh, leading_axes=1)
    state, metrics = experiment.train_steps(state, batch, experiment.rng)
    return before, jax.device_get(state.params), float(metrics["loss"][0])


def test_a_frozen_text_encoder_stays_at_its_initialisation(runs, tmp_path):
    data_dir, vae_result, _, _ = runs
    config = tiny_t2i_config(data_dir, os.path.dirname(vae_result["vae"]))
    config.model.train_text_encoder = False
    before, after, loss = first_step(config, str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, before["text_encoder"], after["text_encoder"])
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before["unet"], after["unet"]))
    assert any(changed) and np.isfinite(loss)


def test_training_the_used_token_rows_is_one_adamw_step_of_the_whole_model(runs, tmp_path):
    """The train state holds the token rows the captions use; its step, put back into the whole table,
    equals a step of the whole model on the captions' own token ids (the unused rows unchanged)."""
    data_dir, vae_result, _, _ = runs
    config = tiny_t2i_config(data_dir, os.path.dirname(vae_result["vae"]))
    config.optimizer.warmup_steps = 0
    config.model.prompt_dropout = 0.5  # some of the 8 prompts dropped, for all but 1 in 256 draws
    experiment = Experiment(config, str(tmp_path))
    task = experiment.task
    vocab_size = config.model.text_encoder.vocab_size
    assert 5 < len(task.trained_token_ids) < vocab_size // 100
    ids = task.train_split["tokens"]
    np.testing.assert_array_equal(task.trained_token_ids[task.token_rows(ids)], ids)
    state = experiment.initial_state()
    whole = jax.device_get(task.model_params(state.params))
    rows = next(task.train_batches(0))
    batch = {**rows, "tokens": task.trained_token_ids[rows["tokens"]]}
    state, metrics = experiment.train_steps(
        state, shard_batch(jax.tree.map(lambda x: x[None], rows), experiment.mesh, 1), experiment.rng
    )

    def loss(params):
        losses = task.per_example_loss(
            params,
            jax.random.fold_in(experiment.rng, 0),
            batch,
            prompt_dropout=task.prompt_dropout,
        )
        return jnp.mean(losses)

    grads = jax.grad(loss)(whole)
    np.testing.assert_allclose(metrics["grad_norm"][0], optax.tree.norm(grads), rtol=1e-5)
    want = apply_updates(
        create_train_state(whole, experiment.optimizer), grads, experiment.optimizer, config.training.ema_decay
    )
    # Where the exact gradient is 0 (the bias of a key projection: softmax ignores a shift shared by
    # all keys), Adam's first step is the sign of float noise; compared everywhere else.
    for got, expected in ((state.params, want.params), (state.ema_params, want.ema_params)):
        jax.tree.map(
            lambda a, b, g: np.testing.assert_allclose(a[np.abs(g) > 1e-6], b[np.abs(g) > 1e-6], rtol=1e-5, atol=1e-7),
            task.model_params(got),
            expected,
            grads,
        )
    table = want.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
    unused = np.setdiff1d(np.arange(vocab_size), task.trained_token_ids)
    np.testing.assert_array_equal(
        table[unused], whole["text_encoder"]["embeddings"]["token_embedding"]["embedding"][unused]
    )
    assert not np.allclose(
        table[task.trained_token_ids],
        whole["text_encoder"]["embeddings"]["token_embedding"]["embedding"][task.trained_token_ids],
    )


def test_the_text_encoder_moves_text_encoder_lr_scale_times_as_far_as_at_the_unets_rate(runs, tmp_path):
    """Both runs take the same gradients on their first step, so the text encoder's update at scale
    0.1 is a tenth of its update at 1, and the UNet's is the same (to the float32 rounding of the
    parameters, 3e-7 against updates of about 1e-4)."""
    data_dir, vae_result, _, _ = runs
    steps = {}
    for scale in (1.0, 0.1):
        config = tiny_t2i_config(data_dir, os.path.dirname(vae_result["vae"]))
        config.model.text_encoder_lr_scale = scale
        before, after, _ = first_step(config, str(tmp_path / str(scale)))
        steps[scale] = jax.tree.map(lambda a, b: np.asarray(b, np.float64) - a, before, after)
    tenth = jax.tree.map(lambda full: 0.1 * full, steps[1.0]["text_encoder"])
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, atol=3e-7), steps[0.1]["text_encoder"], tenth)
    jax.tree.map(
        lambda got, want: np.testing.assert_allclose(got, want, atol=3e-7), steps[0.1]["unet"], steps[1.0]["unet"]
    )
    assert max(np.abs(leaf).max() for leaf in jax.tree.leaves(steps[1.0]["text_encoder"])) > 1e-4


def test_min_snr_weighting_scales_each_example_by_min_of_one_and_5_over_snr(runs, tmp_path):
    """Hang et al. 2023 in eps form: the loss of example b is L_simple's times min(1, 5 / SNR(t_b)),
    t_b the example's own draw (recomputed here from the task's keys)."""
    data_dir, vae_result, _, _ = runs
    config = tiny_t2i_config(data_dir, os.path.dirname(vae_result["vae"]))
    task = Experiment(config, str(tmp_path)).task
    params = task.model_params(task.init(jax.random.PRNGKey(1)))
    batch = {key: value[:8] for key, value in task.held_out.items() if key != "caption"}
    rng = jax.random.PRNGKey(3)
    config.model.weighting = "simple"
    simple = task.per_example_loss(params, rng, batch)
    config.model.weighting = "min_snr"
    min_snr = task.per_example_loss(params, rng, batch)
    t, _ = diffusion.diffusion_draws(jax.random.split(rng, 3)[2], batch["latent_mean"].shape, T=999)
    snr = np.exp(-np.asarray(task.model.gamma_fn(t), np.float64))
    np.testing.assert_allclose(min_snr, simple * np.minimum(1.0, 5.0 / snr), rtol=1e-5)
    assert (snr > 5).any() and (snr < 5).any()


@pytest.mark.parametrize(
    "stage, field, value, expected",
    [
        ("t2i", "weighting", "l2", "model.weighting='l2': expected one of ('elbo', 'simple', 'min_snr', 'v_mse')"),
        (
            "t2i",
            "text_encoder_lr_scale",
            0.0,
            "model.text_encoder_lr_scale=0.0: expected a multiple > 0 of optimizer.lr",
        ),
        ("vae", "decoder_likelihood", "l1", "model.decoder_likelihood='l1': expected one of ('gaussian', 'laplace')"),
    ],
)
def test_a_bad_model_field_is_refused_before_anything_is_built(runs, tmp_path, stage, field, value, expected):
    data_dir, vae_result, _, _ = runs
    if stage == "vae":
        config = tiny_vae_config(data_dir)
    else:
        config = tiny_t2i_config(data_dir, os.path.dirname(vae_result["vae"]))
    config.model[field] = value
    with pytest.raises(ValueError, match=re.escape(expected)):
        Experiment(config, str(tmp_path))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "section, field, value, expected",
    [
        ("eval", "sampler", "euler", "eval.sampler='euler': expected one of"),
        ("eval", "guidance_scale", float("nan"), "eval.guidance_scale=nan: expected a finite real number"),
        ("data", "augment", "dihedral", "data.augment='dihedral': expected None: the text_to_image task trains"),
        ("training", "num_samples", 10**6, "training.num_samples=1000000: expected at most eval.num_examples="),
    ],
)
def test_a_bad_field_outside_the_model_is_refused_before_anything_is_built(
    runs, tmp_path, section, field, value, expected
):
    config = tiny_t2i_config(runs[0], os.path.dirname(runs[1]["vae"]))
    config[section][field] = value
    with pytest.raises(ArgumentError, match="^" + re.escape(expected)):
        Experiment(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_a_vae_config_saved_before_decoder_likelihood_existed_trains_a_gaussian_decoder(runs, tmp_path):
    config = tiny_vae_config(runs[0])
    del config.model["decoder_likelihood"]
    assert Experiment(config, str(tmp_path)).task.terms.keywords["decoder_likelihood"] == "gaussian"


def test_the_text_encoder_starts_from_text_encoder_folder_of_its_own_config(runs, tmp_path):
    data_dir, vae_result, _, _ = runs
    config = tiny_t2i_config(data_dir, os.path.dirname(vae_result["vae"]))
    encoder = Experiment(config, str(tmp_path / "random")).task.model.text_encoder
    saved = encoder.init(jax.random.PRNGKey(7), *encoder.example_inputs())["params"]
    save_diffusers(tmp_path / "encoder", "text_encoder", encoder, saved)
    config.model.text_encoder_folder = str(tmp_path / "encoder")
    experiment = Experiment(config, str(tmp_path / "pretrained"))
    assert experiment.init_arguments  # the weights enter the compiled init as its argument
    params = experiment.task.model_params(jax.device_get(experiment.initial_state().params))
    jax.tree.map(np.testing.assert_array_equal, params["text_encoder"], saved)
    config.model.text_encoder.num_hidden_layers = 2
    with pytest.raises(ValueError, match=re.escape("model.text_encoder_folder=") + ".*expected a text encoder as"):
        Experiment(config, str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other")
