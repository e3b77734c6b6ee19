"""Training and evaluation from a config: the loop and the train, eval and sample modes of main.py.

train_and_evaluate(config, workdir) trains the config's task (a VDM, an autoencoder or a
text-to-image model; `Experiment`), resuming from the newest intact checkpoint in workdir,
evaluates it every `training.eval_every` steps, writes sample grids, exports it at the end (e.g. a
diffusers folder) and returns the final evaluation. evaluate and sample run on the newest intact
checkpoint. Everything that can be checked without compiling is checked first (`builders.build_task`).
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

from ddm_jax.checks import check, check_int, check_interval, config_fields
from ddm_jax.diffusion.samplers import check_settings
from ddm_jax.training.builders import task_kind
from ddm_jax.training.checkpoints import restore_latest, true_on_any_process
from ddm_jax.training.experiment import Experiment, resolve_config, save_config
from ddm_jax.training.sharding import shard_batch
from ddm_jax.training.train_state import stream_key


def first_non_finite_step(history: list[tuple[int, dict]]) -> int | None:
    """The first step whose loss or gradient norm is not finite, in [(first step, metrics [substeps])]."""
    for first_step, metrics in history:
        finite = np.isfinite(np.asarray(metrics["loss"])) & np.isfinite(np.asarray(metrics["grad_norm"]))
        if not finite.all():
            return first_step + int(np.argmin(finite))
    return None


def progress_line(step: int, num_steps: int, steps_done: int, seconds: float, metrics: dict) -> str:
    """'step 2000/8000 (25%), 14.1 steps/s, ETA 7.1 min, train loss 2.03', the rate being that of the
    `steps_done` steps of the last `seconds` (since the previous line: compilation drops out)."""
    rate = steps_done / max(seconds, 1e-9)
    eta_minutes = (num_steps - step) / max(rate, 1e-9) / 60.0
    return (
        f"step {step}/{num_steps} ({100.0 * step / max(num_steps, 1):.0f}%), {rate:.1f} steps/s, "
        f"ETA {eta_minutes:.1f} min, train loss {metrics['loss']:.3f}"
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains for training.num_steps steps (resuming if workdir holds a checkpoint); returns the final eval.

    The config is saved as workdir/config.py once the run has resumed (a config the checkpoint
    refuses leaves the saved one as it was). A non-finite loss or gradient stops the run
    (FloatingPointError naming the step) before that state is checkpointed. SIGTERM (preemption) on
    any process saves a checkpoint and returns early on all. Progress with an ETA is printed every
    training.log_every steps.
    """
    config = resolve_config(config, workdir)
    experiment = Experiment(config, workdir)
    training = config.training
    with experiment.checkpoints() as store, _preemption_flag() as preempted:
        state = experiment.initial_state()
        start, state = restore_latest(store, state) or (0, state)  # damaged steps are moved aside
        if start:
            logging.info("Resumed from step %d in %s", start, store.directory)
        check(
            start % training.substeps == 0 or start >= training.num_steps,
            "training.substeps",
            training.substeps,
            f"a divisor of the step {start} the run resumes from (the steps of one call)",
        )
        save_config(experiment.workdir, config)
        writer = metric_writers.create_default_writer(experiment.workdir, just_logging=jax.process_index() > 0)
        note = None  # why the reported step is not training.num_steps
        if start > training.num_steps:
            note = (
                f"training.num_steps={training.num_steps} is below the checkpoint's step {start}; nothing was trained"
            )
            logging.warning("%s; reporting step %d", note, start)
        batches = experiment.task.train_batches(start)
        logging.info(
            "Process %d of %d; mesh of %d devices, %d of them local",
            jax.process_index(),
            jax.process_count(),
            experiment.mesh.size,
            jax.local_device_count(),
        )
        report = periodic_actions.ReportProgress(num_train_steps=training.num_steps, writer=writer)
        train_rng = stream_key(experiment.rng, "train")
        started = time.time()
        logged = (start, started)  # (step, time) of the last progress line
        history, evaluation, samples = [], None, None

        def check_finite(step):
            bad = first_non_finite_step(jax.device_get(history))
            if bad is not None:
                latest = store.latest_step()
                kept = (
                    f"no checkpoint exists in {store.directory}"
                    if latest is None
                    else f"the last checkpoint in {store.directory} (step {latest}) is intact"
                )
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {bad}; stopped before step {step} was saved, so {kept}"
                )

        def write_samples(step, params):
            result = experiment.task.samples(params, f"step_{step}")
            writer.write_images(step, {"samples": result["grid"][None]})
            return result

        # A SIGTERM to any process stops all at the same step (one collective a step with several
        # processes, so each waits for its device there).
        step = start
        while step < training.num_steps and not true_on_any_process(preempted.is_set()):
            state, metrics = experiment.train_steps(
                state,
                shard_batch(next_substeps(batches, training.substeps), experiment.mesh, leading_axes=1),
                train_rng,
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
                    now = time.time()
                    print(progress_line(step, training.num_steps, step - logged[0], now - logged[1], means), flush=True)
                    logged = (step, now)
                history = []
            if step % training.eval_every == 0 or step == training.num_steps:
                evaluation = experiment.task.evaluate(state.ema_params)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in evaluation.items()})
            if step % training.sample_every == 0 or step == training.num_steps:
                samples = write_samples(step, state.ema_params)
        stopped = true_on_any_process(preempted.is_set())  # also a SIGTERM during the last step
        if stopped and step > start:
            check_finite(step)
            store.save(step, state, force=True)
            logging.warning("SIGTERM: saved step %d in %s and stopped", step, store.directory)
        store.wait_until_finished()
        # Preempted, or nothing left to train: report the state as it is.
        if evaluation is None:
            evaluation = experiment.task.evaluate(state.ema_params)
        if samples is None:
            samples = write_samples(step, state.ema_params)
        writer.flush()
        exports = {} if stopped else experiment.export(state, step)
        return {
            **evaluation,
            **exports,
            "step": step,
            "resumed_from": start,
            "preempted": stopped,
            "train_seconds": time.time() - started,
            "workdir": experiment.workdir,
            "checkpoint": None
            if store.latest_step() is None
            else os.path.join(store.directory, str(store.latest_step())),
            "samples": samples["png"],
            "note": note,
        }


