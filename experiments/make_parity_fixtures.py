"""PyTorch reference fixtures for ddm_jax's Stable Diffusion models, and a check that
diffusers opens what ddm_jax saves.

Runs in the parity virtual environment (torch, diffusers, transformers; the `parity` extra),
never in the project's own:

    python3 -m venv .venv-parity
    .venv-parity/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    .venv-parity/bin/pip install diffusers transformers safetensors numpy
    .venv-parity/bin/python experiments/make_parity_fixtures.py            # writes tests/fixtures/
    .venv-parity/bin/python experiments/make_parity_fixtures.py --verify-save

The default mode builds, for each SD family, tiny random-weight diffusers/transformers
models (UNet2DConditionModel, AutoencoderKL, CLIPTextModel; fixed torch seed), saves them in
diffusers format under tests/fixtures/<family>/ with a DDIMScheduler config, and records
fixed inputs and PyTorch's outputs (NCHW turned into NHWC) in reference_outputs.npz:

  text_input_ids [2, 77]; text_last_hidden, text_penultimate (clip skip 1) [2, 77, D];
  text_pooled [2, D];
  vae_image [2, 16, 16, 3]; vae_mean, vae_logvar [2, 8, 8, 4]; vae_latent; vae_decoded;
  unet_sample [2, 8, 8, 4]; unet_timesteps [2]; unet_context [2, 77, D]; unet_out;
  unet_down_residual_<i>, unet_mid_residual, unet_out_residuals (ControlNet residuals);
  cfg_*: one classifier-free-guided DDIM step (Ho & Salimans, 2022; Song et al., 2021):
  cfg_latents [1, 8, 8, 4], cfg_timestep, cfg_prev_timestep, cfg_num_inference_steps,
  cfg_guidance_scale (7.5), cfg_cond_ids / cfg_uncond_ids, cfg_cond_embeddings /
  cfg_uncond_embeddings [1, 77, D], cfg_noise_pred_uncond / cfg_noise_pred_cond (the UNet's
  two halves of the batch), cfg_next_latents (DDIMScheduler.step's prev_sample, eta 0).

`--verify-save` runs ddm_jax (in the project's venv, through a subprocess) to draw random
Flax parameters for every fixture component, save them with `save_diffusers` and record
the Flax outputs; then opens those folders with diffusers/transformers' from_pretrained
and prints the largest relative difference of each output (which must stay below 1e-5). It
also checks that ddm_jax's key map gives exactly the torch keys and shapes of full-size
SD-1.5/2.1 components (built on torch's meta device). It exits with status 1 on a failure.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
GUIDANCE_SCALE = 7.5
NUM_INFERENCE_STEPS = 10
SEQUENCE_LENGTH = 77

# Two tiny families: SD-1.x's layout (1x1-conv projections, quick_gelu, epsilon prediction)
# and SD-2.x's (linear projections, gelu, per-block head counts, v-prediction).
FAMILIES = {
    "sd1_tiny": dict(
        unet=dict(
            sample_size=8,
            block_out_channels=(4, 8),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            norm_num_groups=2,
            cross_attention_dim=16,
            attention_head_dim=2,
        ),
        vae=dict(
            sample_size=16,
            block_out_channels=(4, 8),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=2,
        ),
        text_encoder=dict(
            vocab_size=1000,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=SEQUENCE_LENGTH,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=2,  # SD-1.x's text_encoder/config.json: pooled at the largest token id
            pad_token_id=1,
        ),
        prediction_type="epsilon",
        text_model_prefix=True,  # keys as transformers 4 wrote SD-1.x/2.x's text encoders
    ),
    "sd2_tiny": dict(
        unet=dict(
            sample_size=8,
            block_out_channels=(4, 8),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=(1, 2),
            transformer_layers_per_block=(1, 2),
            norm_num_groups=2,
            cross_attention_dim=16,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            upcast_attention=True,
        ),
        vae=dict(
            sample_size=16,
            block_out_channels=(4, 8),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=2,
        ),
        text_encoder=dict(
            vocab_size=1000,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=SEQUENCE_LENGTH,
            hidden_act="gelu",
            bos_token_id=998,
            eos_token_id=999,  # pooled at the first EOS
            pad_token_id=0,
        ),
        prediction_type="v_prediction",
        text_model_prefix=False,  # keys as transformers >= 5 writes them
    ),
}


# Full-size components (configs of the Hub's SD-1.5 and SD-2.1 folders) whose torch keys
# and shapes --verify-save compares with ddm_jax's key map, without building weights.
FULL_SIZE = {
    "sd15_unet": ("unet", dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)),
    "sd21_unet": (
        "unet",
        dict(
            sample_size=96,
            cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20],
            use_linear_projection=True,
            upcast_attention=True,
        ),
    ),
    "sd_vae": (
        "vae",
        dict(
            block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2,
            sample_size=512,
        ),
    ),
    "clip_vit_l14": (
        "text_encoder",
        dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768),
    ),
    "openclip_vit_h14": (
        "text_encoder",
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            hidden_act="gelu",
            projection_dim=1024,
        ),
    ),
}
SAVE_TOLERANCE = 1e-5


def scheduler_config(prediction_type: str) -> dict:
    """Stable Diffusion's DDIM schedule: scaled-linear betas 0.00085..0.012 over 1000 steps."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )


