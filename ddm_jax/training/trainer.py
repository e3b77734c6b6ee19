"""Training and evaluation of a VDM from a config: the loop, its checks and its outputs.

train_and_evaluate(config, workdir) trains (resuming from the latest checkpoint in workdir),
evaluates test bits/dim every `training.eval_every` steps, writes sample grids, and returns
the final evaluation. evaluate(config, workdir) reports the bits/dim of the latest checkpoint.
Everything that can be checked without compiling is checked first (`check_config`).
"""
import contextlib
import functools
import math
import os
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from ddm_jax.data import (AUGMENT_COND_DIM, DatasetSpec, check_augment, check_eval_split, dataset_spec,
                          eval_batches, identity_cond, train_batches)
from ddm_jax.diffusion import SAMPLERS
from ddm_jax.diffusion.samplers import check_eta
from ddm_jax.evaluation.bpd import evaluate_bpd
from ddm_jax.evaluation.images import image_grid, save_png, to_uint8
from ddm_jax.models import NETWORKS
from ddm_jax.models.vdm import VDM, build_vdm
from ddm_jax.training.checkpoints import CheckpointStore, make_fingerprint
from ddm_jax.training.optimizer import make_optimizer, validate_optimizer_config
from ddm_jax.training.sharding import make_mesh, replicate, replicated, shard_batch
from ddm_jax.training.steps import train_steps
from ddm_jax.training.train_state import TrainState, create_train_state

EVERY_N_STEPS_FIELDS = ("log_every", "eval_every", "checkpoint_every", "sample_every")
POSITIVE_TRAINING_FIELDS = ("batch_size", "substeps", "keep_checkpoints", "num_samples",
                            "sample_steps") + EVERY_N_STEPS_FIELDS


def check_config(config: ml_collections.ConfigDict) -> tuple[DatasetSpec, VDM]:
    """Validates the config against the data; returns the dataset spec and the model. No compilation."""
    for field in POSITIVE_TRAINING_FIELDS:
        value = config.training[field]
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"training.{field}={value!r} must be an integer >= 1")
    if not (isinstance(config.training.num_steps, int) and config.training.num_steps >= 0):
        raise ValueError(f"training.num_steps={config.training.num_steps!r} must be an integer >= 0")
    substeps = config.training.substeps
    for field in ("num_steps",) + EVERY_N_STEPS_FIELDS:
        if config.training[field] % substeps:
            raise ValueError(f"training.{field}={config.training[field]} must be a multiple of "
                             f"training.substeps={substeps} (steps run in calls of substeps)")
    if not 0.0 <= config.training.ema_decay < 1.0:
        raise ValueError(f"training.ema_decay={config.training.ema_decay!r} must be in [0, 1)")
    for field in ("batch_size", "num_time_samples"):
        if not (isinstance(config.eval[field], int) and config.eval[field] >= 1):
            raise ValueError(f"eval.{field}={config.eval[field]!r} must be an integer >= 1")
    validate_optimizer_config(config.optimizer)
    spec = dataset_spec(config.data.dataset, config.data.data_dir)
    if config.data.vocab_size is not None and config.data.vocab_size != spec.vocab_size:
        raise ValueError(
            f"data.vocab_size={config.data.vocab_size} disagrees with dataset {spec.name!r}, whose "
            f"values lie in [0, {spec.vocab_size}); set data.vocab_size={spec.vocab_size} or leave it unset")
    check_augment(config.data.augment, spec.image_shape)
    check_eval_split(spec, config.data.eval_split)
    cond_dim = AUGMENT_COND_DIM.get(config.data.augment)
    return spec, build_vdm(config.model, spec.image_shape, spec.vocab_size, cond_dim=cond_dim)


