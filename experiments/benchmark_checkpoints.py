"""What the checkpoint checksums cost: save and restore times with and without them.

For the digits network (configs/vdm_digits.py) and the CIFAR-10 score network
(configs/vdm_cifar10.py, built for 32x32x3 images of 256 values; no data needed), the full
TrainState (parameters, EMA, AdamW moments) is saved and restored --repeats times each way,
alternating:
  without  orbax's CheckpointManager with the items ddm_jax saved before (state, fingerprint);
  with     ddm_jax's CheckpointStore: also the CRC-32 of every array, computed before the
           asynchronous save starts, and verified on every restore.
"save, blocking" is the time `save` takes to return (what the training loop waits for); "save,
total" adds the wait for the asynchronous write to commit. Medians are reported (the machine
is shared), with the minimum and maximum beside them.

  python -m experiments.benchmark_checkpoints            # writes experiments/results/checkpoint_integrity.{md,json}
"""

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import jax
import orbax.checkpoint as ocp
from absl import app, flags

from configs import vdm_cifar10, vdm_digits
from ddm_jax.training.builders import build_vdm
from ddm_jax.training.checkpoints import CheckpointStore, array_checksums, make_fingerprint
from ddm_jax.training.optimizer import make_optimizer
from ddm_jax.training.sharding import make_mesh, replicate
from ddm_jax.training.train_state import create_train_state

flags.DEFINE_integer("repeats", 5, "Saves and restores timed per network and variant.")
flags.DEFINE_string("directory", None, "Where the checkpoints are written (default: a temporary folder, removed).")
flags.DEFINE_string("out", "experiments/results/checkpoint_integrity", "Path of the .md and .json written.")
FLAGS = flags.FLAGS

NETWORKS = {  # name: (config module, image shape, vocabulary)
    "digits": (vdm_digits, (8, 8, 1), 17),
    "cifar10": (vdm_cifar10, (32, 32, 3), 256),
}


def train_state(config, image_shape, vocab_size):
    """The trainer's TrainState of this config (replicated on a mesh of one device), and its fingerprint."""
    model = build_vdm(config.model, image_shape, vocab_size)
    optimizer = make_optimizer(config.optimizer)
    init = jax.jit(lambda rng: create_train_state(model.init(rng, image_shape), optimizer))
    state = replicate(init(jax.random.PRNGKey(0)), make_mesh(1))
    return state, make_fingerprint(config.model, state.params)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Plain:
    """orbax alone, with the items ddm_jax saved before the checksums."""

    def __init__(self, directory, fingerprint):
        self.fingerprint = fingerprint
        self.manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=None))

    def save(self, step, state):
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), fingerprint=ocp.args.JsonSave(self.fingerprint)
            ),
        )

    def restore(self, step, target):
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state

    def wait_until_finished(self):
        self.manager.wait_until_finished()

    def delete(self, step):
        self.manager.delete(step)

    def close(self):
        self.manager.close()


class Verified(CheckpointStore):
    """ddm_jax's store, keeping every step (deleted here between timings)."""

    def __init__(self, directory, fingerprint):
        super().__init__(directory, fingerprint=fingerprint, max_to_keep=None)

    def delete(self, step):
        self._manager.delete(step)


def time_one(store, step: int, state) -> dict:
    """Seconds of one save (blocking part and total) and one restore of `state` at `step`, then deleted."""
    blocking = seconds(lambda: store.save(step, state))
    total = blocking + seconds(store.wait_until_finished)
    restore = seconds(lambda: jax.block_until_ready(store.restore(step, state)))
    store.delete(step)
    store.wait_until_finished()
    return {"save_blocking": blocking, "save_total": total, "restore": restore}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def benchmark(name: str, directory: str, repeats: int) -> dict:
    module, image_shape, vocab_size = NETWORKS[name]
    state, fingerprint = train_state(module.get_config(), image_shape, vocab_size)
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    stores = {
        "without": Plain(os.path.join(directory, name, "without"), fingerprint),
        "with": Verified(os.path.join(directory, name, "with"), fingerprint),
    }
    timings = {variant: [] for variant in stores}
    for step in range(repeats + 1):  # the first round warms up (compilation, handler registration): not counted
        for variant in sorted(stores, reverse=step % 2 == 1):  # alternating which goes first
            timing = time_one(stores[variant], step, state)
            if step > 0:
                timings[variant].append(timing)
    for store in stores.values():
        store.close()
    checksum_seconds = [seconds(lambda: array_checksums(state)) for _ in range(repeats)]
    figures = {
        variant: {key: summary([t[key] for t in runs]) for key in ("save_blocking", "save_total", "restore")}
        for variant, runs in timings.items()
    }
    overhead = {
        key: figures["with"][key]["median"] / figures["without"][key]["median"] - 1.0
        for key in ("save_blocking", "save_total", "restore")
    }
    return {
        "state_bytes": size,
        "num_arrays": len(jax.tree.leaves(state)),
        "crc32_seconds": summary(checksum_seconds),
        "seconds": figures,
        "overhead": overhead,
    }


