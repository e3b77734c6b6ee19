"""Train-step throughput against the machine's matmul FLOP/s.

Prints images/s, the step's FLOPs from XLA's cost analysis, the achieved FLOP/s, and that as a
fraction of a large float32 matmul's FLOP/s measured in the same run. No dataset is read:
batches are random integers of the config's image shape and vocabulary. Compute in bfloat16
with --config.model.score_net.dtype=bfloat16 (float32 parameters either way). A config of another
task (e.g. configs/shapes_t2i.py) is timed with the trainer's own step on its first real batches.

  python -m experiments.benchmark_train_step --config=configs/vdm_digits.py
  python -m experiments.benchmark_train_step --config=configs/vdm_cifar10.py --batch_size=8 \
      --image_shape=32,32,3 --vocab_size=256 --out=experiments/results/train_step_cifar10.json
  python -m experiments.benchmark_train_step --config=configs/shapes_t2i.py \
      --config.model.vae_folder=workdirs/t2i_base/vae/export/step_9000
"""

import functools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ddm_jax.checks import check
from ddm_jax.training.builders import build_vdm
from ddm_jax.training.experiment import Experiment
from ddm_jax.training.optimizer import make_optimizer
from ddm_jax.training.sharding import make_mesh, replicate, replicated, shard_batch
from ddm_jax.training.steps import train_steps, vdm_loss_fn
from ddm_jax.training.train_state import create_train_state
from ddm_jax.training.trainer import next_substeps

config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_integer("batch_size", None, "Batch size (default: the config's).")
flags.DEFINE_list("image_shape", None, "H,W,C (default: the config's dataset).")
flags.DEFINE_integer("vocab_size", None, "Number of data values (default: the config's dataset).")
flags.DEFINE_integer("steps", 20, "Timed steps (a multiple of --substeps).")
flags.DEFINE_integer("substeps", 1, "Train steps per call (traced in sequence, one compiled call).")
flags.DEFINE_integer(
    "num_devices",
    None,
    "Devices of the data mesh (default: all; fake CPU devices with "
    "XLA_FLAGS=--xla_force_host_platform_device_count=N).",
)
flags.DEFINE_integer(
    "matmul_size", 2048, "n of the n x n matmul (in the compute dtype) that sets the reference FLOP/s."
)
flags.DEFINE_string("out", None, "Write the figures to this JSON file.")
FLAGS = flags.FLAGS


def flops_of(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def seconds_per_call(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def matmul_flops_per_second(n: int, dtype: str = "float32", trials: int = 5) -> float:
    """The best of `trials` timings of an n x n matmul in `dtype`: the machine's attainable FLOP/s."""
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), dtype) for i in range(2))
    matmul = jax.jit(jnp.matmul)
    return 2.0 * n**3 / min(seconds_per_call(matmul, (a, b), repeats=5) for _ in range(trials))


def vdm_step_inputs(config, batch_size: int, image_shape, vocab_size: int, substeps: int, num_devices: int | None):
    """(mesh, compiled-to-be step, state, batch) of a VDM config on random integer images: no dataset."""
    mesh = make_mesh(num_devices)
    model = build_vdm(config.model, image_shape, vocab_size)
    optimizer = make_optimizer(config.optimizer)
    state = replicate(create_train_state(model.init(jax.random.PRNGKey(0), image_shape), optimizer), mesh)
    images = np.random.default_rng(1).integers(0, vocab_size, (substeps, batch_size, *image_shape))
    step = jax.jit(
        functools.partial(train_steps, vdm_loss_fn(model), optimizer, config.training.ema_decay),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=(0,),
    )
    return mesh, step, state, shard_batch({"image": images}, mesh, leading_axes=1)


def task_step_inputs(config, substeps: int, workdir: str):
    """(mesh, step, state, batch) of any task (e.g. text-to-image): the trainer's own step and state,
    on the first batches of the task's input pipeline."""
    experiment = Experiment(config, workdir)
    batches = experiment.task.train_batches(0)
    batch = shard_batch(next_substeps(batches, substeps), experiment.mesh, leading_axes=1)
    return experiment.mesh, experiment.train_steps, experiment.initial_state(), batch


def benchmark_train_step(mesh, step, state, batch, batch_size: int, steps: int, substeps: int = 1) -> dict:
    """Times the jitted, donated train step (`substeps` per call) after a warm-up; XLA's FLOPs and memory."""
    rng = jax.random.PRNGKey(2)
    compiled = step.lower(state, batch, rng).compile()
    flops = flops_of(compiled) / substeps  # per device: a sharded program counts its own shard
    memory = compiled.memory_analysis()

    def run(state):
        for _ in range(steps // substeps):
            state, metrics = compiled(state, batch, rng)
        return state, metrics

    state, _ = jax.block_until_ready(run(state))  # warm up
    start = time.perf_counter()
    jax.block_until_ready(run(state))
    seconds = (time.perf_counter() - start) / steps
    return {
        "batch_size": batch_size,
        "substeps": substeps,
        "num_devices": mesh.size,
        "step_seconds": seconds,
        "images_per_second": batch_size / seconds,
        "step_flops": flops,
        "flops_per_second": flops / seconds,
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
    }


def main(argv):
    del argv
    config = FLAGS.config
    batch_size = FLAGS.batch_size or config.training.batch_size
    if config.get("task", "vdm") == "vdm":
        if FLAGS.image_shape is None or FLAGS.vocab_size is None:
            # Only here is TFDS needed: with both flags given the benchmark runs where it is not installed.
            from ddm_jax.data import dataset_spec

            spec = dataset_spec(config.data.dataset, config.data.data_dir)
        image_shape = tuple(int(s) for s in FLAGS.image_shape) if FLAGS.image_shape else spec.image_shape
        vocab_size = FLAGS.vocab_size or spec.vocab_size
        inputs = vdm_step_inputs(config, batch_size, image_shape, vocab_size, FLAGS.substeps, FLAGS.num_devices)
        compute_dtype = config.model[config.model.network].dtype
        shape = {"image_shape": list(image_shape)}
    else:
        check(FLAGS.num_devices is None, "--num_devices", FLAGS.num_devices, "None: a task runs on every device")
        config.training.batch_size = batch_size
        with tempfile.TemporaryDirectory() as workdir:
            inputs = task_step_inputs(config, FLAGS.substeps, workdir)
        compute_dtype, shape = "float32", {}
    result = {**shape, **benchmark_train_step(*inputs, batch_size, FLAGS.steps, FLAGS.substeps)}
    result["config"] = config_flags.get_config_filename(FLAGS["config"])
    result["compute_dtype"] = compute_dtype
    result["matmul_flops_per_second"] = matmul_flops_per_second(FLAGS.matmul_size, result["compute_dtype"])
    result["fraction_of_matmul"] = result["flops_per_second"] / result["matmul_flops_per_second"]
    result["device"] = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"
    result["jax"] = jax.__version__
    print(
        f"{result['images_per_second']:.1f} images/s, {result['step_seconds'] * 1e3:.1f} ms/step, "
        f"{result['step_flops'] / 1e9:.2f} GFLOP/step, {result['flops_per_second'] / 1e9:.1f} GFLOP/s = "
        f"{100 * result['fraction_of_matmul']:.0f}% of the {FLAGS.matmul_size}^2 {result['compute_dtype']} matmul's "
        f"{result['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s on {result['device']}; "
        f"{result['substeps']} substeps, mesh of {result['num_devices']}, "
        f"XLA temp {result['temp_bytes'] / 2**20:.1f} MiB + arguments {result['argument_bytes'] / 2**20:.1f} MiB"
    )
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
