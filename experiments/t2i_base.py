"""The shapes text-to-image base, trained here from scratch and judged against its prompts.

Stages, each skipped when its output exists (so a killed run continues where it stopped):
  1. the VAE (--vae_config, configs/shapes_vae.py) in WORKDIR/vae, exported as a diffusers VAE
     (with --vae_only the run stops here, after scoring the VAE's reconstructions of test images,
     the most any latent model of it can score, in WORKDIR/vae_ceiling.json: first stages compared
     without training a second);
  2. the latent text-to-image model (--t2i_config, configs/shapes_t2i.py; its model.vae_folder set
     to stage 1's export) in WORKDIR/t2i, exported as a diffusers folder and copied to --base
     (workdirs/shapes_base by default), the folder every later experiment loads like an SD
     checkpoint;
  3. the attribute classifier --classifier names: by default the project's own,
     experiments/results/shapes_classifier.npz (trained by experiments/train_shapes_classifier.py,
     its record beside it), so that every record is judged by the same network; the scores kept
     in WORKDIR are marked with the classifier file's sha256 and the evaluation flags they used
     (`judgement`), and a run that asks for other ones is refused before training;
  4. evaluation: one image for each of --num_prompts held-out test captions at every guidance scale
     of --scales (the same initial noise at every scale), scored by the classifier for shape,
     colour, position and count (the stand-in for CLIP score), and the Frechet distance of the
     classifier's features against the train split (the stand-in for FID); every score also apart
     for the one- and the two-object prompts; a PNG grid per showcase prompt (rows: scales,
     columns: seeds); kept in WORKDIR (evaluation.json and the grids);
  5. variants (--variants, names of VARIANTS): the t2i stage again with one choice changed (the
     text encoder kept at its random initialisation, or trained first on the captions' labels and
     then frozen or trained on, instead of trained jointly from scratch; trained jointly at a tenth
     or three times the UNet's learning rate; the whole model at 2e-3 (the old recipe's twice) or
     4e-3; SD 2's v-prediction and v-MSE loss, its weighting alone, its parameterization alone, or
     SD 1's L_simple, instead of eps with Min-SNR-5; a UNet twice as wide for half the steps; a text
     encoder twice as deep; the UNet's attention in 2 heads for 4; or the recipe itself from another
     seed; or the recipe trained twice as long; a variant that changes nothing in --t2i_config is
     refused), each for the recipe's budget (but the last) in WORKDIR/<name>, scored as in 4 with
     paired per-prompt differences against the recipe's model; kept in WORKDIR/variant_<name>.json;
  6. prompt sensitivity of the recipe's model and of each variant: how far one changed word of a
     prompt moves the predicted clean latent, per attribute and noise level.
Writes RESULTS/t2i_base.{md,json} and t2i_base_prompt_*.png (--results, experiments/results by
default, whose committed t2i_base.md is an older recipe's record: give a new folder); reading
notes below the line "<!-- notes -->" of an existing t2i_base.md are kept.

  python -m experiments.t2i_base --workdir=workdirs/t2i_base --results=workdirs/t2i_base/results
"""

import copy
import functools
import hashlib
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ddm_jax.checks import check, check_choice
from ddm_jax.data import dataset_spec, load_split
from ddm_jax.data.shapes import caption_pair
from ddm_jax.evaluation import frechet
from ddm_jax.evaluation.generate import images_to_uint8
from ddm_jax.evaluation.images import image_grid, save_png, upscale_nearest
from ddm_jax.evaluation.prompt_sensitivity import clean_latent_change
from ddm_jax.evaluation.shapes_metrics import (
    feature_statistics,
    load_shapes,
    load_shapes_classifier,
    paired_difference,
    score_images,
    summaries,
)
from ddm_jax.models import save_diffusers
from ddm_jax.training import trainer
from ddm_jax.training.builders import build_latent_diffusion
from ddm_jax.training.experiment import Experiment
from ddm_jax.training.text_encoder_pretraining import (
    CaptionLabelModel,
    caption_labels,
    label_accuracy,
    pretrain_text_encoder,
)
from experiments.reports import kept_notes

