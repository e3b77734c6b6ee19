"""Entry point: python -m ddm_jax.main --config=configs/vdm_digits.py --workdir=DIR [--mode=train|eval].

Override any config field with --config.<path>=<value>, e.g. --config.model.T=100.
"""
from absl import app, flags
from ml_collections import config_flags

from ddm_jax.training import trainer

config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and samples.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes from workdir) or eval (latest checkpoint).")
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
    else:
        report(trainer.evaluate(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
    app.run(main)
