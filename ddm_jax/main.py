"""Entry point: python -m ddm_jax.main --config=configs/vdm_digits.py --workdir=DIR [--mode=train|eval|sample].

Override any config field with --config.<path>=<value>, e.g. --config.model.T=100.
--mode=sample draws --num_samples with --sampler (ancestral, ddim, dpm_solver_pp, ode) in --steps
steps from the latest checkpoint and writes a PNG grid and an .npz beside the workdir's samples.

Several hosts: run the same command on each with --multihost (and, outside TPU pods, Slurm and
Open MPI, --coordinator_address=HOST:PORT --num_processes=N --process_id=I, or the variables
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); see training/distributed.py.
"""
import jax
from absl import app, flags
from ml_collections import config_flags

from ddm_jax.training import distributed, trainer

config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and samples.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"],
                  "train (resumes from workdir), eval or sample (the latest checkpoint).")
flags.DEFINE_string("sampler", "ancestral", "--mode=sample: ancestral, ddim, dpm_solver_pp or ode.")
flags.DEFINE_integer("steps", 1000, "--mode=sample: sampling steps (initial steps for ode).")
flags.DEFINE_integer("num_samples", 64, "--mode=sample: how many samples.")
flags.DEFINE_float("eta", None, "--mode=sample with ddim: eta in [0, 1].")
flags.DEFINE_bool("multihost", False, "Join the processes of a multi-host run (jax.distributed).")
flags.DEFINE_string("coordinator_address", None, "--multihost: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "--multihost: the number of processes.")
flags.DEFINE_integer("process_id", None, "--multihost: this process's index in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def report(result: dict) -> None:
    if jax.process_index() > 0:  # one report per run, from process 0
        return
    print(f"test bits/dim: {result['bpd']:.4f} +- {result['bpd_stderr']:.4f} "
          f"over {result['num_examples']} examples at step {result['step']}")
    print("  reconstruction {reconstruction_bpd:.4f}, prior {prior_bpd:.4f}, diffusion {diffusion_bpd:.4f} "
          "bits/dim".format(**result))
    for key, label in (("workdir", "TensorBoard log"), ("checkpoint", "checkpoint"), ("samples", "samples")):
        if key in result:
            print(f"{label}: {result[key]}")


def main(argv):
    del argv
    if FLAGS.multihost:
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif any(value is not None for value in (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)):
        raise ValueError("--coordinator_address, --num_processes and --process_id need --multihost")
    if FLAGS.mode == "train":
        report(trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir))
    elif FLAGS.mode == "eval":
        report(trainer.evaluate(FLAGS.config, FLAGS.workdir))
    else:
        result = trainer.sample_checkpoint(FLAGS.config, FLAGS.workdir, sampler=FLAGS.sampler, steps=FLAGS.steps,
                                           num_samples=FLAGS.num_samples, eta=FLAGS.eta)
        if jax.process_index() == 0:
            print(f"samples of checkpoint {result['step']}: {result['png']} and {result['npz']}")


if __name__ == "__main__":
    app.run(main)
