"""Stable Diffusion models (UNet2DConditionModel, AutoencoderKL, CLIPTextModel) against
PyTorch, and their diffusers checkpoint I/O.

The fixtures tests/fixtures/sd1_tiny and sd2_tiny are tiny random-weight models written by
diffusers/transformers, with PyTorch's outputs on fixed inputs in reference_outputs.npz
(experiments/make_parity_fixtures.py); no torch is needed here.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from ddm_jax.checks import ArgumentError
from ddm_jax.models import load_diffusers, sample_latent, save_diffusers
from ddm_jax.models.clip_text import pooled_output
from ddm_jax.models.diffusers_io import module_config
from ddm_jax.models.sd_layers import Dense

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FAMILIES = ("sd1_tiny", "sd2_tiny")
COMPONENTS = ("text_encoder", "vae", "unet")
WEIGHTS = {
    "text_encoder": "model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "unet": "diffusion_pytorch_model.safetensors",
}
RTOL = 1e-5  # float32 parity with PyTorch, relative to the largest reference value


def relative_error(found, expected) -> float:
    return float(np.max(np.abs(np.asarray(found, np.float64) - expected)) / np.max(np.abs(expected)))


def assert_close(found, expected) -> None:
    assert np.shape(found) == np.shape(expected)
    assert relative_error(found, expected) < RTOL


def assert_trees_bitwise_equal(a, b) -> None:
    a, b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert a.keys() == b.keys()
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), key


class Family:
    """One fixture's reference outputs, its three loaded components and their jitted calls
    (each compiled once for the module)."""

    def __init__(self, name: str):
        self.name = name
        self.folder = FIXTURES / name
        self.ref = np.load(self.folder / "reference_outputs.npz")
        self.text_encoder, self.text_params = load_diffusers(self.folder, "text_encoder")
        self.vae, self.vae_params = load_diffusers(self.folder, "vae")
        self.unet, self.unet_params = load_diffusers(self.folder, "unet")
        te, vae, unet = self.text_encoder, self.vae, self.unet
        self.encode_text = jax.jit(
            lambda p, ids, clip_skip: te.apply({"params": p}, ids, clip_skip=clip_skip), static_argnums=2
        )
        self.encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))
        self.decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
        self.predict = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
        self.predict_controlled = jax.jit(
            lambda p, x, t, c, down, mid: unet.apply({"params": p}, x, t, c, down_residuals=down, mid_residual=mid)
        )

    def unet_inputs(self):
        return self.unet_params, self.ref["unet_sample"], self.ref["unet_timesteps"], self.ref["unet_context"]

    def residuals(self):
        down = [self.ref[f"unet_down_residual_{i}"] for i in range(self.unet.num_down_residuals())]
        return down, self.ref["unet_mid_residual"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> Family:
    return Family(request.param)


# Parity with PyTorch.


def test_text_encoder_matches_transformers(family):
    ref = family.ref
    hidden = family.encode_text(family.text_params, ref["text_input_ids"], 0)
    assert_close(hidden, ref["text_last_hidden"])
    assert_close(family.encode_text(family.text_params, ref["text_input_ids"], 1), ref["text_penultimate"])
    pooled = pooled_output(hidden, ref["text_input_ids"], family.text_encoder.eos_token_id)
    assert_close(pooled, ref["text_pooled"])


def test_vae_matches_diffusers(family):
    ref = family.ref
    mean, logvar = family.encode(family.vae_params, ref["vae_image"])
    assert_close(mean, ref["vae_mean"])
    assert_close(logvar, ref["vae_logvar"])
    assert_close(family.decode(family.vae_params, ref["vae_latent"]), ref["vae_decoded"])
    assert (
        family.vae.scaling_factor == json.loads((family.folder / "vae" / "config.json").read_text())["scaling_factor"]
    )


def test_unet_matches_diffusers(family):
    assert_close(family.predict(*family.unet_inputs()), family.ref["unet_out"])


def test_unet_with_controlnet_residuals_matches_diffusers(family):
    found = family.predict_controlled(*family.unet_inputs(), *family.residuals())
    assert_close(found, family.ref["unet_out_residuals"])


def test_zero_residuals_change_nothing_bit_for_bit(family):
    down, mid = family.residuals()
    zeros = jax.tree.map(np.zeros_like, (down, mid))
    with_zeros = np.asarray(family.predict_controlled(*family.unet_inputs(), *zeros))
    without = np.asarray(family.predict(*family.unet_inputs()))
    assert with_zeros.tobytes() == without.tobytes()


def test_unet_reproduces_the_guided_step_predictions(family):
    """The UNet halves of the classifier-free-guided DDIM step fixture (same shapes as the
    UNet test, so no new compilation)."""
    ref = family.ref
    latents = np.concatenate([ref["cfg_latents"]] * 2)
    context = np.concatenate([ref["cfg_uncond_embeddings"], ref["cfg_cond_embeddings"]])
    timesteps = np.full((2,), ref["cfg_timestep"])
    prediction = family.predict(family.unet_params, latents, timesteps, context)
    assert_close(prediction[:1], ref["cfg_noise_pred_uncond"])
    assert_close(prediction[1:], ref["cfg_noise_pred_cond"])


def test_text_encoder_computes_in_bfloat16():
    folder = FIXTURES / "sd1_tiny"
    module, params = load_diffusers(folder, "text_encoder", dtype=jnp.bfloat16)
    assert module.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    ref = np.load(folder / "reference_outputs.npz")
    hidden = jax.jit(lambda p, ids: module.apply({"params": p}, ids))(params, ref["text_input_ids"])
    assert hidden.dtype == jnp.float32
    assert relative_error(hidden, ref["text_last_hidden"]) < 3e-2  # bfloat16 has 8 significant bits


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5), (2, 2, 3, 5)])
def test_dense_is_flax_dense_on_any_leading_axes(shape):
    """sd_layers.Dense flattens the leading axes for speed only: flax's parameters and outputs."""
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    params = nn.Dense(4).init(jax.random.PRNGKey(1), x)["params"]
    ours = Dense(4).apply({"params": params}, x)
    assert jax.tree.map(jnp.shape, Dense(4).init(jax.random.PRNGKey(1), x)["params"]) == jax.tree.map(jnp.shape, params)
    expected = np.einsum("...i,ij->...j", np.asarray(x, np.float64), params["kernel"]) + params["bias"]
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


