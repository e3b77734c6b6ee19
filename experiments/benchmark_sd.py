"""Stable Diffusion 1.5 at full size with random weights: one UNet forward, and the guided pipeline.

--part=unet times one UNet2DConditionModel forward (64x64x4 latents, i.e. 512x512 images, 77
text tokens of width 768) at --batch_size; --part=pipeline times `evaluation.generate`'s jitted
core, text encoder + --steps guided DDIM steps (two UNet halves per step, one batched call) + VAE
decoder, and reports images/s. Both report XLA's FLOP count (cost analysis) and memory analysis of
the compiled function (for the pipeline, whose steps are a loop XLA counts once, plus the other
steps' UNet calls), the compile time apart from the run. The networks have SD-1.5's configs
(below) and random parameters in --dtype, in which they compute.

  python -m experiments.benchmark_sd --part=unet --dtype=float32 --out=experiments/results/sd_benchmark_cpu_unet_float32.json
  python -m experiments.benchmark_sd --part=pipeline --dtype=bfloat16 --batch_size=4 --steps=50 --out=...
"""

import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ddm_jax.diffusion.schedules import DiscreteBetas
from ddm_jax.evaluation.generate import sample_images
from ddm_jax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from ddm_jax.models.clip_tokenizer import END_OF_TEXT_ID, default_tokenizer
from ddm_jax.models.latent_diffusion import LatentDiffusion
from ddm_jax.training.sharding import batch_sharded, make_mesh, replicate

# stable-diffusion-v1-5's unet/, vae/ and text_encoder/ config.json (diffusers 0.6 / transformers
# 4.22 keys; every other key at the library's default): 859,520,964 + 83,653,863 + 123,060,480 parameters.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1.0,
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
    flip_sin_to_cos=True,
    freq_shift=0,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
PARAMETER_COUNTS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

flags.DEFINE_enum("part", "unet", ["unet", "pipeline"], "What to time.")
flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Parameters' and computation dtype.")
flags.DEFINE_integer("batch_size", 1, "Images per call.")
flags.DEFINE_integer("steps", 50, "--part=pipeline: DDIM steps.")
flags.DEFINE_float("guidance_scale", 7.5, "--part=pipeline: classifier-free guidance scale.")
flags.DEFINE_integer("repeats", 3, "Timed calls after one warm-up call; the median is reported.")
flags.DEFINE_string("out", None, "Write the figures to this JSON file.")
FLAGS = flags.FLAGS


def sd15_model(dtype) -> LatentDiffusion:
    """SD-1.5's three networks computing in `dtype`, with its scaled-linear eps schedule."""
    return LatentDiffusion(
        text_encoder=CLIPTextModel(**SD15_TEXT_ENCODER, dtype=dtype),
        unet=UNet2DConditionModel(**SD15_UNET, dtype=dtype),
        vae=AutoencoderKL(**SD15_VAE, dtype=dtype),
        schedule=DiscreteBetas(kind="scaled_linear", num_betas=1000, beta_start=0.00085, beta_end=0.012),
        tokenizer=default_tokenizer(),
        parameterization="eps",
        pad_token_id=END_OF_TEXT_ID,
    )