def nhwc(x) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).numpy()


def nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def jitter_vectors(model, generator) -> None:
    """Adds N(0, 0.1^2) noise to every 1-D parameter (norm scales and shifts, biases), so
    that norms are not the identity at init and a swapped scale/shift would show."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def token_ids(rng: np.random.Generator, batch: int, text: dict) -> np.ndarray:
    """[bos, random tokens, eos, pad, ...] rows of SEQUENCE_LENGTH ids, of random lengths."""
    ids = np.full((batch, SEQUENCE_LENGTH), text["pad_token_id"], np.int64)
    for row in ids:
        n = rng.integers(3, 20)
        row[0] = text["bos_token_id"]
        row[1 : n + 1] = rng.integers(3, text["vocab_size"] - 3, n)
        row[n + 1] = text["eos_token_id"]
    return ids


def build_models(family: dict, seed: int):
    """The family's (unet, vae, text_encoder), random from torch seed `seed`."""
    import torch

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    models = tuple(torch_model(component, family[component]) for component in ("unet", "vae", "text_encoder"))
    for model in models:
        jitter_vectors(model, generator)
        model.eval()
    return models


def text_outputs(text_encoder, ids: np.ndarray) -> dict:
    import torch

    out = text_encoder(torch.from_numpy(ids), output_hidden_states=True)
    final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 4 or 5
    penultimate = final_layer_norm(out.hidden_states[-2])  # diffusers' clip_skip=1
    return dict(
        text_input_ids=ids.astype(np.int32),
        text_last_hidden=out.last_hidden_state.numpy(),
        text_penultimate=penultimate.numpy(),
        text_pooled=out.pooler_output.numpy(),
    )


def vae_outputs(vae, rng: np.random.Generator) -> dict:
    image = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    latent = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    posterior = vae.encode(nchw(image)).latent_dist
    return dict(
        vae_image=image,
        vae_mean=nhwc(posterior.mean),
        vae_logvar=nhwc(posterior.logvar),
        vae_latent=latent,
        vae_decoded=nhwc(vae.decode(nchw(latent)).sample),
    )


def unet_outputs(unet, rng: np.random.Generator) -> dict:
    import torch

    sample = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    timesteps = np.array([999, 37], np.int64)
    context = rng.standard_normal((2, SEQUENCE_LENGTH, unet.config.cross_attention_dim)).astype(np.float32)
    args = (nchw(sample), torch.from_numpy(timesteps), torch.from_numpy(context))
    out = dict(
        unet_sample=sample,
        unet_timesteps=timesteps.astype(np.int32),
        unet_context=context,
        unet_out=nhwc(unet(*args).sample),
    )
    down_shapes = skip_shapes(unet, sample)
    down = [0.5 * rng.standard_normal(shape).astype(np.float32) for shape in down_shapes]
    mid = 0.5 * rng.standard_normal(down_shapes[-1]).astype(np.float32)  # the mid block keeps the last shape
    residual_out = unet(
        *args,
        down_block_additional_residuals=tuple(nchw(r) for r in down),
        mid_block_additional_residual=nchw(mid),
    ).sample
    out.update({f"unet_down_residual_{i}": r for i, r in enumerate(down)})
    out.update(unet_mid_residual=mid, unet_out_residuals=nhwc(residual_out))
    return out


def skip_shapes(unet, sample: np.ndarray) -> list[tuple[int, ...]]:
    """NHWC shapes of the down path's skip states (diffusers' down_block_res_samples)."""
    batch, size = sample.shape[0], sample.shape[1]
    widths, layers = unet.config.block_out_channels, unet.config.layers_per_block
    layers = [layers] * len(widths) if isinstance(layers, int) else list(layers)
    shapes = [(batch, size, size, widths[0])]
    for i, width in enumerate(widths):
        shapes += [(batch, size, size, width)] * layers[i]
        if i < len(widths) - 1:
            size //= 2
            shapes.append((batch, size, size, width))
    return shapes


