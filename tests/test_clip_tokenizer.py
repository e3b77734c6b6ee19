"""The CLIP BPE tokenizer against an independent implementation (instant-clip-tokenizer, Rust),
known ids of the CLIP vocabulary, and its padding, truncation, file loading and errors."""

import html
import importlib.resources
import json
import random
import re
import unicodedata
import warnings

import numpy as np
import pytest

from ddm_jax.checks import ArgumentError
from ddm_jax.models import clip_tokenizer
from ddm_jax.models.clip_text import CLIPTextModel
from ddm_jax.models.clip_tokenizer import CLIPTokenizer, clip_tokenize, default_tokenizer
from ddm_jax.models.latent_diffusion import load_tokenizer

START, END = 49406, 49407

HARD_CASES = [
    "",
    " ",
    "   \t\n ",
    "a",
    "A",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "  lots   of\t\tspaces\n\nand lines  ",
    "Hello, World!",
    "it's",
    "IT'S",
    "we're they've I'm you'll he'd",
    "don't",
    "rock'n'roll",
    "'s'",
    "''",
    "...",
    "?!?!",
    "--==--",
    "$100.00",
    "3.14159",
    "2024-01-01",
    "1234567890",
    "½ ² Ⅳ Ⅻ",
    "١٢٣ ४५६",
    "café",
    "naïve résumé",
    "Crème Brûlée",
    "straße STRASSE",
    "ÆØÅ æøå",
    "İstanbul",
    "ΑΘΗΝΑ ΟΔΟΣ",
    "Ελληνικά",
    "Москва",
    "日本語のテキスト",
    "中文字符",
    "한국어 문장",
    "🐱🐶",
    "👍🏽",
    "🇫🇷",
    "❤️",
    "e\u0301",
    "tab\tsep",
    "a\u00a0b",
    "ideographic\u3000space",
    "emoji🚀inside",
    "&amp; &lt;&gt;",
    "&amp;amp;",
    "&#39;s",
    "&nbsp;",
    "<b>bold</b>",
    "http://example.com/path?q=1&r=2",
    "user@example.com",
    "C++ / C# / F#",
    "snake_case_name",
    "CamelCaseWord",
    "α-β γ",
    "\x00\x01",
    "\x7f",
    "\u200b",
    "\ufeff",
    "\x1ca\x1fb\x1e",
    "x" * 300,
    "word " * 120,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]

# Blocks assigned since Unicode 6, so that the Unicode tables of both implementations agree.
ALPHABET = "".join(
    chr(c)
    for first, last in [
        (0x20, 0x7E),
        (0xA0, 0x17F),
        (0x391, 0x3C9),
        (0x410, 0x44F),
        (0x5D0, 0x5EA),
        (0x621, 0x64A),
        (0x905, 0x94D),
        (0x3041, 0x3096),
        (0x30A1, 0x30FA),
        (0x4E00, 0x4E7F),
        (0xAC00, 0xAC7F),
        (0x2190, 0x21FF),
        (0x1F600, 0x1F64F),
    ]
    for c in range(first, last + 1)
)
SEPARATORS = [" ", "  ", "\t", "\n", "\u00a0", "\u3000", ", ", ". ", "'s ", "&amp;", ""]