class Experiment:
    """The pieces of one config on one mesh: model, optimizer, compiled steps, data."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir = config, os.path.abspath(workdir)  # orbax needs absolute paths
        self.spec, self.model = check_config(config)
        self.mesh = make_mesh()
        self.optimizer = make_optimizer(config.optimizer)
        self.rng = jax.random.PRNGKey(config.training.seed)
        self.num_dims = math.prod(self.spec.image_shape)
        state_sharding = replicated(self.mesh)
        self.train_steps = jax.jit(
            functools.partial(train_steps, self.model, self.optimizer, config.training.ema_decay),
            out_shardings=(state_sharding, state_sharding), donate_argnums=(0,))
        self.elbo_terms = jax.jit(self.model.elbo_terms)
        self.sample = jax.jit(self.model.sample, static_argnums=(2, 3),
                              static_argnames=("steps", "sampler", "eta", "grid", "return_nfe"),
                              out_shardings=state_sharding)

    def initial_state(self) -> TrainState:
        params = self.model.init(jax.random.fold_in(self.rng, 0), self.spec.image_shape)
        return replicate(create_train_state(params, self.optimizer), self.mesh)

    def checkpoints(self, read_only: bool = False) -> CheckpointStore:
        """The workdir's checkpoint store; refuses one holding another architecture (before any write).
        read_only: for evaluation and sampling, also of a run that is training."""
        params = jax.eval_shape(lambda rng: self.model.init(rng, self.spec.image_shape), jax.random.PRNGKey(0))
        fingerprint = make_fingerprint(architecture(self.config.model), params)
        fingerprint["data"] = {"dataset": self.spec.name, "image_shape": list(self.spec.image_shape),
                               "vocab_size": self.spec.vocab_size}
        return CheckpointStore(
            os.path.join(self.workdir, "checkpoints"), fingerprint=fingerprint,
            max_to_keep=self.config.training.keep_checkpoints,
            save_interval_steps=self.config.training.checkpoint_every, read_only=read_only)

    def restore_latest(self, purpose: str, attempts: int = 3) -> tuple[int, TrainState]:
        """(step, state) of the workdir's latest checkpoint; refuses a workdir without one.

        The workdir may belong to a run that is training: a step listed here can be deleted by its
        retention (training.keep_checkpoints) while it is read; then the new latest is taken. With
        several processes, process 0 chooses the step for all.
        """
        if os.path.isdir(os.path.join(self.workdir, "checkpoints")):
            target = self.initial_state()
            with self.checkpoints(read_only=True) as store:
                for _ in range(attempts):
                    store.reload()
                    step = _same_on_all_processes(store.latest_step())
                    if step is None:
                        break
                    try:
                        return step, store.restore(step, target)
                    except Exception:
                        store.reload()
                        if step in store.all_steps() or jax.process_count() > 1:
                            raise
                        logging.warning("Checkpoint %d was deleted while being read; taking the latest again", step)
                else:
                    raise RuntimeError(f"--workdir={self.workdir}: the latest checkpoint was deleted while being "
                                       f"read, {attempts} times; the run training there deletes faster than this "
                                       "reads (raise its training.keep_checkpoints), then try again")
        raise ValueError(f"--workdir={self.workdir} holds no checkpoint to {purpose}; train first")

    def cond(self, batch_size: int):
        """The conditioning of un-augmented data: the identity's one-hot, or None without augmentation."""
        return identity_cond(batch_size, self.config.data.augment)

    def evaluate(self, params) -> dict[str, float]:
        data = self.config.data
        batches = eval_batches(self.spec, split=data.eval_split, batch_size=self.config.eval.batch_size,
                               data_dir=data.data_dir, process_index=jax.process_index(),
                               process_count=jax.process_count())
        sharded = ({**shard_batch({"image": b["image"], "cond": self.cond(len(b["image"]))}, self.mesh),
                    "mask": b["mask"]} for b in batches)
        terms_fn = lambda params, rng, batch: self.elbo_terms(params, rng, batch["image"], cond=batch["cond"])
        return evaluate_bpd(terms_fn, params, jax.random.fold_in(self.rng, 1), sharded,
                            num_dims=self.num_dims, num_time_samples=self.config.eval.num_time_samples)

    def write_samples(self, writer, step: int, params) -> str:
        training = self.config.training
        k = self.sample(params, jax.random.fold_in(self.rng, 2), training.num_samples,
                        self.spec.image_shape, steps=training.sample_steps, cond=self.cond(training.num_samples))
        grid = image_grid(to_uint8(np.asarray(jax.device_get(k)), self.spec.vocab_size))
        path = os.path.join(self.workdir, "samples", f"step_{step}.png")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_png(path, grid)
        writer.write_images(step, {"samples": grid[None]})
        return path


def _same_on_all_processes(step: int | None) -> int | None:
    """Process 0's value of `step` on every process (-1 stands for None in the broadcast)."""
    if jax.process_count() == 1:
        return step
    value = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step)))
    return None if value < 0 else value


def architecture(model_config: ml_collections.ConfigDict) -> dict:
    """config.model as a checkpoint's fingerprint holds it: without the networks' compute dtype,
    which leaves the (float32) parameters as they are, so a run may switch it and resume."""
    config = model_config.to_dict()
    for network in NETWORKS:
        config.get(network, {}).pop("dtype", None)
    return config