config_flags.DEFINE_config_file("vae_config", "configs/shapes_vae.py", "Stage 1 (--vae_config.FIELD=VALUE overrides).")
config_flags.DEFINE_config_file("t2i_config", "configs/shapes_t2i.py", "Stage 2 (--t2i_config.FIELD=VALUE overrides).")
flags.DEFINE_string("workdir", "workdirs/t2i_base", "One sub-directory per stage (each resumed or skipped).")
flags.DEFINE_string("base", "workdirs/shapes_base", "Where the trained base goes, as a diffusers folder.")
flags.DEFINE_string("results", "experiments/results", "Where t2i_base.{md,json,png} go.")
flags.DEFINE_string(
    "classifier",
    "experiments/results/shapes_classifier.npz",
    "The attribute classifier (.npz) that judges the samples.",
)
flags.DEFINE_list("scales", ["1", "2", "4", "7.5"], "Guidance scales evaluated.")
flags.DEFINE_integer("num_prompts", 512, "Held-out test captions generated at every scale.")
flags.DEFINE_integer("num_showcase", 6, "Prompts shown as grids (rows: scales, columns: seeds).")
flags.DEFINE_integer("showcase_seeds", 6, "Images per scale in a showcase grid.")
flags.DEFINE_string("sampler", "dpm_solver_pp", "Sampler of the evaluation (a key of diffusion.SAMPLERS).")
flags.DEFINE_integer("steps", 25, "Its steps.")
flags.DEFINE_integer(
    "pretrain_steps", 1000, "Steps of the text encoder trained first (variant text_encoder_pretrained)."
)
flags.DEFINE_bool(
    "vae_only",
    False,
    "Train stage 1, score its reconstructions (WORKDIR/vae_ceiling.json) and stop: compares first stages.",
)
flags.DEFINE_list("variants", [], "Alternatives to the recipe trained and compared with it (names of VARIANTS).")
FLAGS = flags.FLAGS
TIMES = "stage_seconds.json"
EVALUATION = "evaluation.json"
VAE_CEILING = "vae_ceiling.json"
SAMPLING_FLAGS = ("num_prompts", "scales", "sampler", "steps")  # what a sample's score depends on
JUDGING_FLAGS = {VAE_CEILING: ("num_prompts",), EVALUATION: (*SAMPLING_FLAGS, "num_showcase", "showcase_seeds")}


def stage_times() -> dict:
    path = os.path.join(FLAGS.workdir, TIMES)
    if not os.path.isfile(path):
        return {}
    with open(path) as file:
        return json.load(file)


def record_time(stage: str, seconds: float) -> None:
    times = stage_times()
    times[stage] = times.get(stage, 0.0) + seconds
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(os.path.join(FLAGS.workdir, TIMES), "w") as file:
        json.dump(times, file, indent=2)


def train_stage(stage: str, config) -> dict:
    """Trains (or resumes) one stage and returns its final result, timing the part that trained
    (a finished stage's rerun only evaluates, and is not counted)."""
    start = time.time()
    result = trainer.train_and_evaluate(config, os.path.join(FLAGS.workdir, stage))
    if result["preempted"]:
        raise SystemExit(f"stage {stage}: stopped by SIGTERM at step {result['step']}; rerun to continue")
    if result["resumed_from"] < result["step"]:
        record_time(stage, time.time() - start)
    return result


def scalars(result: dict) -> dict:
    """The numbers of a stage's result (what a record keeps of it)."""
    return {key: value for key, value in result.items() if isinstance(value, (int, float))}


def export_folder(stage: str, config) -> str:
    return os.path.join(FLAGS.workdir, stage, "export", f"step_{config.training.num_steps}")


def ceilings(model, vae_params, data, classifier, num_examples: int, batch_size: int) -> dict:
    """The scores a perfect sampler would get: the classifier's on the first num_examples test images
    against their own captions, and on their reconstructions through the frozen VAE (posterior mean,
    decoded), which bound what any latent model of this VAE can show."""
    test = load_shapes(data.eval_split, data.dataset, data.data_dir)
    images, captions = test["image"][:num_examples], test["caption"][:num_examples]
    reconstruct = jax.jit(lambda vae, x: model.decode_latents(vae, model.encode_images(vae, x)))
    reconstructions = np.concatenate(
        [
            images_to_uint8(np.asarray(reconstruct(vae_params, images[i : i + batch_size] / 127.5 - 1.0)))
            for i in range(0, len(images), batch_size)
        ]
    )
    return {
        "test_images": summaries(score_images(classifier, images, captions), captions),
        "vae_reconstructions": summaries(score_images(classifier, reconstructions, captions), captions),
    }


