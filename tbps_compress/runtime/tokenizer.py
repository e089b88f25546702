"""Torch-free CLIP byte-level BPE tokenizer.

Gives the same ids as open_clip's default tokenizer (``SimpleTokenizer()`` with ``clean='lower'``, no reduction
mask): the text is cleaned (``ftfy.fix_text``, HTML entities unescaped twice, whitespace collapsed, lower-cased),
split into words with CLIP's pre-tokenisation pattern, each word's UTF-8 bytes mapped to printable characters and
merged with the BPE merge table, then ``[SOT] ids [EOT]`` is written into a zero-padded row of ``context_length``
(a sequence that is too long is cut to ``context_length`` and its last token replaced by EOT).

Optional dependencies (neither imports torch):

- ``regex``: used, when installed, for the pre-tokenisation pattern (``\\p{L}``/``\\p{N}`` classes). Without it a
  hand-written scanner using :mod:`unicodedata` categories is used; it agrees with ``regex`` except for characters
  whose Unicode category changed between the two libraries' Unicode versions.
- ``ftfy``: ``ftfy.fix_text`` is applied, as open_clip does, when installed. Without it only a cheap part of what
  ftfy does is applied (NFC normalisation, curly quotes straightened, Latin ligatures split), so texts with mojibake,
  full-width characters or control characters may tokenise differently from open_clip.

Only numpy and the standard library are required. The merges come from open_clip's ``bpe_simple_vocab_16e6.txt.gz``
or from an exported ``tokenizer.json`` (a Hugging Face ``tokenizers`` file holding the same BPE; read as JSON here,
the ``tokenizers`` package is not needed).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import logging
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

try:  # pragma: no cover - exercised through whichever branch is installed
    import regex as _regex
except ImportError:  # pragma: no cover
    _regex = None

try:  # pragma: no cover
    import ftfy as _ftfy
except ImportError:  # pragma: no cover
    _ftfy = None

log = logging.getLogger(__name__)

__all__ = ["BPETokenizer", "CAPTION_CLEAN_CHARS", "clean_caption", "default_vocab_path", "VOCAB_FILENAME", "SOT_TOKEN",
           "EOT_TOKEN"]

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
_SPECIAL_TOKENS = (SOT_TOKEN, EOT_TOKEN)
_NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file (line 0 is a header)
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_CACHE_LIMIT = 200_000


# ---------------------------------------------------------------------------------------------------------------------
# text cleaning
# ---------------------------------------------------------------------------------------------------------------------

# The characters TBPS-CLIP's caption cleaning replaces by a space (also written into exported preprocess.json).
CAPTION_CLEAN_CHARS: tuple[str, ...] = (".", "!", '"', "(", ")", "*", "#", ":", ";", "~")
_CAPTION_PUNCT = re.compile("[" + re.escape("".join(CAPTION_CLEAN_CHARS)) + "]")


def clean_caption(text: str) -> str:
    """TBPS-CLIP caption preprocessing.

    Lower-cases, replaces each of ``. ! " ( ) * # : ; ~`` by a space, collapses runs of whitespace into one space
    and strips the ends. No truncation by word count is done here (the tokenizer truncates to its context length).
    """
    text = _CAPTION_PUNCT.sub(" ", text.lower())
    return " ".join(text.split())


_QUOTES = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
})
_LIGATURES = str.maketrans({
    "\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\ufb05": "ſt", "\ufb06": "st",
    "\u0132": "IJ", "\u0133": "ij", "\u01c7": "LJ", "\u01c8": "Lj", "\u01c9": "lj", "\u01ca": "NJ", "\u01cb": "Nj",
    "\u01cc": "nj",
})


def _fix_text(text: str) -> str:
    if _ftfy is not None:
        return _ftfy.fix_text(text)
    # Partial stand-in for ftfy.fix_text (see the module docstring).
    return unicodedata.normalize("NFC", text).translate(_QUOTES).translate(_LIGATURES)


def _clip_clean(text: str) -> str:
    """open_clip's ``clean='lower'``: basic clean, whitespace clean, lower-case (in that order)."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return " ".join(text.split()).lower()


# ---------------------------------------------------------------------------------------------------------------------
# pre-tokenisation
# ---------------------------------------------------------------------------------------------------------------------

