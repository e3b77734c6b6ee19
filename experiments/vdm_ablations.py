"""The VDM paper's claims at small scale: schedule, discrete vs continuous time, Fourier features,
ELBO vs L_simple, each trained on digits with the same budget.

Every run is configs/vdm_digits.py with the overrides in ABLATIONS and --num_steps steps. Each
run's result is kept in WORKDIR/NAME/result_STEPS.json, so the command resumes where it stopped
(a killed run resumes from its checkpoint), and a larger --num_steps continues every run from
its last checkpoint (exact resume: the same as training that long from the start). Writes
experiments/results/vdm_ablations.{md,json,png} with every budget found in WORKDIR.

  python -m experiments.vdm_ablations --workdir=workdirs/vdm_ablations --num_steps=3000
  python -m experiments.vdm_ablations --workdir=workdirs/vdm_ablations --num_steps=6000

Besides test bits/dim, each run reports the variance of the diffusion-loss estimate of a batch:
for fixed batches of test images, the variance over draws of (t, eps) of the batch's mean
diffusion term (bits/dim), averaged over the batches. The VDM paper's claim is that the learned
schedule (trained to minimise this variance) lowers it.
"""

import json
import math
import os

import jax
import numpy as np
from absl import app, flags

from configs import vdm_digits
from ddm_jax.data import load_split
from ddm_jax.diffusion import bits_per_dim
from ddm_jax.training import trainer
from ddm_jax.training.experiment import Experiment
from experiments.reports import kept_notes

flags.DEFINE_string("workdir", "workdirs/vdm_ablations", "One sub-directory per run (resumed if present).")
flags.DEFINE_string("results", "experiments/results", "Where vdm_ablations.{md,json,png} go.")
flags.DEFINE_integer("num_steps", 3000, "Training steps of every run (the same budget each).")
flags.DEFINE_list("only", None, "Run only these ablations (names from ABLATIONS); the report covers all done.")
flags.DEFINE_integer("variance_batches", 5, "Test batches of the variance measurement.")
flags.DEFINE_integer("variance_draws", 32, "Draws of (t, eps) per batch.")
FLAGS = flags.FLAGS

VARIANCE_BATCH_SIZE = 64

# (name, group, overrides of configs/vdm_digits.py). The default config is "learned_monotone".
ABLATIONS = (
    ("fixed_linear", "schedule", {"model.schedule": "fixed_linear"}),
    ("learned_linear", "schedule", {"model.schedule": "learned_linear"}),
    ("learned_monotone", "schedule", {}),
    ("T=10", "time", {"model.T": 10}),
    ("T=100", "time", {"model.T": 100}),
    ("T=1000", "time", {"model.T": 1000}),
    ("no_fourier", "fourier", {"model.score_net.with_fourier_features": False}),
    ("ddpm_T=1000_elbo", "loss", {"model.schedule": "ddpm_linear", "model.T": 1000}),
    ("ddpm_T=1000_simple", "loss", {"model.schedule": "ddpm_linear", "model.T": 1000, "model.weighting": "simple"}),
)


def ablation_config(overrides: dict, num_steps: int):
    config = vdm_digits.get_config()
    for path, value in overrides.items():
        section, *rest = path.split(".")
        node = config[section]
        for key in rest[:-1]:
            node = node[key]
        node[rest[-1]] = value
    training = config.training
    training.num_steps = num_steps
    training.eval_every = training.checkpoint_every = training.sample_every = num_steps
    return config


def diffusion_estimate_variance(config, workdir: str, num_batches: int, num_draws: int) -> dict:
    """Variance over (t, eps) draws of a test batch's mean diffusion term (bits/dim), averaged over batches."""
    experiment = Experiment(config, workdir)
    _, state = experiment.restore_latest("measure")
    test = load_split(experiment.task.spec, config.data.eval_split, config.data.data_dir)["image"]
    num_dims = math.prod(experiment.task.spec.image_shape)
    variances = []
    for b in range(num_batches):
        images = test[b * VARIANCE_BATCH_SIZE : (b + 1) * VARIANCE_BATCH_SIZE]
        means = [
            float(
                np.mean(
                    bits_per_dim(
                        experiment.task.elbo_terms(state.ema_params, jax.random.PRNGKey(1000 * b + d), images)[
                            "diffusion"
                        ],
                        num_dims,
                    )
                )
            )
            for d in range(num_draws)
        ]
        variances.append(np.var(means, ddof=1))
    return {
        "diffusion_estimate_variance": float(np.mean(variances)),
        "diffusion_estimate_variance_stderr": float(np.std(variances, ddof=1) / np.sqrt(num_batches)),
    }


def result_path(name: str, num_steps: int) -> str:
    return os.path.join(FLAGS.workdir, name, f"result_{num_steps}.json")


def finished_budgets(name: str) -> list[int]:
    directory = os.path.join(FLAGS.workdir, name)
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(
        int(f[len("result_") : -len(".json")]) for f in names if f.startswith("result_") and f.endswith(".json")
    )


def earlier_train_seconds(name: str) -> float:
    """Training time of the largest smaller budget this run continues from (0 from scratch)."""
    earlier = [steps for steps in finished_budgets(name) if steps < FLAGS.num_steps]
    if not earlier:
        return 0.0
    with open(result_path(name, max(earlier))) as f:
        return json.load(f)["train_seconds"]