# The VAE's reparameterised sample.


def test_sample_latent_has_the_posterior_moments():
    """Empirical mean and standard deviation of 20000 draws per coordinate."""
    mean = jnp.broadcast_to(jnp.array([-1.0, 0.0, 2.0]), (20_000, 3))
    logvar = jnp.broadcast_to(jnp.array([0.0, -2.0, 1.0]), (20_000, 3))
    z = sample_latent(jax.random.key(0), mean, logvar)
    np.testing.assert_allclose(z.mean(0), mean[0], atol=0.05)
    np.testing.assert_allclose(z.std(0), np.exp(logvar[0] / 2), rtol=0.03)


# Checkpoint I/O.


def random_params(module, seed: int, dtype=np.float32):
    """Random values of every parameter shape of `module` (traced, not run)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(dtype), shapes)


@pytest.mark.parametrize("component", COMPONENTS)
def test_random_params_survive_a_save_and_load_bitwise(component, tmp_path):
    module, _ = load_diffusers(FIXTURES / "sd2_tiny", component)
    params = random_params(module, seed=1)
    save_diffusers(tmp_path, component, module, params)
    loaded_module, loaded = load_diffusers(tmp_path, component)
    assert_trees_bitwise_equal(loaded, params)
    assert module_config(component, loaded_module) == module_config(component, module)


def test_bfloat16_params_survive_a_save_and_load_bitwise(tmp_path):
    module, _ = load_diffusers(FIXTURES / "sd1_tiny", "vae")
    params = random_params(module, seed=2, dtype=ml_dtypes.bfloat16)
    save_diffusers(tmp_path, "vae", module, params)
    _, loaded = load_diffusers(tmp_path / "vae", "vae", dtype="bfloat16")
    assert_trees_bitwise_equal(loaded, params)


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_loaded_fixture_saves_to_the_same_tensors(component, tmp_path):
    """sd1_tiny's files are as diffusers / transformers 4 write them (text_model. prefix)."""
    module, params = load_diffusers(FIXTURES / "sd1_tiny", component)
    save_diffusers(tmp_path, component, module, params)
    original = load_file(FIXTURES / "sd1_tiny" / component / WEIGHTS[component])
    saved = load_file(tmp_path / component / WEIGHTS[component])
    assert saved.keys() == original.keys()
    for key in original:
        assert saved[key].dtype == original[key].dtype and saved[key].shape == original[key].shape, key
        assert saved[key].tobytes() == original[key].tobytes(), key