_ALTERNATIVES = [re.escape(t) for t in _SPECIAL_TOKENS] + list(_CONTRACTIONS)
_REGEX_PATTERN = (
    None
    if _regex is None
    else _regex.compile("|".join(_ALTERNATIVES) + r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", _regex.IGNORECASE)
)
_FIXED = _SPECIAL_TOKENS + _CONTRACTIONS  # tried in this order, like the regex alternation


def _kind(ch: str) -> str:
    """'L' letter, 'N' number, 'S' whitespace, 'P' anything else."""
    if ch.isspace():
        return "S"
    cat = unicodedata.category(ch)[0]
    return cat if cat in ("L", "N") else "P"


def _fold(ch: str) -> str:
    # Simple case folding as the regex IGNORECASE flag applies it to the fixed alternatives. The text is already
    # lower-cased, so the only character that can still match one of them case-insensitively is the long s.
    return "s" if ch == "\u017f" else ch.lower()


def _pretokenize_fallback(text: str) -> list[str]:
    """Scanner equivalent to CLIP's pattern, for when the ``regex`` module is not installed."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        matched = False
        for fixed in _FIXED:
            m = len(fixed)
            if i + m <= n and all(_fold(text[i + j]) == fixed[j] for j in range(m)):
                out.append(text[i : i + m])
                i += m
                matched = True
                break
        if matched:
            continue
        kind = _kind(text[i])
        if kind == "S":
            i += 1
        elif kind == "N":
            out.append(text[i])
            i += 1
        else:  # a run of letters, or a run of "other" characters
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
            out.append(text[i:j])
            i = j
    return out


def _pretokenize(text: str) -> list[str]:
    if _REGEX_PATTERN is not None:
        return _REGEX_PATTERN.findall(text)
    return _pretokenize_fallback(text)


# ---------------------------------------------------------------------------------------------------------------------
# byte <-> unicode table and vocabulary
# ---------------------------------------------------------------------------------------------------------------------


def _byte_to_char() -> list[str]:
    """CLIP's reversible byte -> printable character table (index = byte value)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table: dict[int, int] = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + extra
            extra += 1
    return [chr(table[b]) for b in range(256)]


_BYTE_CHARS = _byte_to_char()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_CHARS)}
# The 256 base symbols in CLIP's order: printable bytes first (in byte order), then the remapped ones.
_BASE_SYMBOLS = sorted(_BYTE_CHARS, key=ord)


