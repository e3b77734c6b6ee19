"""Stable Diffusion's AutoencoderKL as a training task: the beta-weighted ELBO on 8-bit images.

Images k in {0..255} are mapped to x = k / 127.5 - 1 in [-1, 1] (the VAE's convention). The loss
is `models.autoencoder_kl.vae_terms`'s reconstruction + beta KL, in nats per dimension.
Evaluation reports, over the eval split: the PSNR of the reconstructions from the posterior mean
(rounded to 8 bits, 10 log10(255^2 / MSE)), and the reconstruction, KL and negative-ELBO terms in
nats per image. `export` writes the VAE as a diffusers folder with its `scaling_factor` set, as
Rombach et al. (2022) set SD's, to 1 / the standard deviation of the training latents' means
(the task interface is described in training/vdm_task.py).
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ddm_jax.data import DatasetSpec, eval_batches, load_split, train_batches
from ddm_jax.diffusion import shard_rows
from ddm_jax.evaluation.bpd import MaskedMoments
from ddm_jax.evaluation.images import image_grid, save_png, upscale_nearest
from ddm_jax.models import save_diffusers
from ddm_jax.models.autoencoder_kl import AutoencoderKL, vae_terms
from ddm_jax.training.sharding import shard_batch
from ddm_jax.training.steps import batch_mean
from ddm_jax.training.train_state import stream_key


def to_unit_interval(images: jax.Array) -> jax.Array:
    """8-bit images to [-1, 1]: k / 127.5 - 1."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] back to 8 bits, rounded and clipped."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """10 log10(255^2 / MSE) per image [N] (8-bit images; an exact reconstruction gives inf)."""
    squared_error = np.square(images.astype(np.float64) - reconstructions.astype(np.float64))
    mse = squared_error.reshape(len(images), -1).mean(-1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0**2 / mse)


def decoder_likelihood(model: ml_collections.ConfigDict) -> str:
    """`model.decoder_likelihood`; "gaussian" for the configs saved before the field existed."""
    return model.get("decoder_likelihood", "gaussian")


class AutoencoderTask:
    """An AutoencoderKL on the 8-bit RGB images of `spec` (config sections data, model, training, eval)."""

    def __init__(
        self, config: ml_collections.ConfigDict, spec: DatasetSpec, vae: AutoencoderKL, mesh, rng, workdir: str
    ):
        self.config, self.spec, self.vae, self.mesh, self.rng, self.workdir = config, spec, vae, mesh, rng, workdir
        self.terms = functools.partial(
            vae_terms,
            vae,
            decoder_std=config.model.decoder_std,
            beta=config.model.beta,
            decoder_likelihood=decoder_likelihood(config.model),
        )
        self.encode = jax.jit(lambda params, x: vae.apply({"params": params}, x, method="encode"))
        self.reconstruct = jax.jit(self.reconstruction)
        self.eval_terms = jax.jit(lambda params, rng, x: self.terms(params, rng, x))

    def init(self, rng):
        return self.vae.init(rng, *self.vae.example_inputs())["params"]

    def loss_fn(self, params, rng, batch, axis_name=None):
        """Mean loss in nats per dimension, and the terms in nats per image."""
        x = to_unit_interval(batch["image"])
        rows, _ = shard_rows(x.shape[0], axis_name)
        num_dims = math.prod(x.shape[1:])

        def mean_loss(params):
            terms = self.terms(params, rng, x, rows=rows)
            return jnp.mean(terms["loss"]) / num_dims, terms

        (_, terms), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
        mean = functools.partial(batch_mean, axis_name=axis_name)
        metrics = {
            "loss": mean(terms["loss"]) / num_dims,
            "reconstruction_nats": mean(terms["reconstruction"]),
            "kl_nats": mean(terms["kl"]),
            "elbo_nats": mean(terms["elbo"]),
        }
        return (metrics["loss"], metrics), grads

    def reconstruction(self, params, images):
        """8-bit images decoded from their posterior means."""
        mean, _ = self.vae.apply({"params": params}, to_unit_interval(images), method="encode")
        return to_uint8(self.vae.apply({"params": params}, mean, method="decode"))

    def train_batches(self, start_step: int):
        data, training = self.config.data, self.config.training
        return train_batches(
            self.spec,
            batch_size=training.batch_size,
            seed=training.seed,
            data_dir=data.data_dir,
            download=data.download,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def evaluate(self, params) -> dict:
        """PSNR and the terms over the eval split (one draw of the latent noise per image); with several
        processes, each reads its rows and every process gets the statistics of all examples."""
        data = self.config.data
        batches = eval_batches(
            self.spec,
            split=data.eval_split,
            batch_size=self.config.eval.batch_size,
            data_dir=data.data_dir,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        moments = {name: MaskedMoments() for name in ("psnr", "reconstruction", "kl", "elbo")}
        rng = stream_key(self.rng, "eval")
        for index, batch in enumerate(batches):
            images = shard_batch({"image": batch["image"]}, self.mesh)["image"]
            terms = self.eval_terms(params, jax.random.fold_in(rng, index), to_unit_interval(images))
            terms, images, reconstructions, mask = multihost_utils.process_allgather(
                (terms, images, self.reconstruct(params, images), batch["mask"]), tiled=True
            )
            mask = np.asarray(mask, bool)
            moments["psnr"].add(np.minimum(psnr(images, reconstructions), 99.0), mask)
            for name in ("reconstruction", "kl", "elbo"):
                moments[name].add(np.asarray(terms[name]), mask)
        return {
            "psnr": moments["psnr"].mean,
            "psnr_stderr": moments["psnr"].standard_error,
            **{f"{name}_nats": moments[name].mean for name in ("reconstruction", "kl", "elbo")},
            "num_examples": int(moments["psnr"].count),
        }

    def samples(self, params, name: str) -> dict:
        """A grid of eval images (odd rows) over their reconstructions (even rows), PNG."""
        count = self.config.training.num_samples
        images = load_split(self.spec, self.config.data.eval_split, self.config.data.data_dir)["image"][:count]
        reconstructions = np.asarray(jax.device_get(self.reconstruct(params, images)))
        columns = math.ceil(math.sqrt(count))
        rows = [
            block
            for start in range(0, count, columns)
            for block in (images[start : start + columns], reconstructions[start : start + columns])
        ]
        grid = upscale_nearest(image_grid(np.concatenate(rows), ncols=columns))
        path = os.path.join(self.workdir, "samples", f"{name}.png")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_png(path, grid)
        return {"grid": grid, "png": path}

    def latent_std(self, params) -> float:
        """The standard deviation of the posterior means over the training split."""
        images = load_split(self.spec, "train", self.config.data.data_dir)["image"]
        batch = self.config.eval.batch_size
        means = [
            np.asarray(self.encode(params, to_unit_interval(images[i : i + batch]))[0])
            for i in range(0, len(images), batch)
        ]
        return float(np.concatenate(means).std())

    def export(self, params, directory: str) -> dict:
        """The VAE as `directory`/vae (diffusers format), scaling_factor = 1 / latent std."""
        scaling_factor = 1.0 / self.latent_std(params)
        vae = self.vae.clone(scaling_factor=scaling_factor)
        path = save_diffusers(directory, "vae", vae, params, overwrite=True) if jax.process_index() == 0 else None
        return {"vae": str(path), "scaling_factor": scaling_factor}
