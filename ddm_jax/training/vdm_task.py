"""The VDM as a training task: integer images, the ELBO in bits/dim, bits/dim evaluation, sample grids.

A task is what `Experiment` needs of a model to train, evaluate and sample it on one device mesh:
  init(rng, *init_arguments) -> the train state's params (the model's, or a part of them:
  text_to_image_task);
  loss_fn(params, rng, batch, axis_name) -> ((loss, metrics), grads)
  (training/steps.py);  train_batches(start_step) -> this process's batches;
  evaluate(params) -> {name: value};  samples(params, name) -> {"grid", "png", ...};
  export(params, directory) -> {name: path};  spec, the dataset's DatasetSpec; and optionally
  learning_rate_scales, {part: multiple} of the learning rate for parameters that are a dict of parts
  (0: frozen; `optimizer.make_optimizer`), and fingerprint_data, {name: JSON value} that the
  train state depends on beyond the data's spec (kept in the checkpoints' fingerprint), and
  init_arguments, a tuple of arrays `init` takes after the rng (e.g. pretrained parameters, passed to
  the compiled init as arguments rather than captured in it as constants).
Tasks are built by the builder layer (`builders.build_task`) and belong to it: they read their
config's sections.
"""

import math
import os

import jax
import ml_collections

from ddm_jax.data import DatasetSpec, eval_batches, identity_cond, train_batches
from ddm_jax.evaluation.evaluators import BitsPerDim, Samples
from ddm_jax.models import NETWORKS
from ddm_jax.models.vdm import VDM
from ddm_jax.training.sharding import replicated, shard_batch
from ddm_jax.training.steps import vdm_loss_fn
from ddm_jax.training.train_state import stream_key

BETA_SCHEDULES = ("ddpm_linear", "scaled_linear")


def model_architecture(model: ml_collections.ConfigDict) -> dict:
    """config.model as a checkpoint's fingerprint holds it: what fixes the parameters' meaning.

    Left out: the networks' compute dtype (the parameters stay float32), and T, weighting and
    antithetic time sampling, which change the loss but not the model, so a checkpoint can be
    evaluated with another T (a continuous-time model in discrete time, or the reverse) or resumed
    with another loss. The beta schedules' T, which fixes their betas, stays.
    """
    config = model.to_dict()
    for network in NETWORKS:
        config.get(network, {}).pop("dtype", None)
    for field in ("weighting", "antithetic_time_sampling") + (() if model.schedule in BETA_SCHEDULES else ("T",)):
        config.pop(field, None)
    return config


class VDMTask:
    """A VDM on the integer images of `spec` (config sections data, model, training, eval)."""

    def __init__(self, config: ml_collections.ConfigDict, spec: DatasetSpec, model: VDM, mesh, rng, workdir: str):
        self.config, self.spec, self.model, self.mesh, self.rng, self.workdir = config, spec, model, mesh, rng, workdir
        self.loss_fn = vdm_loss_fn(model)
        self.elbo_terms = jax.jit(model.elbo_terms)
        self.sample = jax.jit(
            model.sample,
            static_argnums=(2, 3),
            static_argnames=("steps", "sampler", "eta", "grid"),
            out_shardings=replicated(mesh),
        )
        self.bits_per_dim = BitsPerDim(
            lambda params, rng, batch: self.elbo_terms(params, rng, batch["image"], cond=batch["cond"]),
            self.eval_batches,
            stream_key(rng, "eval"),
            num_dims=math.prod(spec.image_shape),
            num_time_samples=config.eval.num_time_samples,
        )
        self.training_samples = self.sampler(
            stream_key(rng, "training_samples"), config.training.num_samples, steps=config.training.sample_steps
        )

    def init(self, rng):
        return self.model.init(rng, self.spec.image_shape)

    def cond(self, batch_size: int):
        """The conditioning of un-augmented data: the identity's one-hot, or None without augmentation."""
        return identity_cond(batch_size, self.config.data.augment)

    def train_batches(self, start_step: int):
        data, training = self.config.data, self.config.training
        return train_batches(
            self.spec,
            batch_size=training.batch_size,
            seed=training.seed,
            data_dir=data.data_dir,
            download=data.download,
            start_step=start_step,
            augment=data.augment,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def eval_batches(self):
        """The eval split's batches, sharded over the mesh, with their padding masks."""
        data = self.config.data
        batches = eval_batches(
            self.spec,
            split=data.eval_split,
            batch_size=self.config.eval.batch_size,
            data_dir=data.data_dir,
            download=data.download,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        for batch in batches:
            sharded = shard_batch({"image": batch["image"], "cond": self.cond(len(batch["image"]))}, self.mesh)
            yield {**sharded, "mask": batch["mask"]}

    def evaluate(self, params) -> dict:
        return self.bits_per_dim.run(params)

    def sampler(self, rng, num_samples: int, **sampler_settings) -> Samples:
        """An evaluator drawing `num_samples` with the sampler settings (sampler, steps, eta, grid)."""
        sample_fn = lambda params, rng: self.sample(
            params, rng, num_samples, self.spec.image_shape, cond=self.cond(num_samples), **sampler_settings
        )
        directory = os.path.join(self.workdir, "samples")
        return Samples(
            sample_fn, rng, vocab_size=self.spec.vocab_size, directory=directory, write_files=jax.process_index() == 0
        )

    def samples(self, params, name: str) -> dict:
        return self.training_samples.run(params, name)

    def export(self, params, directory: str) -> dict:
        del params, directory  # a VDM lives in its checkpoints
        return {}
