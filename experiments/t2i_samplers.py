"""Sample quality of the shapes text-to-image base against the sampler and its number of steps.

The base (the diffusers folder experiments/t2i_base.py writes) is loaded as any SD checkpoint
(`LatentDiffusion.load`) and generates through the public pipeline (`evaluation.generate.generate`):
one image for each of the first --num_prompts test captions per setting (sampler, steps, its own
settings, a guidance interval) and guidance scale of --guidance_scales, every one from the same
initial latents (row b of PRNGKey(0), as t2i_base's evaluation, so the rows of its sampler and
steps repeat that record's). The committed attribute classifier judges them as t2i_base does:
shape, colour, position, count, the one- and two-object prompts apart, the Frechet distance of its
features against the train split, and per-prompt paired differences against the --reference
setting at the same scale.

  python -m experiments.t2i_samplers --base=workdirs/shapes_base --results=workdirs/t2i_samplers

Writes RESULTS/NAME.{md,json}; reading notes below "<!-- notes -->" of an existing .md are
kept.
"""

import json
import os
import sys
import time

import jax
from absl import app, flags

from ddm_jax.checks import check, check_choice, check_int
from ddm_jax.diffusion import SAMPLERS, time_grid
from ddm_jax.diffusion.samplers import check_settings
from ddm_jax.evaluation import frechet
from ddm_jax.evaluation.generate import check_guidance_interval, generate
from ddm_jax.evaluation.shapes_metrics import (
    feature_statistics,
    load_shapes,
    load_shapes_classifier,
    paired_difference,
    score_images,
    summaries,
)
from ddm_jax.models import LatentDiffusion
from experiments.reports import kept_notes

flags.DEFINE_string("base", "workdirs/shapes_base", "The text-to-image base, a diffusers folder.")
flags.DEFINE_string(
    "classifier", "experiments/results/shapes_classifier.npz", "The attribute classifier (.npz) that judges."
)
flags.DEFINE_string("results", "experiments/results", "Where NAME.{md,json} go.")
flags.DEFINE_string("name", "t2i_samplers", "Stem of the result files in --results.")
flags.DEFINE_integer("num_prompts", 512, "Held-out test captions, one image each per setting.")
flags.DEFINE_list("guidance_scales", ["4"], "Classifier-free guidance scales, each with every setting.")
flags.DEFINE_list(
    "settings",
    [
        "dpm_solver_pp:10",
        "dpm_solver_pp:25",
        "dpm_solver_pp:50",
        "ddim:25",
        "ddim:50",
        "ddim:100",
        "ancestral:50",
        "ancestral:100",
        "ancestral:250",
    ],
    "SAMPLER:STEPS[:NAME=VALUE...]: a key of diffusion.SAMPLERS, its steps and other settings (ddim:50:eta=0.5), "
    "and guidance_interval=LOW..HIGH in gamma = -log SNR (ancestral:50:guidance_interval=-2.55..2.13).",
)
flags.DEFINE_string("reference", "dpm_solver_pp:25", "The setting (one of --settings) the others are paired with.")
FLAGS = flags.FLAGS

PAIRED_HEADS = ("shapes", "colors")


def setting_value(value: str) -> float | str:
    """A sampler setting's value: a number where it reads as one (eta=0.5), else the text (grid=log_snr)."""
    try:
        return float(value)
    except ValueError:
        return value


def parsed_interval(value: str) -> tuple[float, float]:
    """(gamma_low, gamma_high) of "LOW..HIGH" (-inf and inf allowed); ArgumentError naming guidance_interval."""
    bounds = value.split("..")
    try:
        interval = tuple(float(bound) for bound in bounds)
    except ValueError:
        interval = value
    return check_guidance_interval(interval)


def parsed_setting(setting: str) -> tuple[str, int, dict]:
    """(sampler, steps, the other keyword arguments of `generate`: the sampler's settings and
    guidance_interval) of "SAMPLER:STEPS[:NAME=VALUE...]"; ArgumentError naming --settings (or the
    setting's NAME) otherwise."""
    sampler, _, rest = setting.partition(":")
    steps, *options = rest.split(":")
    check(steps.isdigit(), "--settings", setting, "SAMPLER:STEPS[:NAME=VALUE...], e.g. ddim:50:eta=0.5")
    check_choice("--settings", sampler, SAMPLERS)
    check_int("--settings", int(steps), minimum=1)
    check(all("=" in option for option in options), "--settings", setting, "a sampler's settings as NAME=VALUE")
    settings = dict(option.split("=", 1) for option in options)
    interval = settings.pop("guidance_interval", None)
    settings = {name: setting_value(value) for name, value in settings.items()}
    check_settings(sampler, settings)
    if interval is not None:
        settings["guidance_interval"] = parsed_interval(interval)
    return sampler, int(steps), settings


def parsed_scale(scale: str) -> float:
    """A guidance scale of --guidance_scales; ArgumentError naming it unless a number >= 0."""
    try:
        value = float(scale)
    except ValueError:
        value = float("nan")
    check(value >= 0, "--guidance_scales", scale, "numbers >= 0")
    return value


