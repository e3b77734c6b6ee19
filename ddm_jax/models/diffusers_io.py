"""Stable Diffusion components in diffusers format <-> ddm_jax's Flax modules.

`load_diffusers(folder, component)` builds the Flax module from `<component>/config.json`
and reads its safetensors weights; `save_diffusers(folder, component, module, params)`
writes both back so that diffusers (`UNet2DConditionModel` / `AutoencoderKL`
.from_pretrained) and transformers (`CLIPTextModel.from_pretrained`) open the folder. No
torch is needed: tensors are read and written with safetensors' numpy API.

Folder layout (a pipeline folder, or one component's folder on its own):

    <folder>/unet/config.json           diffusion_pytorch_model.safetensors  (diffusers)
    <folder>/vae/config.json            diffusion_pytorch_model.safetensors  (diffusers)
    <folder>/text_encoder/config.json   model.safetensors                    (transformers)

A weights file may instead be sharded: `<weights>.index.json` with a "weight_map" from key to
shard file. Tensors may be float32, float16 or bfloat16 (read through ml_dtypes.bfloat16).

The key map, one rule for both directions (`torch_key`): a Flax parameter path maps to the
torch key by joining its names with dots, where a name `<list>_<i>` whose <list> is one of
torch's ModuleLists (LIST_MODULES) becomes `<list>.<i>`, and the leaf becomes `weight` (from
kernel, scale or embedding) or `bias`; the text encoder's keys carry the prefix
`text_model.`. E.g. ("down_blocks_1", "attentions_0", "transformer_blocks_0", "attn2",
"to_k", "kernel") <-> down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight.
Layouts (`to_torch_layout` / `from_torch_layout`): conv kernel [kh, kw, I, O] <-> weight
[O, I, kh, kw]; dense kernel [I, O] <-> weight [O, I]; norm scales, embeddings and biases
as they are.

Read but never written: the VAE attention's old names query/key/value/proj_attn (read as
to_q/to_k/to_v/to_out.0), text-encoder keys without `text_model.` (what transformers >= 5
writes), and the buffer text_model.embeddings.position_ids (ignored).
"""

import dataclasses
import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safetensors' numpy API looks up)
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file

from ddm_jax.checks import ArgumentError, PyTree, check, check_choice
from ddm_jax.models.autoencoder_kl import AutoencoderKL
from ddm_jax.models.clip_text import CLIPTextModel
from ddm_jax.models.unet_2d_condition import UNet2DConditionModel

LOAD_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DIFFUSERS_VERSION = "0.35.0"  # written as config.json's _diffusers_version
LIST_MODULES = (
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "transformer_blocks",
    "downsamplers",
    "upsamplers",
    "to_out",
    "net",
    "layers",
)
IDENTITY_KEYS = ("_class_name", "model_type")  # header keys a config must match when it has them
TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
MAX_LISTED = 12  # keys listed per kind in a mismatch error


@dataclasses.dataclass(frozen=True)
class Component:
    """How one pipeline component is stored.

    header: the identifying keys written to config.json; of these, _class_name and
    model_type must match on load when present.
    unsupported: diffusers/transformers config keys this implementation does not model,
    with the values it accepts (the library's default first); any other value is an error.
    """

    module: type[nn.Module]
    weights: str
    header: Mapping[str, Any]
    unsupported: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    prefix: str = ""
    ignored_keys: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()  # (regex, replacement) from old key names


