"""CLIP's byte-level BPE tokenizer (Radford et al., 2021, "Learning Transferable Visual Models From
Natural Language Supervision"), as the text encoders of Stable Diffusion 1.x/2.x read prompts.

A text is normalised as OpenAI CLIP's `simple_tokenizer.py` does, ftfy.fix_text reduced to its
HTML unescaping and Unicode NFC normalisation: HTML entities unescaped twice, then NFC (as ftfy,
which normalises after its own unescaping, transformers' BasicTokenizer and CLIPTokenizerFast do,
so "e" + U+0301, "e&#769;" and "é" give the same ids), runs of whitespace collapsed to one space,
ends stripped, lower-cased. (Without the rest of ftfy.fix_text,
mojibake, curly quotes, full-width forms and ligatures are tokenized as they are; the reference
with ftfy repairs them first.)
It is split into pieces by one regular expression (the two special tokens, English contractions,
runs of letters, single digits, runs of other non-space characters); each piece's UTF-8 bytes are
written as printable characters (GPT-2's byte-to-unicode table, Radford et al., 2019), "</w>" is
appended to its last character, and the merges of the BPE table are applied greedily, lowest rank
first, every non-overlapping occurrence left to right (Sennrich et al., 2016).

The shipped vocabulary `assets/bpe_simple_vocab_16e6.txt.gz` (OpenAI's merge table, MIT licence,
as the open-clip-torch wheel ships it: `assets/LICENSE-open_clip.txt`) gives 49,408 ids: the 256
byte characters, the same with "</w>", 48,894 merges, then "<|startoftext|>" = 49406 and
"<|endoftext|>" = 49407.

Rows of `clip_tokenize` are [49406, ids..., 49407, pad...]. SD-1.x (OpenAI CLIP ViT-L/14) pads
with the end token 49407; SD-2.x (OpenCLIP ViT-H/14, whose diffusers tokenizer folder sets
pad_token "!") pads with 0. A text of more than max_length - 2 tokens is cut to its first
max_length - 2 (the end token stays last, as transformers' truncation=True does) with a warning.
"""

import functools
import gzip
import html
import importlib.resources
import itertools
import json
import math
import os
import unicodedata
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import regex

from ddm_jax.checks import ArgumentError, check, check_int, is_int

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
START_OF_TEXT_ID = 49406
END_OF_TEXT_ID = 49407  # also SD-1.x's padding id
OPENCLIP_PAD_TOKEN_ID = 0  # "!": SD-2.x's padding id
MAX_LENGTH = 77  # CLIP's context length
MAX_MERGES = 49408 - 2 * 256 - 2  # OpenAI's 49,408 ids less the 512 byte tokens and the 2 special ones
VOCABULARY_FILE = "bpe_simple_vocab_16e6.txt.gz"

PIECE_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
WHITESPACE_RUN = regex.compile(r"\s+")
# (content, id) of the added tokens each file of a transformers tokenizer folder lists.
ADDED_TOKEN_LISTS = {
    "added_tokens.json": lambda data: data.items(),
    "tokenizer_config.json": lambda data: [
        (t["content"], int(i)) for i, t in data.get("added_tokens_decoder", {}).items()
    ],
    "tokenizer.json": lambda data: [(t["content"], t["id"]) for t in data.get("added_tokens", [])],
}


@functools.lru_cache(maxsize=1)
def byte_characters() -> tuple[str, ...]:
    """The printable character standing for each byte 0..255 (GPT-2's table): the bytes of
    "!".."~", "¡".."¬" and "®".."ÿ" stand for themselves, the other 68 for chr(256 + k) in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = (b for b in range(256) if b not in printable)
    stand_ins = dict(zip(printable, printable, strict=True)) | {b: 256 + k for k, b in enumerate(others)}
    return tuple(chr(stand_ins[b]) for b in range(256))


def byte_order_vocabulary(merges: Sequence[tuple[str, str]]) -> list[str]:
    """OpenAI CLIP's token list for a merge table: the 256 byte characters by code point (the order
    bytes_to_unicode lists them), the same with "</w>", one token per merge, then the two special
    tokens. The id of a token is its position."""
    singles = sorted(byte_characters())
    return [*singles, *(c + END_OF_WORD for c in singles), *(a + b for a, b in merges), START_OF_TEXT, END_OF_TEXT]


def normalize_text(text: str) -> str:
    """OpenAI CLIP's text cleaning with ftfy reduced to NFC: HTML entities unescaped twice, NFC,
    whitespace runs collapsed to one space, ends stripped, lower-cased."""
    text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)))
    return WHITESPACE_RUN.sub(" ", text).strip().lower()


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """`symbols` with every non-overlapping occurrence of `pair`, left to right, joined into one."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def parse_merges(lines: Iterable[str], source: str) -> list[tuple[str, str]]:
    """The merge pairs of a BPE table, by rank: its first line (a "#version" header) skipped, blank
    lines skipped, the first MAX_MERGES lines "first second" kept. `source` names the table in
    errors."""
    merges = []
    for number, line in enumerate(lines):
        fields = line.split()
        if number == 0 or not fields:
            continue
        check(len(fields) == 2, source, line, f"merge lines of two tokens (line {number + 1})")
        merges.append((fields[0], fields[1]))
    return merges[:MAX_MERGES]