def random_params(model: LatentDiffusion, dtype) -> dict:
    """Random parameters of the model's shapes (traced, not compiled: compiling the full-size init
    takes minutes on a CPU): kernels and embeddings normal with variance 1 / fan-in, norm scales 1,
    biases 0, in `dtype`. Checks SD-1.5's parameter counts."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = path[-1].key
        if name == "bias":
            return jnp.zeros(leaf.shape, dtype)
        if name == "scale":
            return jnp.ones(leaf.shape, dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in), dtype)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    for name, count in PARAMETER_COUNTS.items():
        found = sum(x.size for x in jax.tree.leaves(params[name]))
        assert found == count, f"{name}: {found} parameters, SD-1.5 has {count}"
    return params


def cpu_name() -> str:
    """The processor's model name (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo") as file:
            return next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def analysis(compiled) -> dict:
    """XLA's FLOP count and memory analysis of a compiled function."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "peak_memory_in_bytes")
    return {"flops": float(cost["flops"]), **{f: getattr(memory, f, None) for f in fields}}


def timed(compiled, args, repeats: int) -> list[float]:
    """Seconds of `repeats` calls after one warm-up call."""
    jax.block_until_ready(compiled(*args))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        seconds.append(time.perf_counter() - start)
    return seconds


def guided_step_flops(model: LatentDiffusion, params, batch_size: int, guidance_scale: float) -> float:
    """XLA's FLOPs of one guided step's UNet call: on 2 B examples, or B when w is 1 or 0."""
    batch = batch_size if guidance_scale in (0.0, 1.0) else 2 * batch_size
    forward, args = unet_call(model, params, batch)
    return analysis(forward.lower(*args).compile())["flops"]


def unet_call(model: LatentDiffusion, params, batch_size: int):
    """(jitted forward, its arguments): the UNet at timestep 500 on 64x64x4 latents and 77 tokens."""
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((batch_size, 64, 64, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((batch_size, 77, 768)), jnp.float32)
    timesteps = jnp.full((batch_size,), 500.0)
    forward = jax.jit(lambda p, x, t, c: model.unet.apply({"params": p}, x, t, c))
    return forward, (params["unet"], latents, timesteps, context)


def pipeline_call(model: LatentDiffusion, params, batch_size: int, steps: int, guidance_scale: float):
    """(jitted pipeline core, its arguments) for batch_size prompts on a mesh of all devices."""
    mesh = make_mesh(np.gcd(batch_size, jax.device_count()))
    sharding = batch_sharded(mesh)
    prompts = [f"a photograph of an astronaut riding a horse, number {k}" for k in range(batch_size)]
    ids = jax.device_put((model.tokenize(prompts), model.tokenize([""] * batch_size)), sharding)
    settings = dict(
        model=model,
        guidance_scale=guidance_scale,
        sampler="ddim",
        steps=steps,
        latent_shape=model.latent_shape(),
        settings=(),
        batch_sharding=sharding,
    )
    core = jax.jit(lambda p, ids, null_ids, rng: sample_images(p, ids, null_ids, rng, **settings)[0])
    return core, (replicate(params, mesh), *ids, jax.random.key(0))


def main(argv):
    del argv
    dtype = DTYPES[FLAGS.dtype]
    model = sd15_model(dtype)
    start = time.perf_counter()
    params = random_params(model, dtype)
    init_seconds = time.perf_counter() - start
    if FLAGS.part == "unet":
        fn, args = unet_call(model, params, FLAGS.batch_size)
    else:
        fn, args = pipeline_call(model, params, FLAGS.batch_size, FLAGS.steps, FLAGS.guidance_scale)
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    seconds = timed(compiled, args, FLAGS.repeats)
    median = float(np.median(seconds))
    device = jax.devices()[0]
    result = {
        "command": " ".join(["python -m experiments.benchmark_sd", *sys.argv[1:]]),
        "part": FLAGS.part,
        "dtype": FLAGS.dtype,
        "batch_size": FLAGS.batch_size,
        "steps": FLAGS.steps if FLAGS.part == "pipeline" else None,
        "seconds": seconds,
        "median_seconds": median,
        "images_per_second": FLAGS.batch_size / median,
        "compile_seconds": compile_seconds,
        "init_seconds": init_seconds,
        **analysis(compiled),
        "device": f"{device.platform}: {device.device_kind}",
        "device_count": jax.device_count(),
        "cpu": f"{cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "jax": jax.__version__,
    }
    if FLAGS.part == "pipeline":
        # XLA counts a loop's body once: add the other steps' UNet calls.
        step_flops = guided_step_flops(model, params, FLAGS.batch_size, FLAGS.guidance_scale)
        result["flops"] += (FLAGS.steps - 1) * step_flops
        result["guided_step_flops"] = step_flops
    result["achieved_flops_per_second"] = result["flops"] / median
    print(json.dumps(result, indent=2))
    if FLAGS.out:
        with open(FLAGS.out, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    app.run(main)