def next_substeps(batches, substeps: int) -> dict:
    """The next `substeps` batches of an iterator of {key: [B, ...]}, stacked: {key: [substeps, B, ...]}."""
    local = [next(batches) for _ in range(substeps)]
    return {key: np.stack([batch[key] for batch in local]) for key in local[0]}


@contextlib.contextmanager
def _preemption_flag():
    """A threading.Event set by SIGTERM while the block runs (the previous handler is restored after)."""
    flag = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def evaluate(config: ml_collections.ConfigDict | None, workdir: str, *, step: int | None = None) -> dict:
    """Test bits/dim of the EMA parameters of the newest intact checkpoint in workdir, or of checkpoint
    `step` (config: None for the saved one)."""
    if step is not None:
        check_int("--step", step, minimum=0)
    experiment = Experiment(resolve_config(config, workdir), workdir)
    step, state = experiment.restore_latest("evaluate", step)
    return {**experiment.task.evaluate(state.ema_params), "step": step}


def sample(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    *,
    sampler: str,
    steps: int,
    num_samples: int,
    eta: float | None = None,
    step: int | None = None,
) -> dict:
    """Samples the EMA parameters of the newest intact checkpoint, or of checkpoint `step` (`steps` are
    the sampler's); writes a PNG grid and an .npz of the integers under workdir/samples (config: None
    for the saved one)."""
    check_int("--steps", steps, minimum=1)
    check_int("--num_samples", num_samples, minimum=1)
    if step is not None:
        check_int("--step", step, minimum=0)
    sampler_settings = {} if eta is None else {"eta": eta}
    with config_fields(sampler="--sampler", eta="--eta"):
        check_settings(sampler, sampler_settings)
        if eta is not None:
            check_interval("eta", eta, 0.0, 1.0, closed_high=True)
    settings = {"sampler": sampler, "steps": steps, **sampler_settings}
    config = resolve_config(config, workdir)
    check(
        task_kind(config) == "vdm",
        "--mode",
        "sample",
        "a VDM config's mode (an autoencoder shows its reconstructions in training; a text-to-image model "
        "samples with --mode=generate)",
    )
    experiment = Experiment(config, workdir)
    step, state = experiment.restore_latest("sample", step)
    evaluator = experiment.task.sampler(stream_key(experiment.rng, "sample_mode"), num_samples, **settings)
    eta_part = "" if eta is None else f"_eta{eta}"
    result = evaluator.run(state.ema_params, f"{sampler}{eta_part}_{steps}steps_{num_samples}samples_checkpoint{step}")
    return {"step": step, "png": result["png"], "npz": result["npz"], "nfe": result["nfe"]}