def shipped_merges() -> list[tuple[str, str]]:
    """The merge table shipped with this package (OpenAI CLIP's bpe_simple_vocab_16e6)."""
    packed = importlib.resources.files("ddm_jax.models").joinpath("assets", VOCABULARY_FILE).read_bytes()
    return parse_merges(gzip.decompress(packed).decode("utf-8").split("\n"), VOCABULARY_FILE)


def is_unicode_text(text: str) -> bool:
    """Whether `text` encodes to UTF-8 (no lone surrogates such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_merge_pair(pair) -> bool:
    """A pair (first, second) of str."""
    return isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)


def check_vocabulary(vocabulary: Mapping[str, int]) -> None:
    """token -> integer id, the tokens made of byte characters, both special tokens present."""
    check(isinstance(vocabulary, Mapping), "vocabulary", type(vocabulary), "a mapping token -> id")
    for token in (START_OF_TEXT, END_OF_TEXT):
        check(token in vocabulary, f"vocabulary[{token!r}]", None, "the id of that special token")
    characters = set(byte_characters())
    for token, i in vocabulary.items():
        check(is_int(i), f"vocabulary[{token!r}]", i, "an integer id")
        check(
            isinstance(token, str) and set(token) <= characters,
            f"vocabulary[{token!r}]",
            i,
            "only tokens made of byte characters (GPT-2's byte-to-unicode table)",
        )


def check_added_tokens(folder: str | os.PathLike, vocabulary: Mapping[str, int]) -> None:
    """Raises ArgumentError naming the file and the tokens (content -> id) when a transformers
    tokenizer folder lists added tokens (textual inversion, DreamBooth) that `vocabulary` lacks or
    gives another id: transformers matches them whole before BPE, which this tokenizer does not,
    so they would be split into BPE pieces."""
    for name, listed in ADDED_TOKEN_LISTS.items():
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                unknown = {token: i for token, i in listed(json.load(file)) if vocabulary.get(token) != i}
            check(
                not unknown,
                path,
                unknown,
                "no added tokens beyond vocab.json: transformers matches them whole before BPE (textual "
                "inversion, DreamBooth), which this tokenizer does not support",
            )


def check_text(argument: str, text) -> None:
    """A str that is valid Unicode text."""
    check(isinstance(text, str) and is_unicode_text(text), argument, text, "a str of valid Unicode text")


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer over a vocabulary and a merge table; see the module docstring.

    The BPE of each distinct piece is cached per instance.
    """

    def __init__(self, merges: Sequence[tuple[str, str]] | None = None, vocabulary: Mapping[str, int] | None = None):
        """
        Args:
          merges: the merge pairs, rank = position; None for the shipped OpenAI table.
          vocabulary: token -> id (transformers' vocab.json); None for OpenAI's order
            (`byte_order_vocabulary(merges)`). It must hold "<|startoftext|>" and "<|endoftext|>";
            a BPE token missing from it maps to "<|endoftext|>", as transformers' unk_token does.
        """
        merges = shipped_merges() if merges is None else list(merges)
        for k, pair in enumerate(merges):
            check(is_merge_pair(pair), f"merges[{k}]", pair, "a pair of two str")
        if vocabulary is None:
            vocabulary = {token: i for i, token in enumerate(byte_order_vocabulary(merges))}
        check_vocabulary(vocabulary)
        self.encoder = dict(vocabulary)
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.start_id, self.end_id = self.encoder[START_OF_TEXT], self.encoder[END_OF_TEXT]
        self.byte_encoder = byte_characters()
        self.byte_decoder = {c: b for b, c in enumerate(self.byte_encoder)}
        self._bpe = functools.lru_cache(maxsize=2**16)(self._bpe_uncached)

    @classmethod
    def from_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike) -> "CLIPTokenizer":
        """The tokenizer of a diffusers checkpoint's `tokenizer/` folder (transformers' format).

        Args:
          vocab_json: path of vocab.json, a JSON object token -> id.
          merges_txt: path of merges.txt, a "#version" header line then one "first second" merge
            per line, by rank.

        Returns:
          The tokenizer with that vocabulary and those merges. Raises ArgumentError naming the file
          when added_tokens.json, tokenizer_config.json ("added_tokens_decoder") or tokenizer.json
          beside vocab_json lists added tokens that vocab.json lacks (`check_added_tokens`).
        """
        for argument, path in (("vocab_json", vocab_json), ("merges_txt", merges_txt)):
            check(os.path.isfile(path), argument, path, "an existing file")
        with open(vocab_json, encoding="utf-8") as file:
            vocabulary = json.load(file)
        with open(merges_txt, encoding="utf-8") as file:
            merges = parse_merges(file, "merges_txt")
        try:
            tokenizer = cls(merges, vocabulary)
        except ArgumentError as error:
            raise error.renamed(error.argument.replace("vocabulary", "vocab_json", 1)) from None
        check_added_tokens(os.path.dirname(vocab_json), tokenizer.encoder)
        return tokenizer

    def _bpe_uncached(self, piece: str) -> tuple[str, ...]:
        """The BPE tokens of one piece already written in byte characters."""
        symbols = [*piece[:-1], piece[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pair = min(itertools.pairwise(symbols), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            symbols = merge_pair(symbols, pair)
        return tuple(symbols)

    def _piece_ids(self, piece: str) -> list[int]:
        if piece in (START_OF_TEXT, END_OF_TEXT):
            return [self.encoder[piece]]
        tokens = self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8")))
        return [self.encoder.get(token, self.end_id) for token in tokens]

    def encode(self, text: str) -> list[int]:
        """The BPE ids of `text`, without the start and end tokens.

        Args:
          text: any str of valid Unicode text; normalised by `normalize_text`.

        Returns:
          The ids, one per BPE token ("<|startoftext|>"/"<|endoftext|>" written in the text are
          their special ids, as in the reference).
        """
        check_text("text", text)
        return [i for piece in PIECE_PATTERN.findall(normalize_text(text)) for i in self._piece_ids(piece)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`: tokens joined, bytes decoded as UTF-8 (invalid sequences replaced by
        U+FFFD), each "</w>" read as a space, ends stripped. Special ids decode to their names.

        Args:
          ids: token ids of this vocabulary.

        Returns:
          The text; for plain words, `normalize_text` of the encoded text.
        """
        ids = list(ids)
        for k, i in enumerate(ids):
            check(is_int(i) and int(i) in self.decoder, f"ids[{k}]", i, "an id of the vocabulary")
        characters = "".join(self.decoder[int(i)] for i in ids)
        text = bytes(self.byte_decoder[c] for c in characters).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()

    def __call__(
        self, texts: str | Sequence[str], max_length: int = MAX_LENGTH, pad_token_id: int | None = None
    ) -> np.ndarray:
        """Rows [start, ids..., end, pad...] of the texts, CLIP's text-encoder input.

        Args:
          texts: a str or a list of str.
          max_length: the row length, >= 2 (77 for CLIP). A text of more than max_length - 2
            tokens keeps its first max_length - 2, still followed by the end token, and a
            UserWarning names its index and its token count.
          pad_token_id: the id after the end token; None for the end token itself (49407 in
            OpenAI's vocabulary: OpenAI CLIP and SD-1.x), 0 ("!") for OpenCLIP and SD-2.x
            (`OPENCLIP_PAD_TOKEN_ID`).

        Returns:
          int32 [B, max_length], B = number of texts (1 for a str).
        """
        if isinstance(texts, str):
            texts = [texts]
        check(isinstance(texts, (list, tuple)), "texts", texts, "a str or a list of str")
        for k, text in enumerate(texts):
            check_text(f"texts[{k}]", text)
        check_int("max_length", max_length, minimum=2)
        pad_token_id = self.end_id if pad_token_id is None else pad_token_id
        check(is_int(pad_token_id) and int(pad_token_id) in self.decoder, "pad_token_id", pad_token_id, "a token id")
        rows = np.full((len(texts), max_length), pad_token_id, dtype=np.int32)
        for k, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > max_length - 2:
                warnings.warn(
                    f"texts[{k}] has {len(ids)} tokens, more than max_length - 2 = {max_length - 2}: "
                    f"it is truncated to its first {max_length - 2}",
                    stacklevel=2,
                )
            row = [self.start_id, *ids[: max_length - 2], self.end_id]
            rows[k, : len(row)] = row
        return rows


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> CLIPTokenizer:
    """The tokenizer of the shipped OpenAI vocabulary, built once."""
    return CLIPTokenizer()


def clip_tokenize(
    texts: str | Sequence[str], max_length: int = MAX_LENGTH, *, pad_token_id: int = END_OF_TEXT_ID
) -> np.ndarray:
    """CLIP input ids of `texts` with the shipped vocabulary: `CLIPTokenizer.__call__`.

    Args:
      texts: a str or a list of str (each valid Unicode text, else ArgumentError naming texts[i]).
      max_length: the row length (77 for Stable Diffusion). Longer texts are truncated, the end
        token kept last, with a UserWarning naming the text's index and token count.
      pad_token_id: 49407 (end token; OpenAI CLIP, SD-1.x) by default, 0 ("!") for SD-2.x.

    Returns:
      int32 [B, max_length]: 49406, the BPE ids, 49407, then pad_token_id.
    """
    return default_tokenizer()(texts, max_length, pad_token_id=pad_token_id)