COMPONENTS = {
    "unet": Component(
        UNet2DConditionModel,
        "diffusion_pytorch_model.safetensors",
        {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION},
        unsupported={
            "act_fn": ("silu",),
            "dropout": (0.0,),
            "only_cross_attention": (False,),
            "mid_block_only_cross_attention": (None, False),
            "dual_cross_attention": (False,),
            "reverse_transformer_layers_per_block": (None,),
            "encoder_hid_dim": (None,),
            "encoder_hid_dim_type": (None,),
            "class_embed_type": (None,),
            "num_class_embeds": (None,),
            "projection_class_embeddings_input_dim": (None,),
            "class_embeddings_concat": (False,),
            "addition_embed_type": (None,),
            "addition_time_embed_dim": (None,),
            "resnet_time_scale_shift": ("default",),
            "resnet_skip_time_act": (False,),
            "resnet_out_scale_factor": (1.0,),
            "time_embedding_type": ("positional",),
            "time_embedding_act_fn": (None,),
            "timestep_post_act": (None,),
            "time_cond_proj_dim": (None,),
            "attention_type": ("default",),
            "cross_attention_norm": (None,),
        },
    ),
    "vae": Component(
        AutoencoderKL,
        "diffusion_pytorch_model.safetensors",
        {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION},
        unsupported={"act_fn": ("silu",), "shift_factor": (None,), "latents_mean": (None,), "latents_std": (None,)},
        aliases=(
            (r"(attentions\.\d+)\.query\.", r"\1.to_q."),
            (r"(attentions\.\d+)\.key\.", r"\1.to_k."),
            (r"(attentions\.\d+)\.value\.", r"\1.to_v."),
            (r"(attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
        ),
    ),
    "text_encoder": Component(
        CLIPTextModel,
        "model.safetensors",
        {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"},
        prefix="text_model.",
        ignored_keys=("text_model.embeddings.position_ids",),
        aliases=((r"^(?!text_model\.)", "text_model."),),
    ),
}


# The key map.


def torch_name(name: str) -> str:
    """A Flax module name as torch names it: `<list>_<i>` -> `<list>.<i>` for LIST_MODULES."""
    match = re.fullmatch(r"(.+)_(\d+)", name)
    return f"{match[1]}.{match[2]}" if match and match[1] in LIST_MODULES else name


def torch_key(path: tuple[str, ...], prefix: str = "") -> str:
    """The torch state-dict key of the Flax parameter at `path` (module names, then the leaf)."""
    *modules, leaf = path
    return prefix + ".".join([*map(torch_name, modules), TORCH_LEAF[leaf]])


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """Flax kernel [kh, kw, I, O] -> torch [O, I, kh, kw], [I, O] -> [O, I]; others unchanged."""
    if leaf != "kernel":
        return array
    return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T


def from_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """The inverse of `to_torch_layout`."""
    if leaf != "kernel":
        return array
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T


def torch_shapes(module: nn.Module, prefix: str) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """torch key -> (Flax path, torch shape) of every parameter `module` has (traced, not run)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())["params"]
    return {
        torch_key(path, prefix): (path, to_torch_layout(path[-1], np.broadcast_to(False, leaf.shape)).shape)
        for path, leaf in traverse_util.flatten_dict(shapes).items()
    }


def check_keys(expected: Mapping[str, tuple], found: Mapping[str, tuple], argument: str, value: Any) -> None:
    """Raises one ArgumentError(argument, value, ...) listing the missing, unexpected and
    misshapen keys of `found` (key -> shape) against `expected` (key -> shape)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshapen = [
        f"{key} (expected {tuple(expected[key])}, found {tuple(found[key])})"
        for key in sorted(set(expected) & set(found))
        if tuple(expected[key]) != tuple(found[key])
    ]
    if missing or unexpected or misshapen:

        def listing(kind: str, keys: list[str]) -> str:
            more = f", ... ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
            return f"{len(keys)} {kind}: [{', '.join(keys[:MAX_LISTED])}{more}]"

        kinds = (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
        details = "; ".join(listing(kind, keys) for kind, keys in kinds if keys)
        raise ArgumentError(argument, value, f"weights matching the config; {details}")


# Configs.


def config_fields(module: type[nn.Module]) -> tuple[str, ...]:
    """The module's config-file fields: its dataclass fields but the computation dtype."""
    return tuple(f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name", "dtype"))


def as_field(value: Any) -> Any:
    """A JSON value as a (hashable) module field: lists become tuples."""
    return tuple(as_field(v) for v in value) if isinstance(value, list) else value


def is_accepted(value: Any, accepted: tuple) -> bool:
    """`value` is one of `accepted`, or a list of such (diffusers' per-block form)."""
    if isinstance(value, list):
        return all(is_accepted(v, accepted) for v in value)
    return value in accepted


def module_from_config(component: str, config: Mapping[str, Any], dtype=jnp.float32) -> nn.Module:
    """The Flax module a component's config.json describes, computing in `dtype`.

    Keys the module has become its fields; keys in the component's `unsupported` table must
    hold an accepted value; the identifying header keys (_class_name, model_type) must match
    when present; any other key is ignored, as diffusers ignores keys its class does not take.
    Raises ArgumentError naming the offending key.
    """
    spec = COMPONENTS[component]
    for key in IDENTITY_KEYS:
        if key in spec.header and key in config:
            check(config[key] == spec.header[key], key, config[key], f"{spec.header[key]!r} for {component!r}")
    for key, accepted in spec.unsupported.items():
        if key in config and not is_accepted(config[key], accepted):
            raise ArgumentError(key, config[key], f"{accepted[0]!r}, the only value ddm_jax implements")
    fields = {key: as_field(config[key]) for key in config_fields(spec.module) if key in config}
    return spec.module(**fields, dtype=dtype)


def module_config(component: str, module: nn.Module) -> dict[str, Any]:
    """The config.json of `module`: the component's header and every config field."""
    fields = {key: getattr(module, key) for key in config_fields(type(module))}
    to_json = lambda value: [to_json(v) for v in value] if isinstance(value, tuple) else value
    return {**COMPONENTS[component].header, **{key: to_json(value) for key, value in fields.items()}}


# Files.


def dtype_name(dtype: Any) -> str | None:
    """The numpy name of a dtype-like (jnp.float16, "bfloat16", ...), or None if it is none."""
    try:
        return None if dtype is None else jnp.dtype(dtype).name
    except TypeError:
        return None


def component_folder(folder: pathlib.Path, component: str) -> pathlib.Path:
    """`folder`/`component` when it holds config.json, else `folder` itself when it does."""
    for candidate in (folder / component, folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise ArgumentError("folder", str(folder), f"a folder holding {component}/config.json, or {component}'s own folder")


def weight_files(folder: pathlib.Path, weights: str) -> list[pathlib.Path]:
    """The safetensors file(s) of a component: `weights`, else the shards its index lists."""
    if (folder / weights).is_file():
        return [folder / weights]
    index = folder / f"{weights}.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    raise ArgumentError("folder", str(folder), f"a folder holding {weights} or {weights}.index.json (safetensors)")


def read_tensors(files: list[pathlib.Path], spec: Component) -> dict[str, np.ndarray]:
    """Every tensor of `files` as numpy arrays (bfloat16 as ml_dtypes.bfloat16) under its
    current key name (aliases applied), the component's ignored buffers left out."""
    tensors = {}
    for file in files:
        with safe_open(file, framework="np") as f:
            for key in f.keys():  # noqa: SIM118  (a safe_open handle is not a mapping)
                name = key
                for pattern, replacement in spec.aliases:
                    name = re.sub(pattern, replacement, name)
                if name not in spec.ignored_keys:
                    tensors[name] = f.get_tensor(key)
    return tensors


def load_diffusers(
    folder: str | pathlib.Path, component: str, *, dtype=jnp.float32, mesh: Mesh | None = None
) -> tuple[nn.Module, PyTree]:
    """A Stable Diffusion component from a diffusers folder: (module, params).

    Args:
      folder: the checkpoint's root (holding `<component>/config.json`) or the component's
        own folder.
      component: "unet", "vae" or "text_encoder".
      dtype: float32, bfloat16 or float16: the parameters' dtype and the module's
        computation dtype.
      mesh: if given, every parameter is placed on it, replicated (PartitionSpec()).

    Returns:
      The module (UNet2DConditionModel, AutoencoderKL or CLIPTextModel) and its parameter
      tree, for `module.apply({"params": params}, ...)`.

    Raises ArgumentError for a folder without the component, a config the module does not
    implement (naming the config key), or weights that do not match the config: one error
    listing the missing, unexpected and misshapen keys.
    """
    check_choice("component", component, tuple(COMPONENTS))
    check_choice("dtype", dtype_name(dtype), tuple(LOAD_DTYPES))
    dtype = LOAD_DTYPES[dtype_name(dtype)]
    spec = COMPONENTS[component]
    directory = component_folder(pathlib.Path(folder), component)
    config_path = directory / "config.json"
    try:
        module = module_from_config(component, json.loads(config_path.read_text()), dtype)
    except ArgumentError as error:
        raise error.renamed(f"{config_path}: {error.argument}") from None
    expected = torch_shapes(module, spec.prefix)
    tensors = read_tensors(weight_files(directory, spec.weights), spec)
    check_keys(
        {key: shape for key, (_, shape) in expected.items()},
        {key: array.shape for key, array in tensors.items()},
        "folder",
        str(directory),
    )
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    params = {
        path: jax.device_put(from_torch_layout(path[-1], tensors[key]).astype(dtype), sharding)
        for key, (path, _) in expected.items()
    }
    return module, traverse_util.unflatten_dict(params)


def save_diffusers(
    folder: str | pathlib.Path, component: str, module: nn.Module, params: PyTree, *, overwrite: bool = False
) -> pathlib.Path:
    """Writes `module` and `params` as `<folder>/<component>/` in diffusers format.

    config.json holds the module's config fields and the class header (diffusers'
    _class_name, or transformers' architectures/model_type); the weights go, in the params'
    dtype, to one safetensors file with metadata {"format": "pt"}, under the torch keys of
    `torch_key`. The folder opens with diffusers' / transformers' from_pretrained and with
    `load_diffusers`.

    Args:
      folder: the checkpoint's root; `<folder>/<component>/` is created.
      component: "unet", "vae" or "text_encoder".
      module: the component's Flax module (its fields make config.json).
      params: its parameter tree (as `load_diffusers` returns it).
      overwrite: replace config.json and the weights file of an existing component folder.

    Returns:
      The component folder.

    Raises ArgumentError, before writing anything, if the component folder exists and not
    `overwrite`, if `module` is not the component's class, or if `params` does not match
    the module (one error listing the missing, unexpected and misshapen keys).
    """
    check_choice("component", component, tuple(COMPONENTS))
    spec = COMPONENTS[component]
    check(
        isinstance(module, spec.module), "module", type(module).__name__, f"a {spec.module.__name__} for {component!r}"
    )
    directory = pathlib.Path(folder) / component
    check(
        overwrite or not directory.exists(),
        "folder",
        str(folder),
        f"a folder without {component}/ (it exists; pass overwrite=True to replace its config and weights)",
    )
    tensors = {
        torch_key(path, spec.prefix): np.ascontiguousarray(to_torch_layout(path[-1], np.asarray(value)))
        for path, value in traverse_util.flatten_dict(params).items()
    }
    check_keys(
        {key: shape for key, (_, shape) in torch_shapes(module, spec.prefix).items()},
        {key: array.shape for key, array in tensors.items()},
        "params",
        f"{len(tensors)} arrays",
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps(module_config(component, module), indent=2, sort_keys=True) + "\n"
    )
    save_file(tensors, directory / spec.weights, metadata={"format": "pt"})
    return directory