def vae_ceiling(vae: dict, t2i_config, classifier_path: str) -> dict:
    """Stage 1 alone: its test PSNR and KL, and the `ceilings` of its reconstructions on the first
    --num_prompts test images (kept in WORKDIR/vae_ceiling.json)."""

    def score():
        model, loaded = build_latent_diffusion(t2i_config.model)
        classifier = load_shapes_classifier(classifier_path, image_size=32)
        scores = ceilings(
            model, loaded["vae"], t2i_config.data, classifier, FLAGS.num_prompts, t2i_config.eval.batch_size
        )
        return {"vae": scalars(vae), **scores}

    return judged(VAE_CEILING, classifier_path, score)


def scores_at_scales(task, params, prompts, classifier, reference) -> tuple[list[dict], dict]:
    """One image per prompt at every guidance scale of --scales (the same initial noise at each):
    rows of classifier scores and Frechet distance against `reference` (mean, covariance), and
    {scale: {head: Score}} for paired comparisons."""
    rows, correct = [], {}
    for scale in (float(s) for s in FLAGS.scales):
        images = task.generate(
            params, prompts, jax.random.PRNGKey(0), guidance_scale=scale, sampler=FLAGS.sampler, steps=FLAGS.steps
        )
        scores = score_images(classifier, images, prompts)
        distance = frechet.frechet_distance(*feature_statistics(classifier, images), *reference)
        rows.append({"guidance_scale": scale, **summaries(scores, prompts), "frechet_distance": distance})
        correct[scale] = scores
    return rows, correct


def judge(classifier_path: str, t2i_config):
    """The attribute classifier, its train-split feature statistics, and the first --num_prompts
    test captions."""
    classifier = load_shapes_classifier(classifier_path, image_size=32)
    reference = feature_statistics(classifier, load_shapes("train")["image"])
    data = t2i_config.data
    captions = load_split(dataset_spec(data.dataset), data.eval_split, data.data_dir, text_features=("caption",))
    return classifier, reference, list(captions["caption"][: FLAGS.num_prompts])


def cached(name: str, compute) -> dict:
    """The JSON WORKDIR/name, computed when missing."""
    path = os.path.join(FLAGS.workdir, name)
    if os.path.isfile(path):
        with open(path) as file:
            return json.load(file)
    result = compute()
    with open(path, "w") as file:
        json.dump(result, file, indent=2)
    return result