def unet_calls(gamma_fn, steps: int, settings: dict, guidance_scale: float) -> int:
    """UNet evaluations per image of a grid sampler (one at each grid point but the last): one per
    step, two at the steps guidance applies to (conditional and unconditional): every step, or
    those whose gamma lies in the guidance interval (`diffusion.guided_denoise_fn`: scale 1, and 0
    without an interval, call one half only)."""
    interval = settings.get("guidance_interval")
    if guidance_scale == 1.0 or (guidance_scale == 0.0 and interval is None):
        return steps
    if interval is None:
        return 2 * steps
    low, high = interval
    gammas = gamma_fn(time_grid(settings.get("grid", "uniform"), gamma_fn, steps)[:-1])
    return steps + int(((gammas > low) & (gammas <= high)).sum())


def quality_row(
    model, params, prompts, classifier, reference, sampler: str, steps: int, settings: dict, guidance_scale: float
) -> tuple[dict, dict]:
    """(the JSON row of one setting at one scale, its {head: Score} for paired comparisons)."""
    start = time.time()
    images = generate(
        model,
        params,
        prompts,
        rng=jax.random.PRNGKey(0),
        guidance_scale=guidance_scale,
        sampler=sampler,
        steps=steps,
        **settings,
    )
    seconds = time.time() - start
    scores = score_images(classifier, images, prompts)
    distance = frechet.frechet_distance(*feature_statistics(classifier, images), *reference)
    row = {
        "sampler": sampler,
        "steps": steps,
        "settings": settings,
        "guidance_scale": guidance_scale,
        "unet_calls": unet_calls(model.gamma_fn, steps, settings, guidance_scale),
        "seconds": seconds,
        **summaries(scores, prompts),
        "frechet_distance": distance,
    }
    return row, scores


def accuracy(scores: dict, head: str) -> str:
    return f"{scores[head]['accuracy']:.3f} +- {scores[head]['standard_error']:.3f}"


def report_row(row: dict) -> str:
    paired = row["minus_reference"]
    cells = [
        ", ".join([row["sampler"], *(f"{name}={value}" for name, value in row["settings"].items())]),
        row["steps"],
        f"{row['guidance_scale']:g}",
        row["unet_calls"],
        accuracy(row["scores"], "shapes"),
        accuracy(row["scores"], "colors"),
        f"{row['scores']['position']['accuracy']:.3f}",
        f"{row['by_objects']['2']['shapes']['accuracy']:.3f}",
        f"{row['frechet_distance']:.1f}",
        *(f"{paired[head]['difference']:+.3f} +- {paired[head]['standard_error']:.3f}" for head in PAIRED_HEADS),
        f"{row['seconds']:.0f}",
    ]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def write_report(record: dict) -> None:
    stem = os.path.join(FLAGS.results, FLAGS.name)
    with open(f"{stem}.json", "w") as file:
        json.dump(record, file, indent=2)
    rows = "\n".join(report_row(row) for row in record["rows"])
    notes = kept_notes(f"{stem}.md")
    with open(f"{stem}.md", "w") as file:
        file.write(f"""# The shapes text-to-image base: sample quality against the sampler

Command: `{record["command"]}`, on {record["device"]}. The base `{record["base"]}` generates one
image for each of the first {record["num_prompts"]} test captions per setting and guidance scale,
every one from the same initial latents; the attribute classifier `{record["classifier"]}` reads
them. Accuracy +- one binomial standard error; the paired columns are each row's accuracy minus that
of {record["reference"]} at the same scale, +- the standard error of the per-prompt differences;
Frechet distance in the classifier's features against the train split; seconds of generation on
this machine, compilation included.

| sampler | steps | guidance | UNet calls per image | shape | colour | position (one-object) | two-object shape | Frechet distance | shape paired | colour paired | seconds |
|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}

{notes}""")


def main(argv):
    del argv
    settings = [parsed_setting(setting) for setting in FLAGS.settings]
    scales = [parsed_scale(scale) for scale in FLAGS.guidance_scales]
    check(FLAGS.reference in FLAGS.settings, "--reference", FLAGS.reference, f"one of --settings {FLAGS.settings}")
    check(os.path.isfile(FLAGS.classifier), "--classifier", FLAGS.classifier, "a trained attribute classifier (.npz)")
    model, params = LatentDiffusion.load(FLAGS.base)
    os.makedirs(FLAGS.results, exist_ok=True)
    classifier = load_shapes_classifier(FLAGS.classifier, image_size=32)
    reference = feature_statistics(classifier, load_shapes("train")["image"])
    prompts = load_shapes("test")["caption"][: FLAGS.num_prompts]
    rows = []
    for scale in scales:
        scores = {}
        for setting, parsed in zip(FLAGS.settings, settings, strict=True):
            row, scores[setting] = quality_row(model, params, prompts, classifier, reference, *parsed, scale)
            rows.append(row)
            print(json.dumps({key: row[key] for key in ("sampler", "steps", "guidance_scale", "seconds")}), flush=True)
        for setting, row in zip(FLAGS.settings, rows[-len(settings) :], strict=True):
            row["minus_reference"] = {
                head: paired_difference(scores[setting][head], scores[FLAGS.reference][head]) for head in PAIRED_HEADS
            }
    write_report(
        {
            "command": " ".join(["python -m experiments.t2i_samplers", *sys.argv[1:]]),
            "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} cores",
            "base": FLAGS.base,
            "classifier": FLAGS.classifier,
            "num_prompts": len(prompts),
            "reference": FLAGS.reference,
            "rows": rows,
        }
    )


if __name__ == "__main__":
    app.run(main)
