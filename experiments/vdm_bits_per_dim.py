"""A VDM config trained from scratch and recorded: test bits/dim against a per-pixel baseline.

Trains the config (as `make run` does for configs/vdm_digits.py), times it, fits independent
per-pixel categoricals on the same train split, and writes experiments/results/NAME.{md,json} and
NAME_samples.png. The .md keeps a hand-written section (a profile, a reading of the figures) that
follows the line "<!-- notes -->" in an existing file.

  python -m experiments.vdm_bits_per_dim --config=configs/vdm_digits.py --name=vdm_digits \\
      --workdir=workdirs/vdm_digits_experiment
  python -m experiments.vdm_bits_per_dim --config=configs/vdm_fashion_mnist.py --name=vdm_fashion_mnist \\
      --workdir=workdirs/vdm_fashion_mnist_experiment
"""

import json
import os
import shutil
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from ddm_jax.data import dataset_spec, load_split
from ddm_jax.evaluation.baselines import per_pixel_categorical_bpd
from ddm_jax.training import trainer
from experiments.reports import kept_notes

config_flags.DEFINE_config_file("config", "configs/vdm_digits.py", "The VDM config to train.", lock_config=True)
flags.DEFINE_string("name", "vdm_digits", "Stem of the result files in --results.")
flags.DEFINE_string("workdir", "workdirs/vdm_digits_experiment", "Training directory (must not exist).")
flags.DEFINE_string("results", "experiments/results", "Where the .md, .json and .png go.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if os.path.exists(FLAGS.workdir):
        raise ValueError(
            f"--workdir={FLAGS.workdir} exists; this experiment trains from scratch, so "
            "give a new directory (nothing was changed)"
        )
    config = FLAGS.config
    command = "python -m experiments.vdm_bits_per_dim " + " ".join(sys.argv[1:])
    start = time.time()
    result = trainer.train_and_evaluate(config, FLAGS.workdir)
    wall_seconds = time.time() - start
    spec = dataset_spec(config.data.dataset, config.data.data_dir)
    train = load_split(spec, "train", config.data.data_dir)["image"]
    test = load_split(spec, config.data.eval_split, config.data.data_dir)["image"]
    baseline = per_pixel_categorical_bpd(train, test, spec.vocab_size)
    record = {
        "command": command,
        "config": FLAGS["config"].config_filename,
        "steps": result["step"],
        "test_bpd": result["bpd"],
        "test_bpd_stderr": result["bpd_stderr"],
        "reconstruction_bpd": result["reconstruction_bpd"],
        "prior_bpd": result["prior_bpd"],
        "diffusion_bpd": result["diffusion_bpd"],
        "num_test_examples": result["num_examples"],
        "eval_time_samples": config.eval.num_time_samples,
        "wall_seconds": wall_seconds,
        "per_pixel_categorical_bpd": baseline,
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
    }
    os.makedirs(FLAGS.results, exist_ok=True)
    stem = os.path.join(FLAGS.results, FLAGS.name)
    with open(f"{stem}.json", "w") as f:
        json.dump(record, f, indent=2)
    shutil.copyfile(result["samples"], f"{stem}_samples.png")
    notes = kept_notes(f"{stem}.md")
    with open(f"{stem}.md", "w") as f:
        f.write(f"""# VDM on {spec.name}, test bits/dim

Command: `{command}`, on {record["device"]}, 2 cores.

| model | test bits/dim |
|---|---|
| VDM, {record["config"]}, {record["steps"]} steps, EMA parameters | {record["test_bpd"]:.3f} +- {record["test_bpd_stderr"]:.3f} |
| independent per-pixel categoricals (add-1/2 counts on the same train split) | {baseline:.3f} |

VDM terms: reconstruction {record["reconstruction_bpd"]:.4f}, prior {record["prior_bpd"]:.4f},
diffusion {record["diffusion_bpd"]:.3f} bits/dim; all {record["num_test_examples"]} examples of the
{config.data.eval_split} split, {record["eval_time_samples"]} time samples each (+- is one standard
error over examples). Wall time of training and evaluation: {wall_seconds / 60:.1f} minutes.

![samples]({os.path.basename(stem)}_samples.png)

{notes}""")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    app.run(main)