def default_vocab_path() -> Path:
    """Locate the BPE merges file shipped inside the installed open_clip package, without importing it."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    origin = getattr(spec, "origin", None) if spec is not None else None
    if origin:
        candidate = Path(origin).parent / VOCAB_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"BPE vocabulary '{VOCAB_FILENAME}' not found: open_clip is not installed here. Pass vocab_path= "
        f"(an exported artifact carries a copy of '{VOCAB_FILENAME}')."
    )


def _load_merges(path: Path) -> tuple[list[tuple[str, str]], dict[str, int] | None]:
    """The first :data:`_NUM_MERGES` merges of a BPE file: open_clip's gzip'd merges list, or a Hugging Face
    ``tokenizer.json`` (``.json``; its ``model.merges`` in ``"a b"`` or ``["a", "b"]`` form). Also returns the
    ``tokenizer.json``'s vocabulary (token -> id), ``None`` for the gzip file."""
    if path.suffix == ".json":
        return _load_hf_json(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path}: cannot read the BPE merges file ({exc}); expected a gzip'd '{VOCAB_FILENAME}'"
        ) from exc
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines[1 : _NUM_MERGES + 1], start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}: line {lineno} is not a BPE merge ('a b'): {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != _NUM_MERGES:
        raise ValueError(f"{path}: expected {_NUM_MERGES} BPE merges after the header line, found {len(merges)}")
    return merges, None


def _load_hf_json(path: Path) -> tuple[list[tuple[str, str]], dict[str, int]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ValueError(f"{path}: not a Hugging Face tokenizers file with a BPE model ('model.type' = 'BPE')")
    raw, vocab = model.get("merges"), model.get("vocab")
    if not isinstance(raw, list) or not isinstance(vocab, dict):
        raise ValueError(f"{path}: 'model.merges' must be a list and 'model.vocab' an object")
    merges: list[tuple[str, str]] = []
    for i, entry in enumerate(raw[:_NUM_MERGES]):
        parts = entry.split(" ") if isinstance(entry, str) else entry
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise ValueError(f"{path}: model.merges[{i}] is not a BPE merge ('a b' or ['a', 'b']): {entry!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != _NUM_MERGES:
        raise ValueError(f"{path}: expected at least {_NUM_MERGES} BPE merges in model.merges, found {len(merges)}")
    return merges, vocab


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------------------------


class BPETokenizer:
    """CLIP BPE tokenizer (open_clip ``SimpleTokenizer`` compatible) returning numpy arrays.

    Args:
        vocab_path: gzip'd BPE merges file (``bpe_simple_vocab_16e6.txt.gz``), or a Hugging Face ``tokenizer.json``
            holding the same BPE (as exports write; its vocabulary must give CLIP's ids). ``None`` uses the
            merges file inside the installed open_clip package (found without importing open_clip).
        context_length: row length of :meth:`__call__` output.
        vocab_map: optional remapping ``original id -> new id`` (vocabulary pruning), applied to every non-padding
            position (SOT and EOT included) by :meth:`__call__`; padding stays 0.
        unk_id: new id for original ids missing from ``vocab_map``; ``None`` makes a missing id a ``ValueError``.
    """

    def __init__(
        self,
        vocab_path: str | Path | None = None,
        context_length: int = 77,
        vocab_map: Mapping[int, int] | None = None,
        unk_id: int | None = None,
    ) -> None:
        if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (room for SOT and EOT), got {context_length!r}")
        self.vocab_path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        if not self.vocab_path.is_file():
            raise FileNotFoundError(f"{self.vocab_path}: BPE vocabulary file not found; pass vocab_path=")
        self.context_length = context_length

        merges, file_vocab = _load_merges(self.vocab_path)
        vocab = list(_BASE_SYMBOLS) + [s + "</w>" for s in _BASE_SYMBOLS] + [a + b for a, b in merges]
        vocab += list(_SPECIAL_TOKENS)
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        if file_vocab is not None and file_vocab != self.encoder:
            wrong = [t for t, i in self.encoder.items() if file_vocab.get(t) != i]
            raise ValueError(f"{self.vocab_path}: 'model.vocab' does not give CLIP's ids ({len(wrong)} token(s) "
                             f"differ, e.g. {wrong[:3]}) or holds extra tokens")
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.merges: list[tuple[str, str]] = merges
        self._ranks: dict[tuple[str, str], int] = {pair: r for r, pair in enumerate(merges)}
        self.vocab_size = len(vocab)
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self._cache: dict[str, list[int]] = {}

        self.unk_id = unk_id
        self.vocab_map: dict[int, int] | None = None
        self._lookup: np.ndarray | None = None
        if vocab_map is not None:
            self._set_vocab_map(vocab_map, unk_id)

    # -- vocabulary remapping -----------------------------------------------------------------------------------------

    def _set_vocab_map(self, vocab_map: Mapping[int, int], unk_id: int | None) -> None:
        clean: dict[int, int] = {}
        for k, v in vocab_map.items():
            try:
                orig, new = int(k), int(v)
            except (TypeError, ValueError):
                raise ValueError(f"vocab_map: entry {k!r} -> {v!r} is not an int -> int pair") from None
            if not 0 <= orig < self.vocab_size:
                raise ValueError(f"vocab_map: original id {orig} outside the vocabulary [0, {self.vocab_size})")
            if new < 0:
                raise ValueError(f"vocab_map: new id for {orig} is negative ({new})")
            clean[orig] = new
        if unk_id is not None and unk_id < 0:
            raise ValueError(f"unk_id must be >= 0, got {unk_id}")
        lookup = np.full(self.vocab_size, -1 if unk_id is None else unk_id, dtype=np.int64)
        for orig, new in clean.items():
            lookup[orig] = new
        self.vocab_map = clean
        self._lookup = lookup
        # open_clip's text pooling takes the argmax of the ids as the EOT position: warn when a remap breaks that.
        eot_new = clean.get(self.eot_token_id)
        if eot_new is None:
            log.warning("vocab_map has no entry for the EOT id %d", self.eot_token_id)
        elif any(v > eot_new for v in clean.values()) or (unk_id is not None and unk_id > eot_new):
            log.warning("vocab_map: EOT maps to %d, which is not the largest new id; argmax-based EOT pooling "
                        "will pick the wrong position", eot_new)

    # -- BPE ----------------------------------------------------------------------------------------------------------

    def _bpe(self, word: str) -> list[str]:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = self._ranks
        while len(symbols) > 1:
            best_rank, best = None, None
            for pair in zip(symbols, symbols[1:], strict=False):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, pair
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids(self, token: str) -> list[int]:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        if token in _SPECIAL_TOKENS:  # matched by the pattern's first alternatives: kept whole, like open_clip
            ids = [self.encoder[token]]
        else:
            byte_text = "".join(_BYTE_CHARS[b] for b in token.encode("utf-8"))
            ids = [self.encoder[s] for s in self._bpe(byte_text)]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Original BPE ids of ``text`` (open_clip cleaning applied), without SOT/EOT and without ``vocab_map``."""
        ids: list[int] = []
        for token in _pretokenize(_clip_clean(text)):
            ids.extend(self._word_ids(token))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of original ids (the inverse of :meth:`encode` up to cleaning); SOT is skipped, EOT ends the text."""
        pieces: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.eot_token_id:
                break
            if i != self.sot_token_id:
                pieces.append(self.decoder[i])
        raw = bytes(_CHAR_TO_BYTE[c] for c in "".join(pieces))
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenise into an ``(N, context_length)`` int64 array: ``[SOT] ids [EOT]``, zero-padded.

        Too-long sequences are cut to ``context_length`` with EOT as the last token (as open_clip does).
        ``vocab_map`` (if any) is applied to the non-padding positions.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] is {type(text).__name__}, expected str")
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > length:
                tokens = tokens[:length]
                tokens[-1] = self.eot_token_id
            out[row, : len(tokens)] = tokens
            if self._lookup is not None:
                mapped = self._lookup[out[row, : len(tokens)]]
                if (mapped < 0).any():
                    missing = sorted({int(t) for t, m in zip(tokens, mapped, strict=True) if m < 0})
                    raise ValueError(
                        f"texts[{row}]: token ids {missing[:10]} are not in vocab_map and unk_id is None"
                    )
                out[row, : len(tokens)] = mapped
        return out
