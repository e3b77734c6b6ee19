"""Training and evaluation of a VDM from a config: the loop and the three modes of main.py.

train_and_evaluate(config, workdir) trains (resuming from the latest checkpoint in workdir),
evaluates test bits/dim every `training.eval_every` steps, writes sample grids, and returns the
final evaluation. evaluate and sample run an evaluator on the latest checkpoint. Everything that
can be checked without compiling is checked first (`builders.check_config`).
"""

import contextlib
import os
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from ddm_jax.checks import check_int, check_interval, config_fields
from ddm_jax.data import train_batches
from ddm_jax.diffusion.samplers import check_settings
from ddm_jax.training.experiment import Experiment, resolve_config, save_config
from ddm_jax.training.sharding import shard_batch


def first_non_finite_step(history: list[tuple[int, dict]]) -> int | None:
    """The first step whose loss or gradient norm is not finite, in [(first step, metrics [substeps])]."""
    for first_step, metrics in history:
        finite = np.isfinite(np.asarray(metrics["loss"])) & np.isfinite(np.asarray(metrics["grad_norm"]))
        if not finite.all():
            return first_step + int(np.argmin(finite))
    return None


def progress_line(step: int, num_steps: int, start: int, seconds: float, metrics: dict) -> str:
    """'step 2000/8000 (25%), 14.1 steps/s, ETA 7.1 min, train bpd 2.03' from steps since `start`."""
    rate = (step - start) / max(seconds, 1e-9)
    eta_minutes = (num_steps - step) / max(rate, 1e-9) / 60.0
    return (
        f"step {step}/{num_steps} ({100.0 * step / max(num_steps, 1):.0f}%), {rate:.1f} steps/s, "
        f"ETA {eta_minutes:.1f} min, train loss {metrics['loss']:.3f}"
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains for training.num_steps steps (resuming if workdir holds a checkpoint); returns the final eval.

    The config is saved as workdir/config.py. A non-finite loss or gradient stops the run
    (FloatingPointError naming the step) before that state is checkpointed. SIGTERM (preemption)
    saves a checkpoint and returns early. Progress with an ETA is printed every training.log_every
    steps.
    """
    config = resolve_config(config, workdir)
    experiment = Experiment(config, workdir)
    training = config.training
    with experiment.checkpoints() as store, _preemption_flag() as preempted:
        save_config(experiment.workdir, config)
        state = experiment.initial_state()
        writer = metric_writers.create_default_writer(experiment.workdir, just_logging=jax.process_index() > 0)
        start = store.latest_step() or 0
        if start:
            state = store.restore(start, state)
            logging.info("Resumed from step %d in %s", start, store.directory)
        batches = train_batches(
            experiment.spec,
            batch_size=training.batch_size,
            seed=training.seed,
            data_dir=config.data.data_dir,
            download=config.data.download,
            start_step=start,
            augment=config.data.augment,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        logging.info(
            "Process %d of %d; mesh of %d devices, %d of them local",
            jax.process_index(),
            jax.process_count(),
            experiment.mesh.size,
            jax.local_device_count(),
        )
        report = periodic_actions.ReportProgress(num_train_steps=training.num_steps, writer=writer)
        train_rng = jax.random.fold_in(experiment.rng, 3)
        started = time.time()
        history, evaluation, samples = [], None, None

        def check_finite(step):
            bad = first_non_finite_step(jax.device_get(history))
            if bad is not None:
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {bad}; stopped before step {step} was saved, "
                    f"so the last checkpoint in {store.directory} (step {store.latest_step()}) is intact"
                )

        def write_samples(step, params):
            result = experiment.training_samples.run(params, f"step_{step}")
            writer.write_images(step, {"samples": result["grid"][None]})
            return result

        step = start
        while step < training.num_steps and not preempted.is_set():
            local = [next(batches) for _ in range(training.substeps)]
            local = {key: np.stack([b[key] for b in local]) for key in ("image", "cond") if key in local[0]}
            state, metrics = experiment.train_steps(
                state, shard_batch(local, experiment.mesh, leading_axes=1), train_rng
            )
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
                if jax.process_index() == 0:
                    print(progress_line(step, training.num_steps, start, time.time() - started, means), flush=True)
                history = []
            if step % training.eval_every == 0 or step == training.num_steps:
                evaluation = experiment.bits_per_dim.run(state.ema_params)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in evaluation.items()})
            if step % training.sample_every == 0 or step == training.num_steps:
                samples = write_samples(step, state.ema_params)
        if preempted.is_set() and step > start:
            check_finite(step)
            store.save(step, state, force=True)
            logging.warning("SIGTERM: saved step %d in %s and stopped", step, store.directory)
        store.wait_until_finished()
        if evaluation is None:  # preempted, or nothing left to train: report the state as it is
            evaluation = experiment.bits_per_dim.run(state.ema_params)
            samples = write_samples(step, state.ema_params)
        writer.flush()
        return {
            **evaluation,
            "step": step,
            "resumed_from": start,
            "preempted": preempted.is_set(),
            "train_seconds": time.time() - started,
            "workdir": experiment.workdir,
            "checkpoint": os.path.join(store.directory, str(store.latest_step())),
            "samples": samples["png"],
        }


@contextlib.contextmanager
def _preemption_flag():
    """A threading.Event set by SIGTERM while the block runs (the previous handler is restored after)."""
    flag = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def evaluate(config: ml_collections.ConfigDict | None, workdir: str) -> dict:
    """Test bits/dim of the latest checkpoint's EMA parameters in workdir (config: None for the saved one)."""
    experiment = Experiment(resolve_config(config, workdir), workdir)
    step, state = experiment.restore_latest("evaluate")
    return {**experiment.bits_per_dim.run(state.ema_params), "step": step}


def sample(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    *,
    sampler: str,
    steps: int,
    num_samples: int,
    eta: float | None = None,
) -> dict:
    """Samples the latest checkpoint's EMA parameters; writes a PNG grid and an .npz of the integers
    under workdir/samples (config: None for the saved one)."""
    check_int("--steps", steps, minimum=1)
    check_int("--num_samples", num_samples, minimum=1)
    sampler_settings = {} if eta is None else {"eta": eta}
    with config_fields(sampler="--sampler", eta="--eta"):
        check_settings(sampler, sampler_settings)
        if eta is not None:
            check_interval("eta", eta, 0.0, 1.0, closed_high=True)
    settings = {"sampler": sampler, "steps": steps, **sampler_settings}
    experiment = Experiment(resolve_config(config, workdir), workdir)
    step, state = experiment.restore_latest("sample")
    evaluator = experiment.samples(jax.random.fold_in(experiment.rng, 4), num_samples, **settings)
    eta_part = "" if eta is None else f"_eta{eta}"
    result = evaluator.run(state.ema_params, f"{sampler}{eta_part}_{steps}steps_{num_samples}samples_checkpoint{step}")
    return {"step": step, "png": result["png"], "npz": result["npz"], "nfe": result["nfe"]}