def _pair(figures: dict, key: str, statistic: str) -> str:
    return f"{figures['without'][key][statistic]:.3f} / {figures['with'][key][statistic]:.3f}"


def _overhead(figures: dict, key: str, statistic: str) -> float:
    return figures["with"][key][statistic] / figures["without"][key][statistic] - 1.0


def markdown(record: dict) -> str:
    lines = [
        "# Checkpoint checksums: what they cost",
        "",
        "Save and restore of the full TrainState (parameters, EMA, AdamW moments) with orbax alone",
        "(the items ddm_jax saved before: state and fingerprint) and with ddm_jax's CheckpointStore,",
        "which also computes the CRC-32 of every array before the asynchronous save and verifies them on",
        f"every restore. `experiments/benchmark_checkpoints.py`, {record['repeats']} repetitions of each after",
        'one warm-up, alternating; seconds, medians (minima in parentheses). "Blocking" is the time `save`',
        'takes to return (what the training loop waits for), "total" adds the wait for the asynchronous',
        'write to commit. "CRC-32 alone" times the checksums of the whole state by themselves, and their',
        "share of orbax's own save (its median and its minimum): the estimate of the overhead that",
        "noise from other jobs on the machine disturbs least.",
        "",
        f"Command: `{record['command']}` ({record['date']})",
        "",
        f"Machine: {record['machine']}",
        "",
        "| network | state | arrays | save blocking, without / with | save total, without / with "
        "| overhead on save total | CRC-32 alone | its share of a save |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in record["networks"].items():
        figures, crc = result["seconds"], result["crc32_seconds"]["median"]
        without = figures["without"]["save_total"]
        lines.append(
            f"| {name} | {result['state_bytes'] / 2**20:.1f} MiB | {result['num_arrays']} "
            f"| {_pair(figures, 'save_blocking', 'median')} ({_pair(figures, 'save_blocking', 'min')}) "
            f"| {_pair(figures, 'save_total', 'median')} ({_pair(figures, 'save_total', 'min')}) "
            f"| {_overhead(figures, 'save_total', 'median'):+.1%} ({_overhead(figures, 'save_total', 'min'):+.1%}) "
            f"| {crc:.3f} | {crc / without['median']:.1%} ({crc / without['min']:.1%}) |"
        )
    lines += [
        "",
        "| network | restore, without / with | overhead on restore |",
        "|---|---|---|",
    ]
    for name, result in record["networks"].items():
        figures = result["seconds"]
        lines.append(
            f"| {name} | {_pair(figures, 'restore', 'median')} ({_pair(figures, 'restore', 'min')}) "
            f"| {_overhead(figures, 'restore', 'median'):+.1%} ({_overhead(figures, 'restore', 'min'):+.1%}) |"
        )
    overheads = {
        name: _overhead(result["seconds"], "save_total", "median") for name, result in record["networks"].items()
    }
    verdict = "met" if max(overheads.values()) < 0.10 else "not met"
    lines += [
        "",
        f"Target, under 10% overhead on a save: {verdict} by the medians "
        f"({', '.join(f'{name} {overhead:+.1%}' for name, overhead in overheads.items())}).",
        "",
        "Maxima are in the .json file beside this one.",
        "",
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    directory = FLAGS.directory or tempfile.mkdtemp(prefix="ddm_jax_checkpoint_benchmark_")
    load_before = os.getloadavg()
    try:
        networks = {name: benchmark(name, directory, FLAGS.repeats) for name in NETWORKS}
    finally:
        if FLAGS.directory is None:
            shutil.rmtree(directory, ignore_errors=True)
    load_after = os.getloadavg()
    record = {
        "command": " ".join(["python -m experiments.benchmark_checkpoints", *sys.argv[1:]]),
        "machine": (
            f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), jax {jax.__version__}, "
            f"orbax-checkpoint {ocp.__version__}; load average {load_before[0]:.1f} before and "
            f"{load_after[0]:.1f} after (other jobs shared the cores)"
        ),
        "repeats": FLAGS.repeats,
        "date": time.strftime("%Y-%m-%d"),
        "networks": networks,
    }
    with open(f"{FLAGS.out}.json", "w") as file:
        json.dump(record, file, indent=2)
    with open(f"{FLAGS.out}.md", "w") as file:
        file.write(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    app.run(main)