def guided_ddim_step(unet, text_encoder, scheduler, family: dict, rng: np.random.Generator) -> dict:
    """One classifier-free-guided DDIM step from the third of NUM_INFERENCE_STEPS timesteps."""
    import torch

    text = family["text_encoder"]
    cond_ids = token_ids(rng, 1, text)
    uncond_ids = np.full((1, SEQUENCE_LENGTH), text["pad_token_id"], np.int64)
    uncond_ids[0, :2] = text["bos_token_id"], text["eos_token_id"]
    cond = text_encoder(torch.from_numpy(cond_ids)).last_hidden_state
    uncond = text_encoder(torch.from_numpy(uncond_ids)).last_hidden_state
    latents = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    t = scheduler.timesteps[2]
    prev_t = t - scheduler.config.num_train_timesteps // NUM_INFERENCE_STEPS
    x = nchw(latents)
    noise_pred = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
    pred_uncond, pred_cond = noise_pred.chunk(2)
    guided = pred_uncond + GUIDANCE_SCALE * (pred_cond - pred_uncond)
    next_latents = scheduler.step(guided, t, x, eta=0.0).prev_sample
    return dict(
        cfg_latents=latents,
        cfg_timestep=np.int32(t),
        cfg_prev_timestep=np.int32(prev_t),
        cfg_num_inference_steps=np.int32(NUM_INFERENCE_STEPS),
        cfg_guidance_scale=np.float32(GUIDANCE_SCALE),
        cfg_cond_ids=cond_ids.astype(np.int32),
        cfg_uncond_ids=uncond_ids.astype(np.int32),
        cfg_cond_embeddings=cond.numpy(),
        cfg_uncond_embeddings=uncond.numpy(),
        cfg_noise_pred_uncond=nhwc(pred_uncond),
        cfg_noise_pred_cond=nhwc(pred_cond),
        cfg_next_latents=nhwc(next_latents),
    )


def make_fixture(name: str, family: dict, seed: int) -> None:
    import torch
    from diffusers import DDIMScheduler

    folder = FIXTURES / name
    unet, vae, text_encoder = build_models(family, seed)
    scheduler = DDIMScheduler(**scheduler_config(family["prediction_type"]))
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        outputs = text_outputs(text_encoder, token_ids(rng, 2, family["text_encoder"]))
        outputs |= vae_outputs(vae, rng)
        outputs |= unet_outputs(unet, rng)
        outputs |= guided_ddim_step(unet, text_encoder, scheduler, family, rng)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    if family["text_model_prefix"]:
        add_text_model_prefix(folder / "text_encoder" / "model.safetensors")
    scheduler.save_config(folder / "scheduler")
    np.savez_compressed(folder / "reference_outputs.npz", **outputs)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"{name}: {len(outputs)} arrays, {size / 1024:.0f} KB in {folder.relative_to(ROOT)}")


