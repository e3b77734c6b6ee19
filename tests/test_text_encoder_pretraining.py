"""The text encoder trained first on the shapes captions' labels (training.text_encoder_pretraining)."""

import jax
import numpy as np

from ddm_jax.data import shapes
from ddm_jax.models.clip_text import CLIPTextModel
from ddm_jax.models.clip_tokenizer import default_tokenizer
from ddm_jax.training import text_encoder_pretraining as pretraining


def test_caption_labels_state_what_the_caption_says_and_none_for_the_rest():
    labels = pretraining.caption_labels(
        [
            "a large red star with dots on the left, on a white background",
            "a large blue ring at the top and a small green heart in the center",
        ]
    )
    none = {
        field: len(vocabulary)
        for field, vocabulary in zip(shapes.ObjectLabels._fields, shapes.VOCABULARIES, strict=True)
    }
    expected_first = {
        "num_objects": 0,
        "background": shapes.COLORS.index("white"),
        "shape_0": shapes.SHAPES.index("star"),
        "color_0": shapes.COLORS.index("red"),
        "size_0": shapes.SIZES.index("large"),
        "position_0": shapes.POSITIONS.index("left"),
        "texture_0": shapes.TEXTURES.index("dots"),
        **{f"{field}_1": value for field, value in none.items()},
    }
    assert {head: int(value[0]) for head, value in labels.items()} == expected_first
    assert labels["num_objects"][1] == 1 and labels["background"][1] == len(shapes.COLORS)
    assert (labels["shape_1"][1], labels["position_1"][1]) == (
        shapes.SHAPES.index("heart"),
        shapes.POSITIONS.index("center"),
    )
    assert set(labels) == set(pretraining.LABEL_CLASSES)
    assert all(value.min() >= 0 and value.max() < pretraining.LABEL_CLASSES[head] for head, value in labels.items())


def test_pretraining_learns_the_labels_of_its_captions():
    """A tiny encoder fits the labels of 64 captions far above chance (1/9 for shape and position)."""
    rng = np.random.default_rng(0)
    captions = [shapes.caption(shapes.sample_attributes(rng), rng) for _ in range(64)]
    encoder = CLIPTextModel(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=40,
    )  # fmt: skip
    tokens = np.asarray(default_tokenizer()(captions, max_length=40, pad_token_id=49407))
    labels = pretraining.caption_labels(captions)
    model = pretraining.CaptionLabelModel(encoder)
    untrained = model.init(jax.random.PRNGKey(0), tokens[:1])["params"]
    _, trained = pretraining.pretrain_text_encoder(encoder, tokens, labels, steps=150, batch_size=32, lr=3e-3, seed=0)
    before = pretraining.label_accuracy(model, untrained, tokens, labels)
    after = pretraining.label_accuracy(model, trained, tokens, labels)
    assert min(after["shape_0"], after["color_0"], after["position_0"]) > 0.8, after
    assert before["shape_0"] < 0.5, before
