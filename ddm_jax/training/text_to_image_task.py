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

The train state holds only the rows of the text encoder's token table that the training captions
and the empty prompt use (`trained_token_ids`; 49 of CLIP's 49408 for shapes), and the training
captions as indices into those rows. The other rows never get a gradient, so AdamW at weight decay
0, clipping and the EMA would leave them at their initial values: training the used rows alone
gives the same model without a pass over the whole table each step (with weight decay the unused
rows would also shrink toward 0; here they keep their initial values). `model_params` puts the
rows back into the table of the run's initialisation (or of the pretrained text encoder):
evaluation, samples and export take the model's parameters from it. The checkpoints' fingerprint
holds `trained_token_ids`, so a run is resumed only on captions with the same tokens.
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
from ddm_jax.models.clip_text import token_embedding, with_token_embedding
from ddm_jax.models.latent_diffusion import LatentDiffusion
from ddm_jax.training.sharding import batch_sharded, replicate
from ddm_jax.training.train_state import stream_key

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
        self.null_tokens = np.asarray(model.tokenize([""]))
        # The token-table rows the train state holds (module docstring), sorted.
        self.trained_token_ids = np.union1d(self.captioned_split("train")["tokens"], self.null_tokens)
        self.encode = jax.jit(lambda vae_params, x: model.vae.apply({"params": vae_params}, x, method="encode"))
        self.eval_loss = jax.jit(self.per_example_loss)

    # The model's parameters ------------------------------------------------------------------------

    def model_init(self, rng, text_encoder_params=None):
        """The model's {"text_encoder", "unet"} at their modules' initialisation, the text encoder at
        `text_encoder_params` when given (the VAE is not trained here)."""
        keys = dict(zip(("text_encoder", "unet"), jax.random.split(rng), strict=True))
        params = {
            name: getattr(self.model, name).init(keys[name], *getattr(self.model, name).example_inputs())["params"]
            for name in keys
        }
        if text_encoder_params is not None:
            params["text_encoder"] = text_encoder_params
        return params

    @property
    def init_arguments(self) -> tuple:
        """What `init` takes after the rng: the pretrained text encoder's parameters, when given (an
        argument of the compiled init, not a constant captured in it)."""
        return () if self.text_encoder_params is None else (self.text_encoder_params,)

    def init(self, rng, text_encoder_params=None):
        """The train state's parameters: `model_init`'s, the token table cut to `trained_token_ids`;
        the text encoder at `text_encoder_params`, by default the task's (`init_arguments`)."""
        if text_encoder_params is None:
            text_encoder_params = self.text_encoder_params
        params = self.model_init(rng, text_encoder_params)
        text = params["text_encoder"]
        return {**params, "text_encoder": with_token_embedding(text, token_embedding(text)[self.trained_token_ids])}

    @property
    def fingerprint_data(self) -> dict:
        """What the checkpoints' fingerprint records of this task: the token rows the state holds."""
        return {"trained_token_ids": self.trained_token_ids.tolist()}

    def token_rows(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids as indices into the trained rows (ids among `trained_token_ids`)."""
        return np.searchsorted(self.trained_token_ids, tokens).astype(np.int32)

    @functools.cached_property
    def initial_token_embedding(self) -> np.ndarray:
        """The token table [vocab_size, hidden_size] that the rows no training caption uses keep: the
        pretrained text encoder's, or `model_init`'s at the run's initial key."""
        if self.text_encoder_params is not None:
            return np.asarray(token_embedding(self.text_encoder_params))
        table = jax.jit(lambda rng: token_embedding(self.model_init(rng)["text_encoder"]))
        return np.asarray(table(stream_key(self.rng, "params")))

    def whole_token_embedding(self, text_encoder_params) -> np.ndarray:
        """The whole token table (host): `initial_token_embedding` with the trained rows in place."""
        table = self.initial_token_embedding.copy()
        table[self.trained_token_ids] = np.asarray(jax.device_get(token_embedding(text_encoder_params)))
        return table

    def model_params(self, params):
        """The model's parameters of the train state's `params` (`init`), the token table replicated
        on the mesh."""
        text = params["text_encoder"]
        table = replicate(self.whole_token_embedding(text), self.mesh)
        return {**params, "text_encoder": with_token_embedding(text, table)}

    def captioned_split(self, split: str) -> dict:
        """A split's images and captions, and the captions' token ids [n, L] ("tokens")."""
        arrays = load_split(self.spec, split, self.config.data.data_dir, text_features=(CAPTION,))
        return {**arrays, "tokens": np.asarray(self.model.tokenize(list(arrays[CAPTION])))}

    def encoded_split(self, split: str) -> dict:
        """A split encoded once for training or evaluation: posterior means and log-variances of its
        images under the frozen VAE, and the token ids of its captions."""
        arrays = self.captioned_split(split)
        batch = self.config.eval.batch_size
        moments = [
            self.encode(self.vae_params, jnp.asarray(arrays["image"][i : i + batch], jnp.float32) / 127.5 - 1.0)
            for i in range(0, len(arrays["image"]), batch)
        ]
        return {
            "latent_mean": np.concatenate([np.asarray(mean) for mean, _ in moments]),
            "latent_logvar": np.concatenate([np.asarray(logvar) for _, logvar in moments]),
            "tokens": arrays["tokens"],
            "caption": arrays[CAPTION],
        }

    @functools.cached_property
    def train_split(self) -> dict:
        """The training split, encoded (`encoded_split`)."""
        return self.encoded_split("train")

    def train_batches(self, start_step: int):
        """Batches of the encoded training split, its tokens as `token_rows`."""
        arrays = {key: self.train_split[key] for key in ("latent_mean", "latent_logvar")}
        training = self.config.training
        return batches_of_arrays(
            {**arrays, "tokens": self.token_rows(self.train_split["tokens"])},
            batch_size=training.batch_size,
            seed=training.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    # The loss ----------------------------------------------------------------------------------------

    def per_example_loss(self, params, rng, batch, axis_name=None, *, prompt_dropout: float = 0.0, null_tokens=None):
        """The diffusion loss of `model.weighting` per latent dimension of each example [b] (module
        docstring); example b draws its latent, its prompt's dropout (probability `prompt_dropout`)
        and (t, eps) from (rng, its row of the global batch). batch["tokens"] index the rows of the
        token table of `params` (ids for the model's parameters, `token_rows` for the train
        state's); `null_tokens` [1, L], the empty prompt's in the same indexing (default: its ids),
        replace a dropped prompt."""
        mean, logvar = batch["latent_mean"], batch["latent_logvar"]
        rows, batch_size = shard_rows(mean.shape[0], axis_name)
        rng_latent, rng_dropout, rng_diffusion = jax.random.split(rng, 3)
        latents = self.model.vae.scaling_factor * (
            mean + jnp.exp(0.5 * logvar) * per_example_normal(rng_latent, mean.shape, rows)
        )
        tokens = batch["tokens"]
        if prompt_dropout:
            dropped = per_example_uniform(rng_dropout, mean.shape[0], rows) < prompt_dropout
            tokens = jnp.where(dropped[:, None], self.null_tokens if null_tokens is None else null_tokens, tokens)
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
            losses = self.per_example_loss(
                params,
                rng,
                batch,
                axis_name,
                prompt_dropout=self.prompt_dropout,
                null_tokens=self.token_rows(self.null_tokens),
            )
            return jnp.mean(losses)

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
        key = stream_key(self.rng, "eval")
        losses = np.asarray(jax.device_get(self.eval_loss(self.model_params(params), key, held_out)))
        return {
            "loss": float(losses.mean()),
            "loss_stderr": float(losses.std(ddof=1) / np.sqrt(len(losses))),
            "num_examples": len(losses),
        }

    def generate(self, params, prompts, rng, *, guidance_scale: float, sampler: str, steps: int) -> np.ndarray:
        """uint8 images [len(prompts), H, W, 3] of the prompts (`evaluation.generate.sample_images`);
        params: the model's (`model_params`), not the train state's."""
        full = {**params, "vae": self.vae_params}
        sharding = batch_sharded(self.mesh)
        tokens = jax.device_put(self.model.tokenize(list(prompts)), sharding)
        null_tokens = jax.device_put(np.repeat(self.null_tokens, len(prompts), axis=0), sharding)
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
            self.model_params(params),
            prompts,
            stream_key(self.rng, "training_samples"),
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
        text = full["text_encoder"]  # with the whole table put together on this host alone
        full["text_encoder"] = with_token_embedding(text, self.whole_token_embedding(text))
        return {"diffusers": str(self.model.save(directory, full))}