def file_sha256(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def judgement(name: str, classifier_path: str) -> dict:
    """What the scores kept in WORKDIR/name depend on besides the model: the classifier (its path
    and its file's sha256) and the flags of the evaluation that apply to them (JUDGING_FLAGS; a
    variant's: SAMPLING_FLAGS)."""
    return {
        "classifier": classifier_path,
        "classifier_sha256": file_sha256(classifier_path),
        **{flag: FLAGS[flag].value for flag in JUDGING_FLAGS.get(name, SAMPLING_FLAGS)},
    }


def judged(name: str, classifier_path: str, compute) -> dict:
    """`cached` scores, marked with their `judgement`."""
    return cached(name, lambda: {**compute(), **judgement(name, classifier_path)})


def judged_otherwise() -> dict:
    """{file: {key: (kept, asked)}} of the judged JSONs in WORKDIR whose classifier file or
    evaluation flags differ from this run's (a key missing from an older file differs too)."""
    names = [VAE_CEILING, EVALUATION, *(f"variant_{name}.json" for name in FLAGS.variants)]
    stale = {}
    for name in names:
        path = os.path.join(FLAGS.workdir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as file:
            kept = json.load(file)
        asked = judgement(name, FLAGS.classifier)
        differences = {key: (kept.get(key), value) for key, value in asked.items() if kept.get(key) != value}
        differences.pop("classifier", None)  # the same file elsewhere is the same judge
        if differences.pop("classifier_sha256", None):  # name the files, not their digests
            differences["classifier"] = (kept.get("classifier"), FLAGS.classifier)
        if differences:
            stale[name] = differences
    return stale


def restored(config, stage: str):
    """(step, task, the model's EMA parameters) of the latest checkpoint in WORKDIR/stage."""
    experiment = Experiment(config, os.path.join(FLAGS.workdir, stage))
    step, state = experiment.restore_latest("evaluate")
    return step, experiment.task, experiment.task.model_params(state.ema_params)


def grids_of_cached_evaluation() -> list[str]:
    """The showcase PNGs WORKDIR/EVALUATION names, or [] when it is not computed yet."""
    path = os.path.join(FLAGS.workdir, EVALUATION)
    if not os.path.isfile(path):
        return []
    with open(path) as file:
        return [os.path.join(FLAGS.workdir, item["png"]) for item in json.load(file)["showcase"]]


def evaluation_stage(t2i_config, classifier_path: str) -> dict:
    """Scores and Frechet distances at every guidance scale (kept in WORKDIR/EVALUATION); showcase grids
    (PNGs in WORKDIR, copied to --results with the report)."""

    def evaluate():
        start = time.time()
        step, task, params = restored(t2i_config, "t2i")
        classifier, reference, prompts = judge(classifier_path, t2i_config)
        rows, _ = scores_at_scales(task, params, prompts, classifier, reference)
        showcase = []
        for index, prompt in enumerate(prompts[: FLAGS.num_showcase]):
            grid_rows = [
                task.generate(
                    params,
                    [prompt] * FLAGS.showcase_seeds,
                    jax.random.PRNGKey(100 + index),
                    guidance_scale=float(scale),
                    sampler=FLAGS.sampler,
                    steps=FLAGS.steps,
                )
                for scale in FLAGS.scales
            ]
            png = f"t2i_base_prompt_{index}.png"
            save_png(
                os.path.join(FLAGS.workdir, png),
                upscale_nearest(image_grid(np.concatenate(grid_rows), ncols=FLAGS.showcase_seeds)),
            )
            showcase.append({"prompt": prompt, "png": png})
        record_time("evaluation", time.time() - start)
        return {
            "step": step,
            "rows": rows,
            "showcase": showcase,
            "num_prompts": len(prompts),
            "ceilings": ceilings(
                task.model, task.vae_params, task.config.data, classifier, len(prompts), task.config.eval.batch_size
            ),
        }

    return judged(EVALUATION, classifier_path, evaluate)


PRETRAINED_TEXT_ENCODER = "text_encoder_pretrained"  # WORKDIR/<this>: the text encoder trained first
TEXT_ENCODER_FOLDER = "model.text_encoder_folder"  # a variant setting it uses that stage
# Alternatives to the recipe's choices: config overrides, each trained as the t2i stage is.
VARIANTS = {
    "text_encoder_frozen": {"model.train_text_encoder": False},  # the text encoder kept at its random init
    "text_encoder_pretrained": {  # trained first on the captions' labels, then frozen (as SD keeps CLIP)
        TEXT_ENCODER_FOLDER: PRETRAINED_TEXT_ENCODER,  # relative to WORKDIR
        "model.train_text_encoder": False,
    },
    "text_encoder_pretrained_joint": {  # trained first, then on with the UNet
        TEXT_ENCODER_FOLDER: PRETRAINED_TEXT_ENCODER,
        "model.train_text_encoder": True,
    },
    # trained jointly at a tenth of the UNet's learning rate (a random frozen encoder keeps position)
    "text_encoder_slow": {"model.text_encoder_lr_scale": 0.1},
    # three times the UNet's learning rate (the slow one lost shape and colour: does a fast one gain?)
    "text_encoder_fast": {"model.text_encoder_lr_scale": 3.0},
    # both parts at twice the peak learning rate of the recipe until 2026-12-02, now the recipe's
    # (compare with the old one: --t2i_config.optimizer.lr=1e-3 --variants=twice_the_lr)
    "twice_the_lr": {"optimizer.lr": 2e-3},
    "lr_4e-3": {"optimizer.lr": 4e-3},  # twice the recipe's peak learning rate: does a higher one help further?
    "v_prediction": {"model.scheduler.prediction_type": "v_prediction", "model.weighting": "v_mse"},  # SD 2's loss
    # v predicted under the recipe's loss (Min-SNR-5 on the x0 scale): the parameterization alone
    "v_prediction_min_snr": {"model.scheduler.prediction_type": "v_prediction"},
    "min_snr": {"model.weighting": "min_snr"},  # Min-SNR-5 (the recipe's weighting)
    "l_simple": {"model.weighting": "simple"},  # SD 1's L_simple
    "v_mse": {"model.weighting": "v_mse"},  # v_prediction's weighting (1 + 1/SNR) on the eps error, eps predicted
    # a text encoder of 4 layers for 2: does depth bind each colour to its shape in two-object prompts?
    "deep_text_encoder": {"model.text_encoder.num_hidden_layers": 4},
    # the UNet's attention in 2 heads for 4 (heads of 16 and 32 dimensions for 8 and 16, the same
    # FLOPs): do wider heads bind each shape to its colour in two-object prompts?
    "two_attention_heads": {"model.unet.attention_head_dim": 2},
    "seed_1": {"training.seed": 1},  # the recipe from another seed: the spread of a single run
    "wide_unet": {  # a UNet twice as wide (3.2 times the FLOPs) for half the steps: the same wall time
        "model.unet.block_out_channels": (64, 128),
        "training.num_steps": 4500,
        "optimizer.decay_steps": 4500,
    },
    "twice_the_steps": {  # the recipe trained twice as long (beyond the hour): is it compute-bound?
        "training.num_steps": 18000,
        "optimizer.decay_steps": 18000,
    },
}


def parent_and_key(config, field: str):
    """The section of `config` holding the dotted `field`, and its last key."""
    *sections, key = field.split(".")
    return functools.reduce(lambda node, section: node[section], sections, config), key


def changes_recipe(t2i_config, name: str) -> bool:
    """Whether variant `name` sets some field of the recipe's config to another value."""
    sections = {field: parent_and_key(t2i_config, field) for field in VARIANTS[name]}
    return any(section[key] != VARIANTS[name][field] for field, (section, key) in sections.items())


def variant_config(t2i_config, name: str):
    config = copy.deepcopy(t2i_config)
    for field, value in VARIANTS[name].items():
        if field == TEXT_ENCODER_FOLDER:  # a stage of this script, trained when missing
            pretrained_text_encoder_stage(t2i_config)
            value = os.path.join(FLAGS.workdir, value)
        section, key = parent_and_key(config, field)
        section[key] = value
    return config


def pretrained_text_encoder_stage(t2i_config) -> dict:
    """The text encoder of t2i_config trained first on the train captions' labels
    (`training.text_encoder_pretraining`, --pretrain_steps steps of 256 captions), saved as the
    diffusers folder WORKDIR/PRETRAINED_TEXT_ENCODER; its label accuracy on the test captions
    (kept in WORKDIR/text_encoder_pretrained.json)."""

    def pretrain():
        start = time.time()
        model, _ = build_latent_diffusion(t2i_config.model)
        data = t2i_config.data
        tokens, labels = {}, {}
        for split in ("train", data.eval_split):
            captions = load_split(dataset_spec(data.dataset), split, data.data_dir, text_features=("caption",))
            tokens[split] = np.asarray(model.tokenize(list(captions["caption"])))
            labels[split] = caption_labels(captions["caption"])
        encoder_params, params = pretrain_text_encoder(
            model.text_encoder,
            tokens["train"],
            labels["train"],
            steps=FLAGS.pretrain_steps,
            batch_size=256,
            lr=1e-3,
            seed=0,
        )
        save_diffusers(
            os.path.join(FLAGS.workdir, PRETRAINED_TEXT_ENCODER), "text_encoder", model.text_encoder, encoder_params
        )
        accuracy = label_accuracy(
            CaptionLabelModel(model.text_encoder), params, tokens[data.eval_split], labels[data.eval_split]
        )
        record_time("text_encoder_pretraining", time.time() - start)
        return {"steps": FLAGS.pretrain_steps, "test_label_accuracy": accuracy}

    return cached(f"{PRETRAINED_TEXT_ENCODER}.json", pretrain)


def variants_stage(t2i_config, classifier_path: str) -> dict:
    """Each variant of --variants trained in WORKDIR/<name> (for the recipe's budget unless it
    changes the budget), alike in everything but its overrides, scored as the evaluation stage on
    the same prompts with the same noise, with per-prompt paired differences against the recipe's
    model (each kept in WORKDIR/variant_<name>.json)."""

    @functools.cache
    def judged_base():
        classifier, reference, prompts = judge(classifier_path, t2i_config)
        _, task, params = restored(t2i_config, "t2i")
        _, correct = scores_at_scales(task, params, prompts, classifier, reference)
        return classifier, reference, prompts, correct

    def compare(name: str) -> dict:
        classifier, reference, prompts, base_correct = judged_base()
        config = variant_config(t2i_config, name)
        train_stage(name, config)
        step, task, params = restored(config, name)
        rows, correct = scores_at_scales(task, params, prompts, classifier, reference)
        differences = {
            str(scale): {head: paired_difference(per_head[head], base_correct[scale][head]) for head in per_head}
            for scale, per_head in correct.items()
        }
        return {"overrides": VARIANTS[name], "step": step, "rows": rows, "minus_base": differences}

    return {
        name: judged(f"variant_{name}.json", classifier_path, functools.partial(compare, name))
        for name in FLAGS.variants
    }


SENSITIVITY_ATTRIBUTES = ("shape", "color", "size", "position", "texture", "background")
SENSITIVITY_TIMESTEPS = (900, 500, 100)  # SD's n: mostly noise, half-way, mostly signal
SENSITIVITY_PAIRS = 32  # caption pairs per attribute, each on its own held-out latent


def prompt_sensitivity(config, stage: str) -> dict:
    """{attribute: {n: sensitivity}} of the model trained in WORKDIR/stage: `clean_latent_change`
    for SENSITIVITY_PAIRS `caption_pair`s per attribute, on as many held-out latents (kept in
    WORKDIR/sensitivity_<stage>.json)."""
    return cached(f"sensitivity_{stage}.json", lambda: attribute_sensitivities(*restored(config, stage)[1:]))


def attribute_sensitivities(task, params) -> dict:
    num_pairs = SENSITIVITY_PAIRS
    latents = task.model.vae.scaling_factor * jnp.asarray(task.held_out["latent_mean"][:num_pairs])
    rng = np.random.default_rng(0)
    result = {}
    for attribute in SENSITIVITY_ATTRIBUTES:
        prompts, others = zip(*(caption_pair(attribute, rng) for _ in range(num_pairs)), strict=True)
        changes = clean_latent_change(
            task.model, params, latents, prompts, others, SENSITIVITY_TIMESTEPS, jax.random.PRNGKey(0)
        )
        result[attribute] = {str(n): change for n, change in changes.items()}
    return result


def sensitivity_section(sensitivities: dict) -> str:
    header = " | ".join(f"n = {n}" for n in SENSITIVITY_TIMESTEPS)
    rows = "\n".join(
        f"| {name} | {attribute} | " + " | ".join(f"{values[str(n)]:.4f}" for n in SENSITIVITY_TIMESTEPS) + " |"
        for name, by_attribute in sensitivities.items()
        for attribute, values in by_attribute.items()
    )
    return f"""
Prompt sensitivity (`evaluation.prompt_sensitivity`): the RMS change of the predicted clean
latent x0_hat (the scaled latents have RMS about 1) when one word of a one-object prompt "a
{{size}} {{colour}} {{shape}}{{texture}} {{position}}, on a {{background}} background" changes
(`shapes.caption_pair`, {SENSITIVITY_PAIRS} random pairs per word), at SD's timestep n, on as many
held-out latents noised with the same eps. A word the model does not use moves nothing.

| model | changed word | {header} |
|---|---|{"---|" * len(SENSITIVITY_TIMESTEPS)}
{rows}
"""


HEADS_SHOWN = (("shapes", "shape"), ("colors", "colour"), ("position", "position"), ("num_objects", "count"))


def accuracy_cells(scores: dict) -> str:
    return " | ".join(
        f"{scores[head]['accuracy']:.3f} +- {scores[head]['standard_error']:.3f}" for head, _ in HEADS_SHOWN
    )


def scale_rows(rows: list[dict], prefix: str = "") -> str:
    return "\n".join(
        f"| {prefix}{row['guidance_scale']:g} | {accuracy_cells(row['scores'])} | {row['frechet_distance']:.2f} |"
        for row in rows
    )


def object_count_section(record: dict) -> str:
    evaluation = record["evaluation"]
    models = {"recipe": evaluation["rows"], **{name: variant["rows"] for name, variant in record["variants"].items()}}
    lines = [
        f"| {name.replace('_', ' ')} | | {object_count_cells(ceiling['by_objects'])} |"
        for name, ceiling in evaluation["ceilings"].items()
    ] + [
        f"| {name} | {row['guidance_scale']:g} | {object_count_cells(row['by_objects'])} |"
        for name, rows in models.items()
        for row in rows
    ]
    by_objects = evaluation["ceilings"]["test_images"]["by_objects"]
    counts = {key: scores["shapes"]["count"] for key, scores in by_objects.items()}
    return f"""
The same scores apart for the prompts that ask for one object ({counts["1"]} of them) and for two
({counts["2"]}): a two-object prompt is right on shape only when both shapes are, on colour when both
colours are.

| images or model | guidance scale | shape, one object | shape, two objects | colour, one object | colour, two objects |
|---|---|---|---|---|---|
{chr(10).join(lines)}
"""


def object_count_cells(by_objects: dict) -> str:
    return " | ".join(
        f"{by_objects[count][head]['accuracy']:.3f} +- {by_objects[count][head]['standard_error']:.3f}"
        for head in ("shapes", "colors")
        for count in ("1", "2")
    )


def variants_section(variants: dict) -> str:
    if not variants:
        return ""
    rows = "\n".join(scale_rows(variant["rows"], f"{name} | ") for name, variant in variants.items())
    differences = "\n".join(
        f"| {name} - recipe | {float(scale):g} | "
        + " | ".join(f"{d[head]['difference']:+.3f} +- {d[head]['standard_error']:.3f}" for head, _ in HEADS_SHOWN)
        + " | |"
        for name, variant in variants.items()
        for scale, d in variant["minus_base"].items()
    )
    overrides = "; ".join(
        f"{name}: " + ", ".join(f"`{field}={value!r}`" for field, value in variant["overrides"].items())
        for name, variant in variants.items()
    )
    return f"""
Variants: the latent model trained again with one choice changed, for the same budget (steps, or wall time) unless the choice is the budget ({overrides}; a
folder is relative to WORKDIR),
everything else alike, scored as above on the same prompts with the same noise; the differences
from the recipe's model are paired per prompt, +- the standard error of their mean.

| variant | guidance scale | shape | colour | position | count | Frechet distance |
|---|---|---|---|---|---|---|
{rows}
{differences}
"""


def write_report(record: dict) -> None:
    stem = os.path.join(FLAGS.results, "t2i_base")
    with open(f"{stem}.json", "w") as file:
        json.dump(record, file, indent=2)
    for item in record["evaluation"]["showcase"]:
        shutil.copy(os.path.join(FLAGS.workdir, item["png"]), FLAGS.results)
    table = scale_rows(record["evaluation"]["rows"])
    ceiling_rows = "\n".join(
        f"| {name.replace('_', ' ')} | {accuracy_cells(ceiling['scores'])} | |"
        for name, ceiling in record["evaluation"]["ceilings"].items()
    )
    showcase = "\n".join(
        f'- "{item["prompt"]}": ![prompt {i}]({item["png"]})' for i, item in enumerate(record["evaluation"]["showcase"])
    )
    times = "\n".join(f"| {stage} | {seconds / 60:.1f} |" for stage, seconds in record["stage_seconds"].items())
    vae = record["vae"]
    notes = kept_notes(f"{stem}.md")
    with open(f"{stem}.md", "w") as file:
        file.write(f"""# A text-to-image base trained here: shapes, Stable Diffusion's layout

Command: `{record["command"]}`, on {record["device"]}, 2 cores. The base is the diffusers folder
`{record["base"]}` (the configs: {record["configs"]}).

VAE (stage 1, {vae["step"]} steps): test PSNR {vae["psnr"]:.2f} +- {vae["psnr_stderr"]:.2f} dB over
{vae["num_examples"]} images (reconstructions from the posterior mean, 8-bit); KL to N(0, I)
{vae["kl_nats"]:.1f} nats per image, reconstruction {vae["reconstruction_nats"]:.0f} nats (decoder std
{record["decoder_std"]}); latent scaling factor {vae["scaling_factor"]:.4f}.

Text-to-image model (stage 2, {record["evaluation"]["step"]} steps): one image for each of the first
{record["evaluation"]["num_prompts"]} test captions at each guidance scale ({FLAGS.sampler}, {FLAGS.steps}
steps, the same initial noise at every scale), read by the attribute classifier
`{record["evaluation"]["classifier"]}` (its accuracy on real images: experiments/results/shapes_classifier.md). Accuracy +- one binomial standard error; Frechet distance
in the classifier's penultimate features against the train split.

| guidance scale | shape | colour | position (one-object prompts) | count | Frechet distance |
|---|---|---|---|---|---|
{table}

The same first {record["evaluation"]["num_prompts"]} test examples, scored against their own captions: what
a perfect sampler would reach with a perfect decoder (test images), and with this VAE
(reconstructions from the posterior mean):

| images | shape | colour | position | count | |
|---|---|---|---|---|---|
{ceiling_rows}
{object_count_section(record)}{variants_section(record["variants"])}{sensitivity_section(record["prompt_sensitivity"])}
| stage | wall minutes |
|---|---|
{times}

Showcase (rows: guidance scales {", ".join(FLAGS.scales)}; columns: seeds):
{showcase}

{notes}""")


def main(argv):
    del argv
    for name in FLAGS.variants:
        check_choice("--variants", name, VARIANTS)
        check(changes_recipe(FLAGS.t2i_config, name), "--variants", name, "a variant that changes --t2i_config")
    check(
        os.path.isfile(FLAGS.classifier),
        "--classifier",
        FLAGS.classifier,
        "a trained attribute classifier (.npz; experiments/train_shapes_classifier.py)",
    )
    stale = judged_otherwise()
    check(
        not stale,
        "--workdir",
        FLAGS.workdir,
        f"scores judged as this run asks, not {stale} ((kept, asked)); delete those files to score again",
    )
    missing = [path for path in grids_of_cached_evaluation() if not os.path.isfile(path)]
    check(
        not missing,
        "--workdir",
        FLAGS.workdir,
        f"the grids its {EVALUATION} names ({missing}); delete it to evaluate again",
    )
    os.makedirs(FLAGS.results, exist_ok=True)  # before hours of training, not after them
    vae_config = FLAGS.vae_config
    vae = train_stage("vae", vae_config)
    t2i_config = FLAGS.t2i_config
    t2i_config.model.vae_folder = export_folder("vae", vae_config)
    if FLAGS.vae_only:
        print(json.dumps(vae_ceiling(vae, t2i_config, FLAGS.classifier), indent=2))
        return
    t2i = train_stage("t2i", t2i_config)
    if not os.path.exists(FLAGS.base):
        shutil.copytree(export_folder("t2i", t2i_config), FLAGS.base)
    evaluation = evaluation_stage(t2i_config, FLAGS.classifier)
    variants = variants_stage(t2i_config, FLAGS.classifier)
    models = {"recipe": ("t2i", t2i_config), **{name: (name, variant_config(t2i_config, name)) for name in variants}}
    sensitivity = {name: prompt_sensitivity(config, stage) for name, (stage, config) in models.items()}
    with open(os.path.join(export_folder("vae", vae_config), "vae", "config.json")) as file:
        scaling_factor = json.load(file)["scaling_factor"]
    record = {
        "command": " ".join(["python -m experiments.t2i_base", *sys.argv[1:]]),
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        "base": FLAGS.base,
        "configs": " then ".join(
            config_flags.get_config_filename(FLAGS[name]) for name in ("vae_config", "t2i_config")
        ),
        "decoder_std": vae_config.model.decoder_std,
        "vae": {**scalars(vae), "scaling_factor": scaling_factor},
        "t2i": scalars(t2i),
        "evaluation": evaluation,
        "variants": variants,
        "text_encoder_pretraining": pretrained_text_encoder_stage(t2i_config)
        if any(TEXT_ENCODER_FOLDER in VARIANTS[name] for name in variants)
        else None,
        "prompt_sensitivity": sensitivity,
        "stage_seconds": stage_times(),
    }
    write_report(record)
    print(json.dumps(record["evaluation"]["rows"], indent=2))


if __name__ == "__main__":
    app.run(main)
