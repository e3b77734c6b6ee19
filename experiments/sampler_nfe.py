"""Sample quality against network evaluations (NFE) for every sampler, and the ODE bits/dim
beside the ELBO bits/dim, on a trained digits VDM.

Needs a trained VDM (configs/vdm_digits.py) and the digits classifier, whose features give the
Frechet distance (FD) and whose predictions give the class distribution of the samples:

  python -m experiments.vdm_bits_per_dim --config=configs/vdm_digits.py --name=vdm_digits \
      --workdir=workdirs/vdm_digits_experiment
  python -m experiments.train_digits_classifier --config=configs/digits_classifier.py \
      --workdir=workdirs/digits_classifier
  python -m experiments.sampler_nfe --workdir=workdirs/vdm_digits_experiment \
      --classifier=workdirs/digits_classifier/classifier.npz

Every sampler draws --num_samples images from the EMA parameters; the reference is the digits
train split (the model's training data). Writes experiments/results/sampler_nfe.{md,json,png}.
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from configs import vdm_digits
from ddm_jax.data import load_split
from ddm_jax.diffusion import ode_bits_per_dim
from ddm_jax.evaluation.classifier import load_classifier
from ddm_jax.evaluation.sample_quality import sample_quality
from ddm_jax.training.experiment import Experiment

flags.DEFINE_string("workdir", "workdirs/vdm_digits_experiment", "Workdir of a trained configs/vdm_digits.py.")
flags.DEFINE_string("classifier", "workdirs/digits_classifier/classifier.npz", "The trained digits classifier.")
flags.DEFINE_string("results", "experiments/results", "Where sampler_nfe.{md,json,png} go.")
flags.DEFINE_integer("num_samples", 1000, "Samples per sampler setting.")
flags.DEFINE_integer("repeats", 2, "Seeds of the two settings the target compares (ancestral 1000, DPM-Solver++ 20).")
flags.DEFINE_integer("batch_size", 500, "Classifier batch size.")
FLAGS = flags.FLAGS

# (sampler, steps, settings): ancestral and DDIM on the uniform grid, DPM-Solver++ on log-SNR,
# the ODE adaptive at the given tolerances (its NFE is the solver's count).
SETTINGS = (
    *(("ancestral", n, {}) for n in (10, 20, 50, 100, 200, 1000)),
    *(("ddim", n, {}) for n in (10, 20, 50, 100, 200)),
    *(("dpm_solver_pp", n, {"grid": "log_snr"}) for n in (5, 10, 20, 50)),
    *(("ode", 16, {"rtol": tol, "atol": tol}) for tol in (1e-2, 1e-3, 1e-4)),
)
TARGET = (("ancestral", 1000), ("dpm_solver_pp", 20))


def quality_row(experiment, params, classifier, reference, sampler, steps, settings, seed):
    start = time.time()
    k, info = experiment.task.sample(
        params,
        jax.random.PRNGKey(seed),
        FLAGS.num_samples,
        experiment.task.spec.image_shape,
        steps=steps,
        sampler=sampler,
        **settings,
    )
    k, nfe = np.asarray(jax.device_get(k)), int(info["nfe"])
    seconds = time.time() - start
    quality = sample_quality(classifier.features, classifier.logits, k, reference, FLAGS.batch_size)
    return {
        "sampler": sampler,
        "steps": steps,
        "settings": settings,
        "seed": seed,
        "nfe": nfe,
        "sample_seconds": seconds,
        **{key: (value.tolist() if isinstance(value, np.ndarray) else value) for key, value in quality.items()},
    }


def likelihoods(experiment, params, config) -> dict:
    """ELBO bits/dim (the trainer's evaluation) and the PF-ODE bound, both dequantizations, on the test split."""
    elbo = experiment.task.bits_per_dim.run(params)
    test = load_split(experiment.task.spec, config.data.eval_split, config.data.data_dir)["image"]
    model = experiment.task.model
    rows = {
        "elbo_bpd": elbo["bpd"],
        "elbo_bpd_stderr": elbo["bpd_stderr"],
        "num_examples": len(test),
        "elbo_time_samples": config.eval.num_time_samples,
    }
    for dequantization in ("decoder", "uniform"):
        start = time.time()
        bpd, nfe = jax.jit(
            lambda params, rng, k: ode_bits_per_dim(
                rng,
                k,
                model.denoise_fn(params["network"]),
                model.gamma_fn(params["schedule"]),
                vocab_size=model.vocab_size,
                parameterization=model.parameterization,
                dequantization=dequantization,
            )
        )(params, jax.random.PRNGKey(7), test)
        bpd = np.asarray(bpd, np.float64)
        rows[f"ode_{dequantization}_bpd"] = float(bpd.mean())
        rows[f"ode_{dequantization}_bpd_stderr"] = float(bpd.std(ddof=1) / np.sqrt(len(bpd)))
        rows[f"ode_{dequantization}_nfe"] = int(nfe)
        rows[f"ode_{dequantization}_seconds"] = time.time() - start
    return rows


def write_plot(path, rows):
    import matplotlib  # the "experiments" extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        points = sorted((r["nfe"], r["frechet_distance"]) for r in rows if r["sampler"] == sampler and r["seed"] == 0)
        ax.plot(*zip(*points, strict=True), "o-", label=sampler)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("Frechet distance, classifier features")
    ax.set_title(f"digits VDM: {FLAGS.num_samples} samples vs the train split")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    config = vdm_digits.get_config()
    experiment = Experiment(config, FLAGS.workdir)
    step, state = experiment.restore_latest("sample")
    classifier = load_classifier(
        FLAGS.classifier,
        expected={"image_shape": list(experiment.task.spec.image_shape), "vocab_size": experiment.task.spec.vocab_size},
    )
    reference = load_split(experiment.task.spec, "train", config.data.data_dir)["image"]
    rows = []
    for sampler, steps, settings in SETTINGS:
        seeds = range(FLAGS.repeats) if (sampler, steps) in TARGET else range(1)
        for seed in seeds:
            rows.append(
                quality_row(experiment, state.ema_params, classifier, reference, sampler, steps, settings, seed)
            )
            print(
                json.dumps(
                    {
                        k: rows[-1][k]
                        for k in (
                            "sampler",
                            "steps",
                            "seed",
                            "nfe",
                            "frechet_distance",
                            "class_total_variation",
                            "sample_seconds",
                        )
                    }
                ),
                flush=True,
            )
    likelihood = likelihoods(experiment, state.ema_params, config)
    print(json.dumps(likelihood), flush=True)
    write_report(rows, likelihood, step)


def mean_fd(rows, sampler, steps):
    values = [r["frechet_distance"] for r in rows if (r["sampler"], r["steps"]) == (sampler, steps)]
    return float(np.mean(values)), float(np.max(values) - np.min(values)) / 2 if len(values) > 1 else 0.0


def write_report(rows, likelihood, step):
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    command = (
        f"python -m experiments.sampler_nfe --workdir={FLAGS.workdir} --classifier={FLAGS.classifier} "
        f"--num_samples={FLAGS.num_samples} --repeats={FLAGS.repeats}"
    )
    (ancestral, ancestral_spread), (dpm, dpm_spread) = (mean_fd(rows, *target) for target in TARGET)
    target = {
        "ancestral_1000_fd": ancestral,
        "ancestral_1000_fd_half_range": ancestral_spread,
        "dpm_solver_pp_20_fd": dpm,
        "dpm_solver_pp_20_fd_half_range": dpm_spread,
        "relative_difference": dpm / ancestral - 1.0,
        "within_5_percent": dpm <= 1.05 * ancestral,
    }
    stem = os.path.join(FLAGS.results, "sampler_nfe")
    os.makedirs(FLAGS.results, exist_ok=True)
    with open(f"{stem}.json", "w") as f:
        json.dump(
            {
                "command": command,
                "device": device,
                "checkpoint_step": step,
                "rows": rows,
                "likelihood": likelihood,
                "target": target,
            },
            f,
            indent=2,
        )
    write_plot(f"{stem}.png", rows)
    table = "\n".join(
        f"| {r['sampler']} | {r['steps']} | {r['settings'] or ''} | {r['seed']} | {r['nfe']} "
        f"| {r['frechet_distance']:.2f} | {r['class_total_variation']:.3f} | {r['mean_max_probability']:.3f} "
        f"| {r['sample_seconds']:.1f} |"
        for r in rows
    )
    with open(f"{stem}.md", "w") as f:
        f.write(f"""# Samplers: quality against network evaluations, and the ODE likelihood

Command: `{command}` on {device}, 2 cores; checkpoint step {step} of configs/vdm_digits.py
(`python -m experiments.vdm_bits_per_dim`), EMA parameters. Features and class predictions come
from the digits classifier (experiments/results/digits_classifier.md). Each row draws
{FLAGS.num_samples} samples; the reference is the train split (1437 images). FD values are biased
upward at this sample size, so compare rows with each other, not with FIDs of other work.

## Target: DPM-Solver++ at 20 NFE within 5% of ancestral sampling at 1000

| | FD (mean over {FLAGS.repeats} seeds, +- half the range) |
|---|---|
| ancestral, 1000 steps | {ancestral:.2f} +- {ancestral_spread:.2f} |
| DPM-Solver++(2M), 20 steps | {dpm:.2f} +- {dpm_spread:.2f} |

Relative difference {100 * target["relative_difference"]:+.1f}% (lower FD is better; the target reads
"no more than 5% above"): the target is {"met" if target["within_5_percent"] else "NOT met"}. Compare the
difference with the spread between seeds before reading more into it.

## All settings

| sampler | steps | settings | seed | NFE | FD | class TV | mean max-prob | seconds |
|---|---|---|---|---|---|---|---|---|
{table}

Class TV: total variation between the classifier's class distribution of the samples and of
the train split. Reference mean max-probability of the train split:
{rows[0]["reference_mean_max_probability"]:.3f}.

![FD against NFE](sampler_nfe.png)

## Likelihood of the same checkpoint, test split ({likelihood["num_examples"]} examples)

| bound | bits/dim | NFE |
|---|---|---|
| ELBO ({likelihood["elbo_time_samples"]} time samples per example) | {likelihood["elbo_bpd"]:.3f} +- {likelihood["elbo_bpd_stderr"]:.3f} | |
| PF-ODE, decoder dequantization (Hutchinson, rtol = atol = 1e-5) | {likelihood["ode_decoder_bpd"]:.3f} +- {likelihood["ode_decoder_bpd_stderr"]:.3f} | {likelihood["ode_decoder_nfe"]} |
| PF-ODE, uniform dequantization (Hutchinson, rtol = atol = 1e-5) | {likelihood["ode_uniform_bpd"]:.3f} +- {likelihood["ode_uniform_bpd_stderr"]:.3f} | {likelihood["ode_uniform_nfe"]} |

The decoder bound replaces the ELBO's prior and diffusion terms by the exact ODE density of
z_0 (ddm_jax/diffusion/likelihood.py); the uniform bound dequantizes with noise of the bin
width and ignores the decoder. +- is one standard error over examples.
""")


if __name__ == "__main__":
    app.run(main)
