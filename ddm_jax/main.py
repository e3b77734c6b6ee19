"""Entry point: python -m ddm_jax.main --config=configs/vdm_digits.py --workdir=DIR [--mode=train|eval|sample].

Override any config field with --config.<path>=<value>, e.g. --config.model.T=100.
--mode=sample draws --num_samples with --sampler (ancestral, ddim, dpm_solver_pp, ode) in --steps
steps from the latest checkpoint and writes a PNG grid and an .npz beside the workdir's samples.
"""
from absl import app, flags
from ml_collections import config_flags

from ddm_jax.training import trainer

config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and samples.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"],
                  "train (resumes from workdir), eval or sample (the latest checkpoint).")
flags.DEFINE_string("sampler", "ancestral", "--mode=sample: ancestral, ddim, dpm_solver_pp or ode.")
flags.DEFINE_integer("steps", 1000, "--mode=sample: sampling steps (initial steps for ode).")
flags.DEFINE_integer("num_samples", 64, "--mode=sample: how many samples.")
flags.DEFINE_float("eta", None, "--mode=sample with ddim: eta in [0, 1].")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def report(result: dict) -> None:
    print(f"test bits/dim: {result['bpd']:.4f} +- {result['bpd_stderr']:.4f} "
          f"over {result['num_examples']} examples at step {result['step']}")
    print("  reconstruction {reconstruction_bpd:.4f}, prior {prior_bpd:.4f}, diffusion {diffusion_bpd:.4f} "
          "bits/dim".format(**result))
    for key, label in (("workdir", "TensorBoard log"), ("checkpoint", "checkpoint"), ("samples", "samples")):
        if key in result:
            print(f"{label}: {result[key]}")


def main(argv):
    del argv
    if FLAGS.mode == "train":
        report(trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir))
    elif FLAGS.mode == "eval":
        report(trainer.evaluate(FLAGS.config, FLAGS.workdir))
    else:
        result = trainer.sample_checkpoint(FLAGS.config, FLAGS.workdir, sampler=FLAGS.sampler, steps=FLAGS.steps,
                                           num_samples=FLAGS.num_samples, eta=FLAGS.eta)
        print(f"samples of checkpoint {result['step']}: {result['png']} and {result['npz']}")


if __name__ == "__main__":
    app.run(main)