def run_ablation(name: str, overrides: dict) -> dict:
    workdir = os.path.join(FLAGS.workdir, name)
    done = result_path(name, FLAGS.num_steps)
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    config = ablation_config(overrides, FLAGS.num_steps)
    result = trainer.train_and_evaluate(config, workdir)
    if result["preempted"]:
        raise SystemExit(f"{name}: stopped by SIGTERM at step {result['step']}; rerun the command to resume")
    record = {
        "name": name,
        "overrides": overrides,
        "steps": result["step"],
        "test_bpd": result["bpd"],
        "test_bpd_stderr": result["bpd_stderr"],
        **{f"{term}_bpd": result[f"{term}_bpd"] for term in ("reconstruction", "prior", "diffusion")},
        "train_seconds": result["train_seconds"] + earlier_train_seconds(name),
        **diffusion_estimate_variance(config, workdir, FLAGS.variance_batches, FLAGS.variance_draws),
    }
    with open(done, "w") as f:
        json.dump(record, f, indent=2)
    return record


def write_plot(path: str, records: list[dict]) -> None:
    import matplotlib  # the "experiments" extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bpd, ax_var) = plt.subplots(1, 2, figsize=(12, 4))
    for steps in sorted({r["steps"] for r in records}):
        rows = [r for r in records if r["steps"] == steps]
        names = [r["name"] for r in rows]
        ax_bpd.errorbar(
            names,
            [r["test_bpd"] for r in rows],
            yerr=[r["test_bpd_stderr"] for r in rows],
            fmt="o",
            capsize=3,
            label=f"{steps} steps",
        )
        ax_var.errorbar(
            names,
            [r["diffusion_estimate_variance"] for r in rows],
            yerr=[r["diffusion_estimate_variance_stderr"] for r in rows],
            fmt="o",
            capsize=3,
            label=f"{steps} steps",
        )
    ax_bpd.set_ylabel("test bits/dim")
    ax_bpd.legend()
    ax_var.set_yscale("log")
    ax_var.set_ylabel(f"variance, batch-{VARIANCE_BATCH_SIZE} diffusion loss, (bits/dim)^2")
    for ax in (ax_bpd, ax_var):
        ax.tick_params(axis="x", rotation=60)
        ax.grid(alpha=0.3)
    fig.suptitle("VDM ablations on digits, the same budget for every run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(records: list[dict]) -> None:
    """The table of every run at every budget in records (sorted by budget, then ABLATIONS order)."""
    commands = [
        f"python -m experiments.vdm_ablations --workdir={FLAGS.workdir} --num_steps={steps}"
        for steps in sorted({r["steps"] for r in records})
    ]
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    command_lines = "\n".join(f"    {c}" for c in commands)
    stem = os.path.join(FLAGS.results, "vdm_ablations")
    notes = kept_notes(f"{stem}.md")
    with open(f"{stem}.json", "w") as f:
        json.dump({"commands": commands, "device": device, "runs": records}, f, indent=2)
    write_plot(f"{stem}.png", records)
    groups = {name: group for name, group, _ in ABLATIONS}
    rows = "\n".join(
        f"| {r['steps']} | {groups[r['name']]} | {r['name']}{' (a)' if r.get('provenance') else ''} | `{' '.join(f'--config.{k}={v}' for k, v in r['overrides'].items()) or '(default)'}` "
        f"| {r['test_bpd']:.3f} +- {r['test_bpd_stderr']:.3f} | {r['diffusion_bpd']:.3f} "
        f"| {r['diffusion_estimate_variance']:.2e} +- {r['diffusion_estimate_variance_stderr']:.1e} "
        f"| {r['train_seconds'] / 60:.1f} |"
        for r in records
    )
    with open(f"{stem}.md", "w") as f:
        f.write(f"""# VDM ablations on digits

Commands, in order (the second continues every run of the first from its checkpoint), on
{device}, 2 cores:
{command_lines}

Every run is configs/vdm_digits.py with the overrides shown, trained the given number of steps
(batch 64), evaluated with its EMA parameters (decay 0.999) on all 360 test examples, 4 time
samples each (+- is one standard error over examples).

Variance: for {FLAGS.variance_batches} fixed test batches of {VARIANCE_BATCH_SIZE}, the variance over
{FLAGS.variance_draws} draws of (t, eps) (antithetic t) of the batch's mean diffusion term, in
(bits/dim)^2, averaged over batches (+- one standard error over batches).

Runs marked (a) were not rerun by this code: their record carries its "provenance".

| steps | group | run | overrides | test bits/dim | diffusion bits/dim | variance of a batch's diffusion loss | train min |
|---|---|---|---|---|---|---|---|
{rows}

![ablations](vdm_ablations.png)

{notes}""")


def main(argv):
    del argv
    names = [name for name, _, _ in ABLATIONS]
    unknown = sorted(set(FLAGS.only or ()) - set(names))
    if unknown:
        raise ValueError(f"--only names {unknown}, which are not among {names}")
    for name, _, overrides in ABLATIONS:
        if FLAGS.only is None or name in FLAGS.only:
            print(json.dumps(run_ablation(name, overrides)), flush=True)
    records = []
    for steps in sorted({s for name in names for s in finished_budgets(name)}):
        for name in names:
            if os.path.exists(result_path(name, steps)):
                with open(result_path(name, steps)) as f:
                    records.append(json.load(f))
    os.makedirs(FLAGS.results, exist_ok=True)
    write_report(records)


if __name__ == "__main__":
    app.run(main)
