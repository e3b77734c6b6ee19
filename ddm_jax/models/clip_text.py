"""transformers' CLIPTextModel, the text encoder of Stable Diffusion, in Flax.

The text transformer of CLIP (Radford et al., 2021, "Learning Transferable Visual Models
From Natural Language Supervision"): token + learned position embeddings, pre-LayerNorm
encoder layers with causal self-attention and an MLP (quick_gelu for SD-1.x's OpenAI CLIP
ViT-L/14, gelu for SD-2.x's OpenCLIP ViT-H/14), then a final LayerNorm. Sub-modules carry
transformers' names (embeddings, encoder.layers_i.self_attn.q_proj, mlp.fc1, layer_norm1,
final_layer_norm); checkpoints prefix them with `text_model.` (ddm_jax.models.diffusers_io).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddm_jax.checks import PyTree, check, check_choice, check_int
from ddm_jax.models.sd_layers import Dense, Dtype, layer_norm, multi_head_attention

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's approximation of GELU
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with biased q_proj, k_proj, v_proj and out_proj."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda name: Dense(x.shape[-1], dtype=self.dtype, name=name)
        q, k, v = dense("q_proj")(x), dense("k_proj")(x), dense("v_proj")(x)
        return dense("out_proj")(multi_head_attention(q, k, v, self.num_heads, causal=True))


class CLIPEncoderLayer(nn.Module):
    """x + self_attn(layer_norm1(x)), then h + mlp.fc2(act(mlp.fc1(layer_norm2(h))))."""

    num_heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + CLIPAttention(self.num_heads, self.dtype, name="self_attn")(
            layer_norm(self.eps, "layer_norm1", self.dtype)(x)
        )
        return x + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(
            layer_norm(self.eps, "layer_norm2", self.dtype)(x)
        )


class CLIPMLP(nn.Module):
    """fc2(act(fc1(x)))."""

    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = ACTIVATIONS[self.hidden_act](Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class CLIPTextEmbeddings(nn.Module):
    """token_embedding(ids) + position_embedding(0, 1, ..., L - 1)."""

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(
            self.max_position_embeddings, self.hidden_size, dtype=self.dtype, name="position_embedding"
        )
        return tokens + positions(jnp.arange(input_ids.shape[-1]))


class CLIPEncoder(nn.Module):
    """The encoder layers layers_0, ..., layers_{num_layers - 1} in turn."""

    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            layer = CLIPEncoderLayer(
                self.num_heads, self.intermediate_size, self.hidden_act, self.eps, self.dtype, name=f"layers_{i}"
            )
            h = layer(h)
        return h


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel.

    `apply({"params": p}, input_ids [B, L])` (L <= max_position_embeddings, 77 in SD) -> the
    last hidden state [B, L, hidden_size] after final_layer_norm, float32. With
    `clip_skip=k` it is the output of layer -(k + 1) of the hidden-state stack (embeddings,
    layer 1, ..., layer N) instead, i.e. of encoder layer N - k, passed through
    final_layer_norm, as diffusers' pipelines compute "clip skip"; k = 1 is the penultimate
    layer. No attention mask is used (SD's pipelines pass none): padding tokens are attended
    to, causally, as in SD's training. `pooled_output` gives the state at the EOS token.

    Fields are transformers' config.json keys (defaults as transformers'); `dtype` is the
    computation dtype.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406  # the token ids of the config; eos_token_id selects the pooled state
    eos_token_id: int = 49407
    pad_token_id: int = 1
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_choice("hidden_act", self.hidden_act, tuple(ACTIVATIONS))
        check(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            self.num_attention_heads,
            f"a divisor of hidden_size={self.hidden_size}",
        )
        super().__post_init__()

    def example_inputs(self) -> tuple[jax.Array]:
        """The smallest input that builds every parameter (for init and jax.eval_shape)."""
        return (jnp.zeros((1, 1), jnp.int32),)

    @nn.compact
    def __call__(self, input_ids: jax.Array, clip_skip: int = 0) -> jax.Array:
        check_int("clip_skip", clip_skip, 0, self.num_hidden_layers)
        check(
            input_ids.ndim == 2 and input_ids.shape[1] <= self.max_position_embeddings,
            "input_ids",
            f"array of shape {input_ids.shape}",
            f"[B, L] with L <= max_position_embeddings={self.max_position_embeddings}",
        )
        h = CLIPTextEmbeddings(
            self.vocab_size, self.hidden_size, self.max_position_embeddings, self.dtype, name="embeddings"
        )(input_ids)
        h = CLIPEncoder(
            self.num_hidden_layers - clip_skip,
            self.num_attention_heads,
            self.intermediate_size,
            self.hidden_act,
            self.layer_norm_eps,
            self.dtype,
            name="encoder",
        )(h)
        return layer_norm(self.layer_norm_eps, "final_layer_norm", self.dtype)(h).astype(jnp.float32)


def token_embedding(params: PyTree) -> jax.Array:
    """The token-embedding table [rows, hidden_size] of CLIPTextModel parameters."""
    return params["embeddings"]["token_embedding"]["embedding"]


def with_token_embedding(params: PyTree, table: jax.Array) -> PyTree:
    """CLIPTextModel parameters with the token-embedding table `table`, the rest shared. A table of
    some rows of the vocabulary serves input ids that index those rows (`LatentDiffusion.encode_prompts`)."""
    embeddings = params["embeddings"]
    return {**params, "embeddings": {**embeddings, "token_embedding": {"embedding": table}}}


def pooled_output(hidden_states: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The hidden state [B, D] at each sequence's EOS token, as transformers' CLIPTextModel
    pools: at the first `eos_token_id`, or, for old configs with eos_token_id = 2 (SD-1.x's),
    at the largest token id (CLIP's EOS 49407 is the largest in its vocabulary)."""
    position = jnp.argmax(input_ids if eos_token_id == 2 else input_ids == eos_token_id, axis=-1)
    return jnp.take_along_axis(hidden_states, position[:, None, None], axis=1)[:, 0]
