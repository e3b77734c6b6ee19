"""A latent text-to-image model (Stable Diffusion's layout) as a training task.

The VAE is trained first (`autoencoder_task`) and frozen: the task encodes the training split once
(posterior means and log-variances) and tokenizes its captions once; every step draws each
example's latent from its posterior, drops its prompt to the empty one with probability
`prompt_dropout` (classifier-free guidance, Ho & Salimans 2022), and takes the diffusion loss of
`ddm_jax.diffusion` on the scaled latent with the model's discrete schedule: L_simple at the
timesteps n = 1..N-1 (T = N - 1) with the weighting `model.weighting`: "simple", as Stable
Diffusion 1 was trained, "v_mse" (SD 2's loss with prediction_type "v_prediction"), or "min_snr"
(Hang et al. 2023; `diffusion.WEIGHTINGS`). The text
encoder starts from its random initialisation or from a pretrained one (`text_encoder_folder`),
and is trained jointly, at `text_encoder_lr_scale` times the UNet's learning rate, or kept frozen
(`train_text_encoder`); frozen parameters stay in the state but the optimizer leaves them alone.
Evaluation reports the loss on held-out examples; samples are guided generations of held-out
prompts; `export` writes the whole model as a diffusers folder (the task interface is described in
training/vdm_task.py).
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddm_jax.data import DatasetSpec, batches_of_arrays, load_split
from ddm_jax.diffusion import diffusion_loss, per_example_normal, per_example_uniform, shard_rows
from ddm_jax.evaluation.generate import images_to_uint8, sample_images
from ddm_jax.evaluation.images import image_grid, save_png, upscale_nearest
from ddm_jax.models.latent_diffusion import LatentDiffusion
from ddm_jax.training.sharding import batch_sharded, replicate

CAPTION = "caption"


def text_encoder_lr_scale(model: ml_collections.ConfigDict) -> float:
    """`model.text_encoder_lr_scale`; 1 for the configs saved before the field existed."""
    return model.get("text_encoder_lr_scale", 1.0)


def learning_rate_scales(model: ml_collections.ConfigDict) -> dict:
    """Each part's learning rate as a multiple of the optimizer's: the UNet's 1, the text encoder's
    `text_encoder_lr_scale` when `train_text_encoder`, else 0 (frozen)."""
    return {"text_encoder": text_encoder_lr_scale(model) if model.train_text_encoder else 0.0, "unet": 1.0}


class TextToImageTask:
    """A LatentDiffusion model whose VAE (`vae_params`) is frozen, trained on the captioned images of
    `spec` (config sections data, model, training, eval); the text encoder starts from
    `text_encoder_params` when given (a pretrained one), else from its random initialisation."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        spec: DatasetSpec,
        model: LatentDiffusion,
        vae_params,
        mesh,
        rng,
        workdir: str,
        text_encoder_params=None,
    ):
        self.config, self.spec, self.model, self.mesh, self.rng, self.workdir = config, spec, model, mesh, rng, workdir
        self.vae_params = replicate(vae_params, mesh)
        self.text_encoder_params = text_encoder_params
        self.prompt_dropout = config.model.prompt_dropout
        self.learning_rate_scales = learning_rate_scales(config.model)
        self.null_tokens = jnp.asarray(model.tokenize([""]))
        self.encode = jax.jit(lambda vae_params, x: model.vae.apply({"params": vae_params}, x, method="encode"))
        self.eval_loss = jax.jit(functools.partial(self.per_example_loss, prompt_dropout=0.0))
        self._train_arrays = None

    # The model's parameters ------------------------------------------------------------------------

    def init(self, rng):
        """{"text_encoder", "unet"} at their modules' initialisation, the text encoder at
        `text_encoder_params` when given (the VAE is not trained here)."""
        keys = dict(zip(("text_encoder", "unet"), jax.random.split(rng), strict=True))
        params = {
            name: getattr(self.model, name).init(keys[name], *getattr(self.model, name).example_inputs())["params"]
            for name in keys
        }
        if self.text_encoder_params is not None:
            params["text_encoder"] = self.text_encoder_params
        return params

    def encoded_split(self, split: str) -> dict:
        """A split as the training step takes it: posterior means and log-variances of its images
        under the frozen VAE, and the token ids of its captions."""
        arrays = load_split(self.spec, split, self.config.data.data_dir, text_features=(CAPTION,))
        batch = self.config.eval.batch_size
        moments = [
            self.encode(self.vae_params, jnp.asarray(arrays["image"][i : i + batch], jnp.float32) / 127.5 - 1.0)
            for i in range(0, len(arrays["image"]), batch)
        ]
        return {
            "latent_mean": np.concatenate([np.asarray(mean) for mean, _ in moments]),
            "latent_logvar": np.concatenate([np.asarray(logvar) for _, logvar in moments]),
            "tokens": np.asarray(self.model.tokenize(list(arrays[CAPTION]))),
            "caption": arrays[CAPTION],
        }

    def train_batches(self, start_step: int):
        if self._train_arrays is None:
            encoded = self.encoded_split("train")
            self._train_arrays = {key: encoded[key] for key in ("latent_mean", "latent_logvar", "tokens")}
        training = self.config.training
        return batches_of_arrays(
            self._train_arrays,
            batch_size=training.batch_size,
            seed=training.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    # The loss ----------------------------------------------------------------------------------------

    def per_example_loss(self, params, rng, batch, axis_name=None, *, prompt_dropout: float):
        """The diffusion loss of `model.weighting` per latent dimension of each example [b] (module
        docstring); example b draws its latent, its prompt's dropout (probability `prompt_dropout`)
        and (t, eps) from (rng, its row of the global batch)."""
        mean, logvar = batch["latent_mean"], batch["latent_logvar"]
        rows, batch_size = shard_rows(mean.shape[0], axis_name)
        rng_latent, rng_dropout, rng_diffusion = jax.random.split(rng, 3)
        latents = self.model.vae.scaling_factor * (
            mean + jnp.exp(0.5 * logvar) * per_example_normal(rng_latent, mean.shape, rows)
        )
        dropped = per_example_uniform(rng_dropout, mean.shape[0], rows) < prompt_dropout
        tokens = jnp.where(dropped[:, None], self.null_tokens, batch["tokens"])
        text_params = params["text_encoder"]
        if not self.learning_rate_scales["text_encoder"]:
            text_params = jax.lax.stop_gradient(text_params)
        context = self.model.encode_prompts(text_params, tokens)
        loss = diffusion_loss(
            rng_diffusion,
            latents,
            self.model.denoise_fn(params["unet"], context),
            self.model.gamma_fn,
            T=self.model.schedule.num_betas - 1,
            parameterization=self.model.parameterization,
            weighting=self.config.model.weighting,
            rows=rows,
            batch_size=batch_size,
        )
        return loss / math.prod(latents.shape[1:])

    def loss_fn(self, params, rng, batch, axis_name=None):
        def mean_loss(params):
            return jnp.mean(self.per_example_loss(params, rng, batch, axis_name, prompt_dropout=self.prompt_dropout))

        loss, grads = jax.value_and_grad(mean_loss)(params)
        metrics = {"loss": loss if axis_name is None else jax.lax.pmean(loss, axis_name)}
        return (metrics["loss"], metrics), grads

    # Evaluation --------------------------------------------------------------------------------------

    @functools.cached_property
    def held_out(self) -> dict:
        """The first eval.num_examples examples of the eval split, encoded."""
        encoded = self.encoded_split(self.config.data.eval_split)
        return {key: value[: self.config.eval.num_examples] for key, value in encoded.items()}

    def evaluate(self, params) -> dict:
        """The loss on the held-out examples (one draw of latent, t and eps each, no prompt dropout)."""
        held_out = {key: self.held_out[key] for key in ("latent_mean", "latent_logvar", "tokens")}
        losses = np.asarray(jax.device_get(self.eval_loss(params, jax.random.fold_in(self.rng, 1), held_out)))
        return {
            "loss": float(losses.mean()),
            "loss_stderr": float(losses.std(ddof=1) / np.sqrt(len(losses))),
            "num_examples": len(losses),
        }

    def generate(self, params, prompts, rng, *, guidance_scale: float, sampler: str, steps: int) -> np.ndarray:
        """uint8 images [len(prompts), H, W, 3] of the prompts (`evaluation.generate.sample_images`)."""
        full = {**params, "vae": self.vae_params}
        sharding = batch_sharded(self.mesh)
        tokens = jax.device_put(self.model.tokenize(list(prompts)), sharding)
        null_tokens = jax.device_put(np.repeat(np.asarray(self.null_tokens), len(prompts), axis=0), sharding)
        images, _ = sample_images(
            full,
            tokens,
            null_tokens,
            rng,
            model=self.model,
            guidance_scale=float(guidance_scale),
            sampler=sampler,
            steps=steps,
            latent_shape=self.model.latent_shape(*self.spec.image_shape[:2]),
            settings=(),
            batch_sharding=sharding,
        )
        return images_to_uint8(np.asarray(jax.device_get(images)))

    def samples(self, params, name: str) -> dict:
        """Guided generations of the first training.num_samples held-out prompts, as a grid PNG."""
        evaluation = self.config.eval
        prompts = list(self.held_out[CAPTION][: self.config.training.num_samples])
        images = self.generate(
            params,
            prompts,
            jax.random.fold_in(self.rng, 2),
            guidance_scale=evaluation.guidance_scale,
            sampler=evaluation.sampler,
            steps=evaluation.sampling_steps,
        )
        grid = upscale_nearest(image_grid(images))
        path = os.path.join(self.workdir, "samples", f"{name}.png")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_png(path, grid)
        return {"grid": grid, "png": path}

    def export(self, params, directory: str) -> dict:
        """The whole model (text encoder, UNet, the frozen VAE, scheduler, tokenizer) as a diffusers
        folder (a new `directory`)."""
        if jax.process_index() > 0:
            return {}
        full = jax.device_get({**params, "vae": self.vae_params})
        return {"diffusers": str(self.model.save(directory, full))}
