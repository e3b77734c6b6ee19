"""Entry point: python -m ddm_jax.main --config=configs/vdm_digits.py --workdir=DIR [--mode=train|eval|sample].

Override any config field with --config.<path>=<value>, e.g. --config.model.T=100. Training saves
its config as DIR/config.py: eval, sample and a resumed run take it when --config is omitted, and
another --config must agree with it on the architecture (`--config=DIR/config.py --config.x=...`
changes other settings). --mode=sample draws --num_samples with --sampler (ancestral, ddim,
dpm_solver_pp, ode) in --steps steps from the latest checkpoint and writes a PNG grid and an .npz
beside the workdir's samples. Checkpoints are verified on every restore: eval and sample take the
newest intact one, or the one --step names; training moves a damaged one to DIR/checkpoints/damaged/
(docs/checkpoints.md). --mode=generate writes PNG images of each --prompt (repeat the flag for
several) with a Stable Diffusion checkpoint in diffusers format (configs/sd_generate.py).

Several hosts: run the same command on each with --multihost (and, outside TPU pods, Slurm and
Open MPI, --coordinator_address=HOST:PORT --num_processes=N --process_id=I, or the variables
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); see training/distributed.py.
"""

import importlib.util
import os

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from ddm_jax.checks import ArgumentError, nearest_fields
from ddm_jax.training import distributed, generation, trainer

config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs, samples and the saved config.")
flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "sample", "generate"], "train (resumes from workdir), eval, sample or generate."
)
flags.DEFINE_multi_string("prompt", None, "--mode=generate: a text prompt; repeat the flag for several.")
flags.DEFINE_string("sampler", "ancestral", "--mode=sample: ancestral, ddim, dpm_solver_pp or ode.")
flags.DEFINE_integer("steps", 1000, "--mode=sample: sampling steps (initial steps for ode).")
flags.DEFINE_integer("num_samples", 64, "--mode=sample: how many samples.")
flags.DEFINE_float("eta", None, "--mode=sample with ddim: eta in [0, 1].")
flags.DEFINE_integer("step", None, "--mode=eval or sample: this checkpoint step, else the newest intact one.")
flags.DEFINE_bool("multihost", False, "Join the processes of a multi-host run (jax.distributed).")
flags.DEFINE_string("coordinator_address", None, "--multihost: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "--multihost: the number of processes.")
flags.DEFINE_integer("process_id", None, "--multihost: this process's index in [0, num_processes).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS
REPORTED_FIGURES = ("psnr", "psnr_stderr", "kl_nats", "reconstruction_nats", "elbo_nats", "loss", "loss_stderr")
PATHS = (
    ("workdir", "TensorBoard log"),
    ("checkpoint", "checkpoint"),
    ("samples", "samples"),
    ("vae", "VAE (diffusers)"),
    ("diffusers", "model (diffusers)"),
)


def config_from_file(argument: str) -> ml_collections.ConfigDict:
    """get_config([arg]) of the file in a --config=PATH[:ARG] value."""
    path, _, config_string = argument.partition(":")
    spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(config_string) if config_string else module.get_config()


def unknown_override(argv: list[str]) -> str | None:
    """The message for the first --config.<path> override whose field does not exist, or None."""
    files = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    if not files:
        return None
    config = config_from_file(files[-1])
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0]
        node, walked = config, []
        for key in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                section = ".".join(["config", *walked])
                fields = node.keys() if isinstance(node, ml_collections.ConfigDict) else []
                return f"--config.{path}: {section} has no field {key!r}{nearest_fields(key, fields)}"
            node, walked = node[key], [*walked, key]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one clear message for an override of a config field that does not exist."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError):  # ml_collections' errors for an unknown field: "'foo'"
        message = unknown_override(argv)
        if message is None:
            raise
        raise SystemExit(f"ddm_jax: {message}") from None


def report(result: dict) -> None:
    """The final evaluation, printed once per run (process 0): a VDM's bits/dim and terms, another
    task's figures, the paths written."""
    if jax.process_index() > 0:
        return
    note = f" ({result['note']})" if result.get("note") else ""
    if "bpd" in result:
        print(
            f"test bits/dim: {result['bpd']:.4f} +- {result['bpd_stderr']:.4f} "
            f"over {result['num_examples']} examples at step {result['step']}{note}"
        )
        print(
            "  reconstruction {reconstruction_bpd:.4f}, prior {prior_bpd:.4f}, diffusion {diffusion_bpd:.4f} "
            "bits/dim".format(**result)
        )
    else:
        figures = ", ".join(f"{key} {value:.4g}" for key, value in result.items() if key in REPORTED_FIGURES)
        print(f"evaluation at step {result['step']}{note}: {figures}")
    for key, label in PATHS:
        if result.get(key):
            print(f"{label}: {result[key]}")


def check_workdir(workdir: str, writable: bool) -> None:
    """Refuses a --workdir that is not a directory, or that training (`writable`) could not write or
    eval and sample could not read, before anything is built. A workdir that does not exist yet is
    judged by the nearest existing directory above it, where training would create it."""
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        kind = "a regular file" if os.path.isfile(existing) else "not a directory"
        raise ArgumentError("--workdir", workdir, f"a directory; {existing} is {kind}")
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        why = "on a read-only filesystem" if os.statvfs(existing).f_flag & os.ST_RDONLY else "not writable by this user"
        raise ArgumentError("--workdir", workdir, f"a directory training can write to; {existing} is {why}")
    if not os.access(existing, os.R_OK | os.X_OK):
        raise ArgumentError("--workdir", workdir, f"a readable directory; {existing} is not readable by this user")


def main(argv):
    del argv
    try:
        run_mode()
    except ArgumentError as error:  # a user's mistake: one line, no traceback
        raise SystemExit(f"ddm_jax: {error}") from None


def run_mode() -> None:
    check_workdir(FLAGS.workdir, writable=FLAGS.mode in ("train", "generate"))
    if FLAGS.mode == "train" and FLAGS.step is not None:
        raise ArgumentError("--step", FLAGS.step, "None with --mode=train (it resumes from the newest intact step)")
    if FLAGS.multihost:
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif any(value is not None for value in (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)):
        raise ArgumentError("--multihost", False, "True with --coordinator_address, --num_processes, --process_id")
    if FLAGS.mode == "train":
        report(trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir))
    elif FLAGS.mode == "eval":
        report(trainer.evaluate(FLAGS.config, FLAGS.workdir, step=FLAGS.step))
    elif FLAGS.mode == "generate":
        print("\n".join(generation.generate_from_config(FLAGS.config, FLAGS.workdir, FLAGS.prompt)))
    else:
        result = trainer.sample(
            FLAGS.config,
            FLAGS.workdir,
            sampler=FLAGS.sampler,
            steps=FLAGS.steps,
            num_samples=FLAGS.num_samples,
            eta=FLAGS.eta,
            step=FLAGS.step,
        )
        if jax.process_index() == 0:
            print(f"samples of checkpoint {result['step']} ({result['nfe']} network evaluations): ")
            print(f"  {result['png']}\n  {result['npz']}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
