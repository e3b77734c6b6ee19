"""A CLIP-layout text encoder trained first, on what the shapes captions say.

Stable Diffusion conditions its UNet on a text encoder trained before it (CLIP's, Radford et al.
2021) and kept frozen. No pretrained encoder can be downloaded here, so this trains one on the
captions' own labels instead of on image-text pairs: the pooled state (at the end-of-text token,
CLIP's text embedding, `clip_text.pooled_output`) predicts, through one linear head per label,
everything a caption states (`shapes.parse_caption`): the number of objects, the background colour
(a last class "none" when the caption does not name it) and each object's shape, colour, size,
position and texture in the caption's order (the second object's "none" for one object). The loss
is the softmax cross-entropy summed over the heads; the optimizer AdamW with a warmup and a cosine
decay. The encoder is then saved as a diffusers text_encoder and read by the text-to-image task
through `model.text_encoder_folder`.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddm_jax.checks import PyTree, check_int
from ddm_jax.data.shapes import COLORS, MAX_OBJECTS, VOCABULARIES, ObjectLabels, parse_caption
from ddm_jax.models.clip_text import CLIPTextModel, pooled_output

LABEL_CLASSES = {  # head -> classes, the last one "none" where a caption may not say
    "num_objects": MAX_OBJECTS,
    "background": len(COLORS) + 1,
    **{
        f"{field}_{k}": len(vocabulary) + 1
        for k in range(MAX_OBJECTS)
        for field, vocabulary in zip(ObjectLabels._fields, VOCABULARIES, strict=True)
    },
}


def caption_labels(captions: Sequence[str]) -> dict[str, np.ndarray]:
    """{head of LABEL_CLASSES: int32 [N] class indices} of what each caption states."""
    rows = []
    for text in captions:
        parsed = parse_caption(text)
        row = {
            "num_objects": len(parsed.objects) - 1,
            "background": len(COLORS) if parsed.background is None else COLORS.index(parsed.background),
        }
        for k in range(MAX_OBJECTS):
            for field, vocabulary in zip(ObjectLabels._fields, VOCABULARIES, strict=True):
                label = getattr(parsed.objects[k], field) if k < len(parsed.objects) else None
                row[f"{field}_{k}"] = len(vocabulary) if label is None else vocabulary.index(label)
        rows.append(row)
    return {head: np.array([row[head] for row in rows], np.int32) for head in LABEL_CLASSES}


class CaptionLabelModel(nn.Module):
    """The text encoder and a linear head per label on its pooled state: {head: logits [B, classes]}."""

    text_encoder: CLIPTextModel

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> dict[str, jax.Array]:
        pooled = pooled_output(self.text_encoder(input_ids), input_ids, self.text_encoder.eos_token_id)
        return {head: nn.Dense(classes, name=head)(pooled) for head, classes in LABEL_CLASSES.items()}


def label_loss(logits: dict[str, jax.Array], labels: dict[str, jax.Array]) -> jax.Array:
    """The softmax cross-entropy summed over the heads, averaged over the batch."""
    return sum(
        jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[head], labels[head])) for head in LABEL_CLASSES
    )


def label_accuracy(model: CaptionLabelModel, params: PyTree, tokens: np.ndarray, labels: dict) -> dict[str, float]:
    """{head: fraction of the captions whose label the head predicts}."""
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))
    return {head: float(np.mean(np.argmax(logits[head], -1) == labels[head])) for head in LABEL_CLASSES}


def pretrain_text_encoder(
    text_encoder: CLIPTextModel,
    tokens: np.ndarray,
    labels: dict[str, np.ndarray],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> tuple[PyTree, PyTree]:
    """Trains `text_encoder` from its random initialisation to predict `labels` (module docstring).

    Args:
      text_encoder: the CLIP-layout text encoder (its config stays as it is).
      tokens: int32 [N, L] token ids of the captions.
      labels: `caption_labels` of the same captions.
      steps, batch_size, lr: AdamW steps, captions per step, peak learning rate (warmup over the
        first tenth of the steps, then cosine decay to 0).
      seed: of the initialisation and the batches.

    Returns:
      (text encoder parameters, the CaptionLabelModel's parameters, heads included).
    """
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1, len(tokens))
    model = CaptionLabelModel(text_encoder)
    params = model.init(jax.random.PRNGKey(seed), jnp.asarray(tokens[:1]))["params"]
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps))
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, batch_tokens, batch_labels):
        loss, grads = jax.value_and_grad(lambda p: label_loss(model.apply({"params": p}, batch_tokens), batch_labels))(
            params
        )
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = rng.choice(len(tokens), batch_size, replace=False)
        params, state, _ = step(params, state, tokens[rows], {head: value[rows] for head, value in labels.items()})
    return params["text_encoder"], params