def add_text_model_prefix(file: pathlib.Path) -> None:
    """Renames every key k of a CLIPTextModel file to text_model.k, the layout of the text
    encoders of SD-1.x/2.x on the Hub (transformers >= 5 reads both, and writes without)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    renamed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()}
    save_file(renamed, file, metadata={"format": "pt"})


def relative_error(found: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(found - expected)) / np.max(np.abs(expected)))


def torch_model(component: str, config: dict):
    """A diffusers/transformers model of `component` built from `config` (on torch's meta
    device when called under `torch.device("meta")`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if component == "text_encoder":
        return CLIPTextModel(CLIPTextConfig(**config))
    return {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[component](**config)


def torch_state_shapes(component: str, model) -> dict[str, list[int]]:
    """state-dict key -> shape, text-encoder keys under text_model. as SD checkpoints store them."""
    prefix = "text_model." if component == "text_encoder" and not hasattr(model, "text_model") else ""
    return {prefix + key: list(value.shape) for key, value in model.state_dict().items() if "position_ids" not in key}


def verify_save(jax_python: str) -> None:
    """diffusers/transformers load folders written by ddm_jax's save_diffusers and reproduce
    the Flax outputs recorded next to them; ddm_jax's key map gives exactly the keys and
    shapes of the full-size SD-1.5/2.1 components. Exits with status 1 otherwise."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([jax_python, __file__, "--jax-save", tmp], check=True, cwd=ROOT)
        for name in FAMILIES:
            folder = pathlib.Path(tmp) / name
            ref = np.load(folder / "flax_outputs.npz")
            unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
            vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
            text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
            with torch.no_grad():
                found = dict(
                    text_last_hidden=text_encoder(
                        torch.from_numpy(ref["text_input_ids"].astype(np.int64))
                    ).last_hidden_state.numpy(),
                    vae_mean=nhwc(vae.encode(nchw(ref["vae_image"])).latent_dist.mean),
                    vae_decoded=nhwc(vae.decode(nchw(ref["vae_latent"])).sample),
                    unet_out=nhwc(
                        unet(
                            nchw(ref["unet_sample"]),
                            torch.from_numpy(ref["unet_timesteps"].astype(np.int64)),
                            torch.from_numpy(ref["unet_context"]),
                        ).sample
                    ),
                )
            for key, value in found.items():
                error = relative_error(value, ref[key])
                print(f"{name} {key}: max relative difference {error:.2e} (torch on the saved folder vs Flax)")
                if not error < SAVE_TOLERANCE:
                    failures.append(f"{name} {key}")
        flax_shapes = json.loads((pathlib.Path(tmp) / "full_size_shapes.json").read_text())
    for name, (component, config) in FULL_SIZE.items():
        with torch.device("meta"):
            expected = torch_state_shapes(component, torch_model(component, config))
        agree = flax_shapes[name] == expected
        print(f"full-size {name}: {len(expected)} torch keys; ddm_jax's key map and shapes agree: {agree}")
        if not agree:
            failures.append(f"{name}: {sorted(set(expected) ^ set(flax_shapes[name]))[:10]}")
    if failures:
        sys.exit(f"failed: {failures}")


def jax_save(out: str) -> None:
    """(Project venv.) Random Flax parameters for every fixture component, saved with
    save_diffusers, and the Flax outputs on the fixture's recorded inputs; the torch keys
    and shapes ddm_jax maps the FULL_SIZE components to."""
    import jax

    from ddm_jax.models import load_diffusers, save_diffusers
    from ddm_jax.models.diffusers_io import COMPONENTS, module_from_config, torch_shapes

    for seed, name in enumerate(FAMILIES):
        ref = np.load(FIXTURES / name / "reference_outputs.npz")
        keys = ("text_input_ids", "vae_image", "vae_latent", "unet_sample", "unet_timesteps", "unet_context")
        outputs = {key: ref[key] for key in keys}
        for i, component in enumerate(("text_encoder", "vae", "unet")):
            module, _ = load_diffusers(FIXTURES / name, component)
            params = module.init(jax.random.key(100 * seed + i), *module.example_inputs())["params"]
            save_diffusers(pathlib.Path(out) / name, component, module, params)
            variables = {"params": params}
            if component == "text_encoder":
                outputs["text_last_hidden"] = module.apply(variables, outputs["text_input_ids"])
            elif component == "vae":
                outputs["vae_mean"] = module.apply(variables, outputs["vae_image"], method="encode")[0]
                outputs["vae_decoded"] = module.apply(variables, outputs["vae_latent"], method="decode")
            else:
                outputs["unet_out"] = module.apply(
                    variables, outputs["unet_sample"], outputs["unet_timesteps"], outputs["unet_context"]
                )
        np.savez(pathlib.Path(out) / name / "flax_outputs.npz", **{k: np.asarray(v) for k, v in outputs.items()})
    shapes = {
        name: {
            key: list(shape)
            for key, (_, shape) in torch_shapes(
                module_from_config(component, config), COMPONENTS[component].prefix
            ).items()
        }
        for name, (component, config) in FULL_SIZE.items()
    }
    (pathlib.Path(out) / "full_size_shapes.json").write_text(json.dumps(shapes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verify-save", action="store_true", help="check that diffusers opens save_diffusers' output")
    parser.add_argument("--jax-python", default=str(ROOT / ".venv" / "bin" / "python"), help="the project's python")
    parser.add_argument("--jax-save", metavar="DIR", help=argparse.SUPPRESS)  # the project-venv half of --verify-save
    args = parser.parse_args()
    if args.jax_save:
        jax_save(args.jax_save)
    elif args.verify_save:
        verify_save(args.jax_python)
    else:
        for seed, (name, family) in enumerate(FAMILIES.items()):
            make_fixture(name, family, seed)


if __name__ == "__main__":
    sys.exit(main())