def copy_component(family: str, component: str, folder: pathlib.Path) -> tuple[pathlib.Path, dict]:
    """A copy of a fixture component's folder, and its tensors."""
    target = folder / component
    shutil.copytree(FIXTURES / family / component, target)
    return target, load_file(target / WEIGHTS[component])


def test_fp16_bf16_and_sharded_files_load(tmp_path):
    folder, tensors = copy_component("sd1_tiny", "text_encoder", tmp_path)
    _, reference = load_diffusers(folder, "text_encoder")
    for dtype in (np.float16, ml_dtypes.bfloat16):
        save_file({k: v.astype(dtype) for k, v in tensors.items()}, folder / WEIGHTS["text_encoder"])
        _, params = load_diffusers(folder, "text_encoder")
        rounded = jax.tree.map(lambda x: np.asarray(x).astype(dtype).astype(np.float32), reference)
        assert_trees_bitwise_equal(params, rounded)

    (folder / WEIGHTS["text_encoder"]).unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, shard_keys in shards.items():
        save_file({k: tensors[k] for k in shard_keys}, folder / file, metadata={"format": "pt"})
    weight_map = {k: file for file, shard_keys in shards.items() for k in shard_keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, params = load_diffusers(folder, "text_encoder")
    assert_trees_bitwise_equal(params, reference)


def test_old_and_unprefixed_key_names_load(tmp_path):
    """The VAE attention's query/key/value/proj_attn names, a text encoder without the
    text_model. prefix, and the ignored position_ids buffer."""
    folder, tensors = copy_component("sd1_tiny", "vae", tmp_path)
    _, reference = load_diffusers(folder, "vae")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in tensors.items():
        for new_name, old_name in old.items():
            key = key.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
        renamed[key] = value
    assert len(set(renamed) - set(tensors)) == 16  # 4 projections x (weight, bias) x encoder and decoder
    save_file(renamed, folder / WEIGHTS["vae"])
    assert_trees_bitwise_equal(load_diffusers(folder, "vae")[1], reference)

    folder, tensors = copy_component("sd1_tiny", "text_encoder", tmp_path)
    _, reference = load_diffusers(folder, "text_encoder")
    unprefixed = {key.removeprefix("text_model."): value for key, value in tensors.items()}
    unprefixed["embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(unprefixed, folder / WEIGHTS["text_encoder"])
    assert_trees_bitwise_equal(load_diffusers(folder, "text_encoder")[1], reference)


def test_missing_unexpected_and_misshapen_tensors_are_one_error(tmp_path):
    folder, tensors = copy_component("sd1_tiny", "vae", tmp_path)
    missing, misshapen = "decoder.conv_out.bias", "encoder.conv_in.weight"  # [4, 3, 3, 3]
    del tensors[missing]
    tensors[misshapen] = tensors[misshapen][:, :2]
    tensors["decoder.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, folder / WEIGHTS["vae"])
    with pytest.raises(ArgumentError) as error:
        load_diffusers(folder, "vae")
    message = str(error.value)
    assert error.value.argument == "folder"
    assert f"1 missing: [{missing}]" in message
    assert "1 unexpected: [decoder.extra.weight]" in message
    assert f"1 misshapen: [{misshapen} (expected (4, 3, 3, 3), found (4, 2, 3, 3))]" in message


@pytest.mark.parametrize(
    ("key", "value", "named", "bad", "supported"),
    [
        (
            "down_block_types",
            ["CrossAttnDownBlock2D", "AttnDownBlock2D"],
            "down_block_types[1]",
            "AttnDownBlock2D",
            "('CrossAttnDownBlock2D', 'DownBlock2D')",
        ),
        (
            "up_block_types",
            ["SimpleCrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "up_block_types[0]",
            "SimpleCrossAttnUpBlock2D",
            "('CrossAttnUpBlock2D', 'UpBlock2D')",
        ),
        (
            "mid_block_type",
            "UNetMidBlock2DSimpleCrossAttn",
            "mid_block_type",
            "UNetMidBlock2DSimpleCrossAttn",
            "('UNetMidBlock2DCrossAttn',)",
        ),
        ("class_embed_type", "timestep", "class_embed_type", "timestep", "None"),
        ("addition_embed_type", "text_time", "addition_embed_type", "text_time", "None"),
        ("time_cond_proj_dim", 256, "time_cond_proj_dim", 256, "None"),
    ],
)
def test_an_unsupported_config_value_is_an_error_naming_it(key, value, named, bad, supported, tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    config = json.loads((FIXTURES / "sd1_tiny" / "unet" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {key: value}))
    with pytest.raises(ArgumentError) as error:
        load_diffusers(tmp_path, "unet")
    assert error.value.argument.endswith(f"config.json: {named}")
    assert error.value.value == bad
    assert supported in error.value.expected


def test_save_refuses_an_existing_component_folder(tmp_path):
    module, params = load_diffusers(FIXTURES / "sd1_tiny", "vae")
    save_diffusers(tmp_path, "vae", module, params)
    before = (tmp_path / "vae" / WEIGHTS["vae"]).read_bytes()
    with pytest.raises(ArgumentError) as error:
        save_diffusers(tmp_path, "vae", module, random_params(module, seed=3))
    assert error.value.argument == "folder"
    assert (tmp_path / "vae" / WEIGHTS["vae"]).read_bytes() == before
    save_diffusers(tmp_path, "vae", module, random_params(module, seed=3), overwrite=True)
    assert (tmp_path / "vae" / WEIGHTS["vae"]).read_bytes() != before


def test_save_checks_the_params_against_the_module(tmp_path):
    module, params = load_diffusers(FIXTURES / "sd1_tiny", "text_encoder")
    params = dict(params, extra={"kernel": np.zeros((2, 2), np.float32)})
    with pytest.raises(ArgumentError, match=r"1 unexpected: \[text_model\.extra\.weight\]"):
        save_diffusers(tmp_path, "text_encoder", module, params)
    assert not (tmp_path / "text_encoder").exists()


def test_load_places_params_replicated_on_a_mesh():
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    _, params = load_diffusers(FIXTURES / "sd1_tiny" / "text_encoder", "text_encoder", mesh=mesh)
    for leaf in jax.tree.leaves(params):
        assert leaf.sharding == jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def test_bad_arguments_are_errors_naming_them(tmp_path):
    with pytest.raises(ArgumentError, match="^component="):
        load_diffusers(FIXTURES / "sd1_tiny", "tokenizer")
    with pytest.raises(ArgumentError, match="^dtype="):
        load_diffusers(FIXTURES / "sd1_tiny", "vae", dtype=jnp.int8)
    with pytest.raises(ArgumentError, match="^folder="):
        load_diffusers(tmp_path, "vae")
    module, params = load_diffusers(FIXTURES / "sd1_tiny", "unet")
    ref = np.load(FIXTURES / "sd1_tiny" / "reference_outputs.npz")
    with pytest.raises(ArgumentError, match="^down_residuals="):
        module.apply({"params": params}, ref["unet_sample"], 0, ref["unet_context"], down_residuals=[])
