"""Tiny runs shared by the training tests: configs, a training subprocess, its final parameters."""

import os
import subprocess
import sys
import time

import jax
import ml_collections

from configs import vdm_digits
from ddm_jax.training.experiment import Experiment


def tiny_config(data_dir, **training):
    config = vdm_digits.get_config()
    config.data.data_dir = str(data_dir)
    config.model.schedule_features = 16
    config.model.score_net.update(embedding_dim=8, n_layers=1, with_fourier_features=False)
    config.training.update(
        dict(
            batch_size=16,
            num_steps=4,
            substeps=1,
            log_every=2,
            eval_every=4,
            checkpoint_every=2,
            sample_every=4,
            num_samples=4,
            sample_steps=3,
        ),
        **training,
    )
    config.eval.batch_size = 128
    return config


def tiny_model_config(**overrides):
    cfg = ml_collections.ConfigDict(
        dict(
            schedule="fixed_linear",
            gamma_min=-13.3,
            gamma_max=5.0,
            learn_endpoints=True,
            schedule_features=16,
            ddpm_betas=(1e-4, 0.02),
            T=0,
            parameterization="eps",
            weighting="elbo",
            antithetic_time_sampling=True,
            network="score_net",
            score_net=dict(embedding_dim=8, n_layers=1, dropout=0.0, with_fourier_features=False),
            unet=dict(ch=8, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0),
        )
    )
    cfg.update(overrides)
    return cfg


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = [
    "--config.model.schedule_features=16",
    "--config.model.score_net.embedding_dim=8",
    "--config.model.score_net.n_layers=1",
    "--config.model.score_net.with_fourier_features=False",
    "--config.training.batch_size=16",
    "--config.training.log_every=5",
    "--config.training.eval_every=1000",
    "--config.training.sample_every=1000",
    "--config.training.num_samples=4",
    "--config.training.sample_steps=2",
    "--config.eval.batch_size=360",
    "--config.eval.num_time_samples=1",
]


def start_training(data_dir, workdir, num_steps, checkpoint_every, *, flags=(), env=None, log_suffix=""):
    """`python -m ddm_jax.main` on the tiny config (plus `flags`, in `env`); its output goes to
    workdir/../NAME{log_suffix}.log."""
    command = [
        sys.executable,
        "-m",
        "ddm_jax.main",
        "--config=configs/vdm_digits.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.training.num_steps={num_steps}",
        f"--config.training.checkpoint_every={checkpoint_every}",
        *TINY_FLAGS,
        *flags,
    ]
    with open(f"{workdir}{log_suffix}.log", "a") as log:  # the child keeps its own copy of the file
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
    experiment = Experiment(config, workdir)
    with experiment.checkpoints() as store:
        assert store.latest_step() == num_steps
        return jax.device_get(store.restore(num_steps, experiment.initial_state()))
