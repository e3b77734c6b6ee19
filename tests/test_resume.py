"""Fault tolerance: exact resume after SIGKILL, a checkpoint on SIGTERM, a stop on NaN, substeps."""

import os
import signal

import jax
import numpy as np
import pytest
from tiny_runs import final_params, output_of, start_training, tiny_config, wait_for_checkpoint

from ddm_jax.training import trainer
from ddm_jax.training.experiment import Experiment


def test_run_killed_with_sigkill_resumes_bit_identical(digits_data_dir, tmp_path):
    steps, every = 60, 10
    uninterrupted = start_training(digits_data_dir, tmp_path / "a", steps, every)
    output = output_of(uninterrupted)
    assert uninterrupted.returncode == 0, output[-3000:]
    killed = start_training(digits_data_dir, tmp_path / "b", steps, every)
    wait_for_checkpoint(tmp_path / "b", every, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not os.path.isdir(tmp_path / "b" / "checkpoints" / str(steps)), "the run finished before the kill"
    restarted = start_training(digits_data_dir, tmp_path / "b", steps, every)
    output = output_of(restarted)
    assert restarted.returncode == 0, output[-3000:]
    assert "Resumed from step" in output
    a = final_params(digits_data_dir, str(tmp_path / "a"), steps, every)
    b = final_params(digits_data_dir, str(tmp_path / "b"), steps, every)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_eval_while_training_then_sigterm_saves_a_checkpoint_before_exit(digits_data_dir, tmp_path):
    """--mode=eval reads a checkpoint of a run that goes on training (read-only: the run is
    undisturbed), and SIGTERM then makes the run save its current step and return, reporting
    the state it saved (evaluated, but with no sample grid written yet)."""
    workdir = tmp_path / "run"
    # Every checkpoint kept: the tiny run saves several a second, and retention is not what this tests.
    flags = ["--config.training.keep_checkpoints=100000", "--config.training.eval_every=10"]
    process = start_training(digits_data_dir, workdir, 100_000, 10, flags=flags)
    wait_for_checkpoint(workdir, 10, process)
    evaluation = trainer.evaluate(tiny_config(digits_data_dir, num_steps=100_000, checkpoint_every=10), str(workdir))
    assert evaluation["step"] >= 10 and evaluation["num_examples"] == 360 and np.isfinite(evaluation["bpd"])
    assert process.poll() is None, "the run stopped while it was evaluated"
    process.send_signal(signal.SIGTERM)
    output = output_of(process)
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM: saved step" in output
    assert "test bits/dim" in output and "samples: " in output, output[-3000:]
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert saved[-1] > 10  # a step saved on SIGTERM, after the first periodic one


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(digits_data_dir, tmp_path):
    trainer.train_and_evaluate(
        tiny_config(digits_data_dir, num_steps=4, checkpoint_every=2, log_every=2), str(tmp_path)
    )
    diverging = tiny_config(digits_data_dir, num_steps=8, checkpoint_every=2, log_every=2)
    diverging.optimizer.lr = 1e30
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step [56]") as error:
        trainer.train_and_evaluate(diverging, str(tmp_path))
    assert "(step 4) is intact" in str(error.value)
    evaluation = trainer.evaluate(tiny_config(digits_data_dir, num_steps=4), str(tmp_path))
    assert evaluation["step"] == 4 and np.isfinite(evaluation["bpd"])


def test_substeps_give_the_same_parameters_as_single_steps(digits_data_dir, tmp_path):
    results = []
    for substeps in (1, 2):
        config = tiny_config(digits_data_dir, num_steps=4, checkpoint_every=4, log_every=4, substeps=substeps)
        workdir = str(tmp_path / f"substeps_{substeps}")
        trainer.train_and_evaluate(config, workdir)
        results.append(final_params(digits_data_dir, workdir, 4, 4))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), *results)


def test_substeps_must_divide_the_intervals(digits_data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"training.log_every=2: expected a multiple of training.substeps=4"):
        Experiment(tiny_config(digits_data_dir, substeps=4, log_every=2), str(tmp_path))