def generated_texts(count: int, seed: int = 0) -> list[str]:
    """Random texts: words of random characters, the word lengths and separators varied."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        words = ("".join(rng.choices(ALPHABET, k=rng.randint(1, 12))) for _ in range(rng.choice([1, 3, 10, 60])))
        texts.append("".join(word + rng.choice(SEPARATORS) for word in words))
    return texts


TEXTS = HARD_CASES + generated_texts(300)


def reference_cleaned(text: str) -> str:
    """OpenAI CLIP's basic_clean with ftfy reduced to NFC: HTML unescaped twice, NFC, ends
    stripped. The other implementation lower-cases and splits on whitespace itself but does none
    of these."""
    return unicodedata.normalize("NFC", html.unescape(html.unescape(text))).strip()


@pytest.fixture(scope="module")
def instant():
    module = pytest.importorskip(
        "instant_clip_tokenizer",
        reason="the independent CLIP tokenizer the ids are checked against (extras_require['test'])",
    )
    return module.Tokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


def test_encode_matches_independent_implementation(tokenizer, instant):
    mismatches = [t for t in TEXTS if tokenizer.encode(t) != instant.encode(reference_cleaned(t))]
    assert mismatches == []


@pytest.mark.parametrize("max_length", [77, 16])
def test_rows_match_independent_batches_padded_with_zero(instant, max_length):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rows = clip_tokenize(TEXTS, max_length, pad_token_id=0)
    expected = instant.tokenize_batch([reference_cleaned(t) for t in TEXTS], max_length)
    assert rows.dtype == np.int32 and rows.shape == (len(TEXTS), max_length)
    np.testing.assert_array_equal(rows, expected)


def test_known_ids():
    """Ids of OpenAI's CLIP tokenizer (simple_tokenizer.py) and the examples of the
    instant-clip-tokenizer README."""
    assert clip_tokenize("a photo of a cat")[0, :8].tolist() == [START, 320, 1125, 539, 320, 2368, END, END]
    assert default_tokenizer().encode("A person riding a motorcycle") == [320, 2533, 6765, 320, 10297]
    assert default_tokenizer().encode("Hi there") == [1883, 997]
    with pytest.warns(UserWarning, match="4 tokens"):
        assert clip_tokenize("How are you?", 5).tolist() == [[START, 829, 631, 592, END]]
    assert default_tokenizer().decode(default_tokenizer().encode("Hello world!!!")) == "hello world !!!"


def test_vocabulary_layout(tokenizer):
    """Bytes, bytes + "</w>", 48,894 merges, then the special tokens; "!" is id 0 (SD-2.x's pad)."""
    assert len(tokenizer.encoder) == 49408
    assert tokenizer.decoder[0] == "!" and tokenizer.decoder[256] == "!</w>"
    assert tokenizer.decoder[255] == chr(256 + 67) and tokenizer.decoder[512] == "in"
    assert (tokenizer.start_id, tokenizer.end_id) == (START, END)
    assert tokenizer.decoder[START] == "<|startoftext|>" and tokenizer.decoder[END] == "<|endoftext|>"


def test_byte_characters_are_gpt2_table():
    characters = clip_tokenizer.byte_characters()
    assert len(set(characters)) == 256
    assert characters[ord("a")] == "a" and characters[0xFF] == "ÿ"
    assert characters[ord(" ")] == "\u0120" and characters[0] == "\u0100" and characters[0xAD] == "\u0143"


def test_normalisation_without_ftfy(tokenizer):
    encode = tokenizer.encode
    assert encode("&amp;amp;") == encode("&") and encode("&lt;b&gt;") == encode("<b>")
    assert encode("  A\tPhoto\n\nOF  ") == encode("a photo of")
    assert encode("<|startoftext|>a<|endoftext|>") == [START, 320, END]
    assert encode("it’s") != encode("it's")  # ftfy would straighten the quote


@pytest.mark.parametrize(
    "decomposed, composed",
    [
        ("cafe\u0301", "caf\u00e9"),
        ("Cre\u0300me Bru\u0302le\u0301e", "Crème Brûlée"),
        ("\u1100\u1161", "\uac00"),
        ("cafe&#769;", "caf\u00e9"),  # NFC after the unescaping, as ftfy
    ],
)
def test_text_is_nfc_normalised(tokenizer, decomposed, composed):
    """As ftfy.fix_text, transformers' BasicTokenizer and CLIPTokenizerFast: canonically equivalent
    spellings give the same ids."""
    assert decomposed != composed
    assert tokenizer.encode(decomposed) == tokenizer.encode(composed)


def test_shipped_files_load_through_importlib_resources():
    assets = importlib.resources.files("ddm_jax.models").joinpath("assets")
    assert assets.joinpath("bpe_simple_vocab_16e6.txt.gz").is_file()
    assert "Permission is hereby granted" in assets.joinpath("LICENSE-open_clip.txt").read_text()
    assert len(clip_tokenizer.shipped_merges()) == 48894
    assert default_tokenizer() is default_tokenizer()


@pytest.mark.parametrize("pad_token_id", [END, 0])
def test_padding(pad_token_id):
    rows = clip_tokenize(["a photo of a cat", ""], 10, pad_token_id=pad_token_id)
    p = pad_token_id
    assert rows.tolist() == [[START, 320, 1125, 539, 320, 2368, END, p, p, p], [START, END, p, p, p, p, p, p, p, p]]


def test_default_padding_is_end_token():
    assert clip_tokenize("a cat", 6).tolist() == [[START, 320, 2368, END, END, END]]


def test_truncation_keeps_end_token_and_warns():
    texts = ["a cat", "cat " * 100, "cat " * 75]
    with pytest.warns(UserWarning, match=r"texts\[1\] has 100 tokens") as caught:
        rows = clip_tokenize(texts)
    assert len(caught) == 1
    assert rows[1].tolist() == [START] + [2368] * 75 + [END]
    assert rows[2].tolist() == [START] + [2368] * 75 + [END]


def test_decode_inverts_encode_on_plain_text(tokenizer):
    for text in ["a photo of a cat", "  An  Astronaut\triding a HORSE ", "café über naïve", "日本 語"]:
        normalised = " ".join(text.split()).lower()
        assert tokenizer.decode(tokenizer.encode(text)) == normalised
    assert tokenizer.decode([START, 320, END]) == "<|startoftext|>a <|endoftext|>"


def write_tiny_tokenizer(folder, vocabulary, merges_lines):
    (folder / "vocab.json").write_text(json.dumps(vocabulary), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(line + "\n" for line in merges_lines))
    return folder / "vocab.json", folder / "merges.txt"


TINY_VOCABULARY = {"l": 0, "o": 1, "lo": 2, "low</w>": 3, "<|startoftext|>": 4, "<|endoftext|>": 5, "!</w>": 6}


def test_from_files_on_a_tiny_vocabulary(tmp_path):
    tiny = CLIPTokenizer.from_files(*write_tiny_tokenizer(tmp_path, TINY_VOCABULARY, ["l o", "lo w</w>"]))
    assert tiny.encode("Low LOW!") == [3, 3, 6]
    assert tiny.encode("lol") == [2, 5]  # "l</w>" is not in the vocabulary: unknown -> <|endoftext|>
    assert tiny("low", 5).tolist() == [[4, 3, 5, 5, 5]]
    assert tiny("low", 5, pad_token_id=6).tolist() == [[4, 3, 5, 6, 6]]
    assert tiny.decode([3, 2, 6]) == "low lo!"


def test_from_files_errors(tmp_path):
    missing_special = {k: v for k, v in TINY_VOCABULARY.items() if k != "<|startoftext|>"}
    with pytest.raises(ArgumentError, match=r"vocab_json\['<\|startoftext\|>'\]"):
        CLIPTokenizer.from_files(*write_tiny_tokenizer(tmp_path, missing_special, ["l o"]))
    with pytest.raises(ArgumentError, match=r"vocab_json\['a b'\]"):
        CLIPTokenizer.from_files(*write_tiny_tokenizer(tmp_path, TINY_VOCABULARY | {"a b": 7}, ["l o"]))
    with pytest.raises(ArgumentError, match="merges_txt"):
        CLIPTokenizer.from_files(*write_tiny_tokenizer(tmp_path, TINY_VOCABULARY, ["l o w"]))
    with pytest.raises(ArgumentError, match="vocab_json"):
        CLIPTokenizer.from_files(tmp_path / "absent.json", tmp_path / "merges.txt")


SPECIAL_TOKENS_DECODER = {
    str(i): {
        "content": token,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    for token, i in (("!", 0), ("<|startoftext|>", START), ("<|endoftext|>", END))
}


def write_shipped_tokenizer(folder):
    """A diffusers tokenizer/ folder holding the shipped vocabulary: vocab.json and merges.txt."""
    folder.mkdir(parents=True)
    merges = [" ".join(pair) for pair in clip_tokenizer.shipped_merges()]
    return write_tiny_tokenizer(folder, default_tokenizer().encoder, merges)


def test_listed_special_tokens_in_the_vocabulary_are_accepted(tmp_path):
    """SD-1.x/2.x folders list "<|startoftext|>", "<|endoftext|>" (and SD-2's "!") as added tokens
    under their vocab.json ids."""
    files = write_shipped_tokenizer(tmp_path / "tokenizer")
    config = {"added_tokens_decoder": SPECIAL_TOKENS_DECODER, "pad_token": "!"}
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    added = [{"id": int(i), **token} for i, token in SPECIAL_TOKENS_DECODER.items()]
    (tmp_path / "tokenizer" / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    assert CLIPTokenizer.from_files(*files).encode("a <|endoftext|>!") == [320, END, 256]
    assert load_tokenizer(tmp_path, CLIPTextModel(vocab_size=49408))[1] == 0


CAT_TOY = {"id": 49408, "content": "<cat-toy>"}


@pytest.mark.parametrize(
    "name, content, refused",
    [
        ("added_tokens.json", {"<cat-toy>": 49408}, "{'<cat-toy>': 49408}"),
        (
            "tokenizer_config.json",
            {"added_tokens_decoder": SPECIAL_TOKENS_DECODER | {"49408": CAT_TOY}},
            "{'<cat-toy>': 49408}",
        ),
        (
            "tokenizer.json",
            {"added_tokens": [{"id": START, "content": "<|startoftext|>"}, CAT_TOY]},
            "{'<cat-toy>': 49408}",
        ),
        ("added_tokens.json", {"cat</w>": 49408}, "{'cat</w>': 49408}"),  # vocab.json has it as 2368
    ],
)
def test_added_tokens_beyond_the_vocabulary_are_refused(tmp_path, name, content, refused):
    """A textual-inversion or DreamBooth folder: its added token would otherwise be split into BPE
    pieces silently. The error names the file and only the tokens vocab.json lacks."""
    files = write_shipped_tokenizer(tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / name).write_text(json.dumps(content))
    expected = "^" + re.escape(f"{tmp_path / 'tokenizer' / name}={refused}: expected no added tokens beyond vocab.json")
    with pytest.raises(ArgumentError, match=expected):
        CLIPTokenizer.from_files(*files)
    with pytest.raises(ArgumentError, match=expected):
        load_tokenizer(tmp_path, CLIPTextModel(vocab_size=49409))


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: clip_tokenize(["fine", b"bytes"]), r"texts\[1\]"),
        (lambda: clip_tokenize(["\ud800"]), r"texts\[0\]"),
        (lambda: clip_tokenize(7), "texts"),
        (lambda: clip_tokenize("a", 1), "max_length"),
        (lambda: clip_tokenize("a", pad_token_id=49408), "pad_token_id"),
        (lambda: default_tokenizer().encode(b"a"), "text"),
        (lambda: default_tokenizer().decode([320, 49408]), r"ids\[1\]"),
        (lambda: CLIPTokenizer([("a", "b", "c")]), r"merges\[0\]"),
    ],
)
def test_errors_name_the_argument(call, argument):
    with pytest.raises(ArgumentError, match=rf"^{argument}="):
        call()