def first_non_finite_step(history: list[tuple[int, dict]]) -> int | None:
    """The first step whose loss or gradient norm is not finite, in [(first step, metrics [substeps])]."""
    for first_step, metrics in history:
        finite = np.isfinite(np.asarray(metrics["loss"])) & np.isfinite(np.asarray(metrics["grad_norm"]))
        if not finite.all():
            return first_step + int(np.argmin(finite))
    return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains for training.num_steps steps (resuming if workdir holds a checkpoint); returns the final eval.

    A non-finite loss or gradient stops the run (FloatingPointError naming the step) before that
    state is checkpointed. SIGTERM (preemption) saves a checkpoint and returns early.
    """
    experiment = Experiment(config, workdir)
    training = config.training
    with experiment.checkpoints() as store, _preemption_flag() as preempted:
        state = experiment.initial_state()
        writer = metric_writers.create_default_writer(experiment.workdir, just_logging=jax.process_index() > 0)
        start = store.latest_step() or 0
        if start:
            state = store.restore(start, state)
            logging.info("Resumed from step %d in %s", start, store.directory)
        batches = train_batches(experiment.spec, batch_size=training.batch_size, seed=training.seed,
                                data_dir=config.data.data_dir, start_step=start, augment=config.data.augment,
                                process_index=jax.process_index(), process_count=jax.process_count())
        logging.info("Process %d of %d; mesh of %d devices, %d of them local", jax.process_index(),
                     jax.process_count(), experiment.mesh.size, jax.local_device_count())
        report = periodic_actions.ReportProgress(num_train_steps=training.num_steps, writer=writer)
        train_rng = jax.random.fold_in(experiment.rng, 3)
        started = time.time()
        history, evaluation, samples_path = [], None, None

        def check_finite(step):
            bad = first_non_finite_step(jax.device_get(history))
            if bad is not None:
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {bad}; stopped before step {step} was saved, "
                    f"so the last checkpoint in {store.directory} (step {store.latest_step()}) is intact")

        step = start
        while step < training.num_steps and not preempted.is_set():
            local = [next(batches) for _ in range(training.substeps)]
            local = {key: np.stack([b[key] for b in local]) for key in ("image", "cond") if key in local[0]}
            state, metrics = experiment.train_steps(state, shard_batch(local, experiment.mesh, leading_axes=1),
                                                    train_rng)
            history.append((step + 1, metrics))
            step += training.substeps
            report(step)
            if step % training.checkpoint_every == 0 or step == training.num_steps:
                check_finite(step)
                store.save(step, state, force=True)
            if step % training.log_every == 0:
                check_finite(step)
                means = jax.tree.map(lambda *v: float(np.mean(v)), *jax.device_get([m for _, m in history]))
                writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
                history = []
            if step % training.eval_every == 0 or step == training.num_steps:
                evaluation = experiment.evaluate(state.ema_params)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in evaluation.items()})
            if step % training.sample_every == 0 or step == training.num_steps:
                samples_path = experiment.write_samples(writer, step, state.ema_params)
        if preempted.is_set() and step > start:
            check_finite(step)
            store.save(step, state, force=True)
            logging.warning("SIGTERM: saved step %d in %s and stopped", step, store.directory)
        store.wait_until_finished()
        if evaluation is None:  # preempted, or nothing left to train: report the state as it is
            evaluation = experiment.evaluate(state.ema_params)
            samples_path = experiment.write_samples(writer, step, state.ema_params)
        writer.flush()
        return {**evaluation, "step": step, "resumed_from": start, "preempted": preempted.is_set(),
                "train_seconds": time.time() - started, "workdir": experiment.workdir,
                "checkpoint": os.path.join(store.directory, str(store.latest_step())),
                "samples": samples_path}


@contextlib.contextmanager
def _preemption_flag():
    """A threading.Event set by SIGTERM while the block runs (the previous handler is restored after)."""
    flag = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Test bits/dim of the latest checkpoint's EMA parameters in workdir; refuses an empty workdir."""
    experiment = Experiment(config, workdir)
    step, state = experiment.restore_latest("evaluate")
    return {**experiment.evaluate(state.ema_params), "step": step}


def sample_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, sampler: str, steps: int,
                      num_samples: int, eta: float | None = None) -> dict:
    """Samples the latest checkpoint's EMA parameters; writes a PNG grid and an .npz of the integers."""
    check_sampler_settings(sampler, steps, num_samples, eta)
    experiment = Experiment(config, workdir)
    step, state = experiment.restore_latest("sample")
    settings = {} if eta is None else {"eta": eta}
    k = jax.device_get(experiment.sample(state.ema_params, jax.random.fold_in(experiment.rng, 4), num_samples,
                                         experiment.spec.image_shape, steps=steps, sampler=sampler,
                                         cond=experiment.cond(num_samples), **settings))
    eta_part = "" if eta is None else f"_eta{eta}"
    stem = os.path.join(experiment.workdir, "samples",
                        f"{sampler}{eta_part}_{steps}steps_{num_samples}samples_checkpoint{step}")
    if jax.process_index() == 0:  # the same samples on every process; the seed is fixed, so a rerun rewrites the same
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        save_png(f"{stem}.png", image_grid(to_uint8(np.asarray(k), experiment.spec.vocab_size)))
        np.savez(f"{stem}.npz", samples=np.asarray(k), vocab_size=experiment.spec.vocab_size)
    return {"step": step, "png": f"{stem}.png", "npz": f"{stem}.npz"}


def check_sampler_settings(sampler: str, steps: int, num_samples: int, eta: float | None) -> None:
    """The sampling flags, checked before anything is built or compiled."""
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler={sampler!r} is not one of {SAMPLERS}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"--steps={steps!r} must be an integer >= 1")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"--num_samples={num_samples!r} must be an integer >= 1")
    if eta is not None:
        if sampler != "ddim":
            raise ValueError(f"--eta={eta} applies to --sampler=ddim only, not {sampler!r}")
        check_eta(eta)
