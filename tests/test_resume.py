"""Fault tolerance: exact resume after SIGKILL, a checkpoint on SIGTERM, a stop on NaN, substeps."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddm_jax.training import trainer
from test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ["--config.model.schedule_features=16", "--config.model.score_net.embedding_dim=8",
              "--config.model.score_net.n_layers=1", "--config.model.score_net.with_fourier_features=False",
              "--config.training.batch_size=16", "--config.training.log_every=5",
              "--config.training.eval_every=1000", "--config.training.sample_every=1000",
              "--config.training.num_samples=4", "--config.training.sample_steps=2",
              "--config.eval.batch_size=360", "--config.eval.num_time_samples=1"]


def start_training(data_dir, workdir, num_steps, checkpoint_every, *, flags=(), env=None, log_suffix=""):
    """`python -m ddm_jax.main` on the tiny config (plus `flags`, in `env`); its output goes to
    workdir/../NAME{log_suffix}.log."""
    command = [sys.executable, "-m", "ddm_jax.main", "--config=configs/vdm_digits.py", f"--workdir={workdir}",
               f"--config.data.data_dir={data_dir}", f"--config.training.num_steps={num_steps}",
               f"--config.training.checkpoint_every={checkpoint_every}", *TINY_FLAGS, *flags]
    log = open(f"{workdir}{log_suffix}.log", "a")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    process.log_path = log.name
    return process


def output_of(process, timeout=600):
    process.wait(timeout=timeout)
    with open(process.log_path) as log:
        return log.read()


def wait_for_checkpoint(workdir, step, process, timeout=300):
    path = os.path.join(workdir, "checkpoints", str(step))
    deadline = time.time() + timeout
    while not os.path.isdir(path):
        assert process.poll() is None, output_of(process)[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def final_params(data_dir, workdir, num_steps, checkpoint_every):
    config = tiny_config(data_dir, num_steps=num_steps, checkpoint_every=checkpoint_every)
    experiment = trainer.Experiment(config, workdir)
    with experiment.checkpoints() as store:
        assert store.latest_step() == num_steps
        return jax.device_get(store.restore(num_steps, experiment.initial_state()))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    trainer.check_config(tiny_config(path))  # prepares digits once
    return str(path)


def test_run_killed_with_sigkill_resumes_bit_identical(data_dir, tmp_path):
    steps, every = 60, 10
    uninterrupted = start_training(data_dir, tmp_path / "a", steps, every)
    output = output_of(uninterrupted)
    assert uninterrupted.returncode == 0, output[-3000:]
    killed = start_training(data_dir, tmp_path / "b", steps, every)
    wait_for_checkpoint(tmp_path / "b", every, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not os.path.isdir(tmp_path / "b" / "checkpoints" / str(steps)), "the run finished before the kill"
    restarted = start_training(data_dir, tmp_path / "b", steps, every)
    output = output_of(restarted)
    assert restarted.returncode == 0, output[-3000:]
    assert "Resumed from step" in output
    a = final_params(data_dir, str(tmp_path / "a"), steps, every)
    b = final_params(data_dir, str(tmp_path / "b"), steps, every)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_eval_while_training_then_sigterm_saves_a_checkpoint_before_exit(data_dir, tmp_path):
    """--mode=eval reads a checkpoint of a run that goes on training (read-only: the run is
    undisturbed), and SIGTERM then makes the run save its current step and return."""
    workdir = tmp_path / "run"
    # Every checkpoint kept: the tiny run saves several a second, and retention is not what this tests.
    process = start_training(data_dir, workdir, 100_000, 10, flags=["--config.training.keep_checkpoints=100000"])
    wait_for_checkpoint(workdir, 10, process)
    evaluation = trainer.evaluate(tiny_config(data_dir, num_steps=100_000, checkpoint_every=10), str(workdir))
    assert evaluation["step"] >= 10 and evaluation["num_examples"] == 360 and np.isfinite(evaluation["bpd"])
    assert process.poll() is None, "the run stopped while it was evaluated"
    process.send_signal(signal.SIGTERM)
    output = output_of(process)
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM: saved step" in output
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert saved[-1] > 10  # a step saved on SIGTERM, after the first periodic one


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    trainer.train_and_evaluate(tiny_config(data_dir, num_steps=4, checkpoint_every=2, log_every=2), str(tmp_path))
    diverging = tiny_config(data_dir, num_steps=8, checkpoint_every=2, log_every=2)
    diverging.optimizer.lr = 1e30
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step [56]") as error:
        trainer.train_and_evaluate(diverging, str(tmp_path))
    assert "(step 4) is intact" in str(error.value)
    evaluation = trainer.evaluate(tiny_config(data_dir, num_steps=4), str(tmp_path))
    assert evaluation["step"] == 4 and np.isfinite(evaluation["bpd"])


def test_substeps_give_the_same_parameters_as_single_steps(data_dir, tmp_path):
    results = []
    for substeps in (1, 2):
        config = tiny_config(data_dir, num_steps=4, checkpoint_every=4, log_every=4, substeps=substeps)
        workdir = str(tmp_path / f"substeps_{substeps}")
        trainer.train_and_evaluate(config, workdir)
        results.append(final_params(data_dir, workdir, 4, 4))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), *results)


def test_substeps_must_divide_the_intervals(data_dir):
    with pytest.raises(ValueError, match=r"training.log_every=2 must be a multiple of training.substeps=4"):
        trainer.check_config(tiny_config(data_dir, substeps=4, log_every=2))
