"""A Hugging Face ``tokenizers`` file (``tokenizer.json``) equal to the runtime's caption tokenisation.

:func:`build_hf_tokenizer` builds CLIP's byte-level BPE from open_clip's shipped merges file, so that
``tokenizers.Tokenizer.from_file("tokenizer.json").encode(caption).ids`` is what the runtime feeds the text tower:
``open_clip``'s ``SimpleTokenizer`` ids of ``clean_caption(caption)``, ``[SOT] ids [EOT]`` padded with 0 to the
context length (a caption that is too long keeps its first ``context_length - 2`` tokens, then EOT).

The normaliser replays, in order:

1. the caption cleaning (:func:`tbps_compress.runtime.tokenizer.clean_caption`): lower-case, each of
   :data:`~tbps_compress.runtime.tokenizer.CAPTION_CLEAN_CHARS` replaced by a space, runs of whitespace (Python's
   ``str.isspace`` set) collapsed into one space, ends stripped;
2. the table-driven parts of ``ftfy.fix_text`` that open_clip applies: C1 controls read as Windows-1252, Latin
   ligatures split, half/full-width forms to standard width, curly quotes straightened, invisible control
   characters removed, NFC;
3. open_clip's whitespace clean-up and lower-casing.

Not replayed (the ids differ from open_clip's for such text): HTML character references (``&amp;``, ``&#233;``,
decoded by ftfy and ``html.unescape``), mojibake repair (``ftfy.fix_encoding``), terminal escape sequences, a
capital sigma with more than two case-ignorable characters between it and the cased letter before it (Python writes
the final form), and the special-token text ``<start_of_text>`` / ``<end_of_text>`` right after another
punctuation character.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import UserError

log = logging.getLogger(__name__)

__all__ = ["TOKENIZERS_HINT", "build_hf_tokenizer", "python_whitespace_class", "write_hf_tokenizer"]

TOKENIZERS_HINT = "pip install 'tokenizers>=0.19'"
# CLIP's pre-tokenisation pattern without its special-token alternatives (those are added tokens here). The text is
# lower-case by then, so open_clip's IGNORECASE changes one thing only: the long s (U+017F) folds to "s" in "'s".
_SPLIT_PATTERN = "'[s\u017f]|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+"
_SINGLE_QUOTES = "\u02bc\u2018\u2019\u201a\u201b"  # ftfy.chardata.SINGLE_QUOTE_RE
_DOUBLE_QUOTES = "\u201c\u201d\u201e\u201f"  # ftfy.chardata.DOUBLE_QUOTE_RE
# Python's str.lower() writes a capital sigma as the final form when a cased letter precedes it (case-ignorable
# characters such as apostrophes may sit between) and none follows; tokenizers' Lowercase always writes sigma.
_FINAL_SIGMA = (r"(?<=\p{Cased}|\p{Cased}\p{Case_Ignorable}|\p{Cased}\p{Case_Ignorable}\p{Case_Ignorable})"
                "\u03a3" r"(?!\p{Case_Ignorable}*\p{Cased})")


def _char_class(chars: str) -> str:
    """A regex character class matching exactly ``chars``, written literally (``\\ ] [ ^ -`` escaped) so that any
    regex engine reading the JSON (Oniguruma, JavaScript, ...) understands it."""
    return "[" + "".join("\\" + c if c in "\\][^-" else c for c in sorted(set(chars))) + "]"


def python_whitespace_class() -> str:
    """A regex character class of the characters Python's ``str.split()`` splits on (``str.isspace``); wider than
    Unicode's White_Space (it holds U+001C..U+001F)."""
    return _char_class("".join(chr(c) for c in range(0x110000) if chr(c).isspace()))


def _ftfy_tables() -> tuple[dict[str, str], dict[str, str], str]:
    """(C1 control -> Windows-1252 character, single character -> replacement for ligatures then widths, control
    characters ftfy deletes), from the installed ftfy (an open_clip dependency)."""
    try:
        from ftfy import chardata, fixes
    except ImportError as exc:
        raise UserError("writing tokenizer.json needs ftfy (installed with open_clip_torch): pip install ftfy") from exc
    c1 = {chr(c): fixes.fix_c1_controls(chr(c)) for c in range(0x80, 0xA0)}
    ligatures = {chr(k): v for k, v in chardata.LIGATURES.items()}
    widths = {chr(k): v for k, v in chardata.WIDTH_MAP.items()}
    deleted = "".join(chr(k) for k in chardata.CONTROL_CHARS)
    return c1, {**ligatures, **widths}, deleted


def build_hf_tokenizer(context_length: int, vocab_path: Path | None = None) -> Any:
    """A ``tokenizers.Tokenizer`` giving the runtime's ids for raw captions (see the module docs).

    Args:
        context_length: row length (the text tower's input length), >= 2.
        vocab_path: open_clip's ``bpe_simple_vocab_16e6.txt.gz``; ``None`` uses the installed open_clip's copy.

    Raises:
        UserError: ``tokenizers`` or ``ftfy`` is not installed, or ``context_length`` is below 2.
    """
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE
    except ImportError as exc:
        raise UserError(f"writing tokenizer.json needs the tokenizers package: {TOKENIZERS_HINT}") from exc
    from ..runtime.tokenizer import CAPTION_CLEAN_CHARS, EOT_TOKEN, SOT_TOKEN, BPETokenizer

    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
        raise UserError(f"context_length must be an int >= 2 (room for SOT and EOT), got {context_length!r}")
    bpe = BPETokenizer(vocab_path, context_length=context_length)
    vocab = dict(bpe.encoder)
    merges = list(bpe.merges)
    c1, char_map, deleted = _ftfy_tables()
    space = python_whitespace_class()

    def replace_each(table: dict[str, str]) -> list[Any]:
        return [normalizers.Replace(src, dst) for src, dst in table.items()]

    steps: list[Any] = [
        # 1. clean_caption
        normalizers.Replace(Regex(_FINAL_SIGMA), "\u03c2"),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(_char_class("".join(CAPTION_CLEAN_CHARS))), " "),
        normalizers.Replace(Regex(space + "+"), " "),
        normalizers.Strip(),
        # 2. ftfy.fix_text (table-driven parts, in ftfy's order)
        *replace_each(c1),
        *replace_each(char_map),
        normalizers.Replace(Regex(_char_class(_SINGLE_QUOTES)), "'"),
        normalizers.Replace(Regex(_char_class(_DOUBLE_QUOTES)), '"'),
        normalizers.Replace(Regex(_char_class(deleted)), ""),
        normalizers.NFC(),
        # 3. open_clip's whitespace_clean + lower
        normalizers.Replace(Regex(space + "+"), " "),
        normalizers.Strip(),
        normalizers.Lowercase(),
    ]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, dropout=None))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
    ])
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " "), decoders.Strip(" ", 0, 1)])
    # Matched in the normalised (lower-case) text, as open_clip's pattern matches them in its cleaned text.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in (SOT_TOKEN, EOT_TOKEN)])
    sot, eot = bpe.sot_token_id, bpe.eot_token_id
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT_TOKEN} $A {EOT_TOKEN}", special_tokens=[(SOT_TOKEN, sot), (EOT_TOKEN, eot)])
    tok.enable_truncation(max_length=context_length, strategy="longest_first", direction="right")
    tok.enable_padding(direction="right", pad_id=0, pad_token=bpe.decoder[0], length=context_length)
    return tok


def write_hf_tokenizer(path: Path, context_length: int, vocab_path: Path | None = None,
                       tokenizer: Any = None) -> None:
    """Write :func:`build_hf_tokenizer`'s tokenizer (or ``tokenizer``, one it built) to ``path`` (ASCII JSON, merges
    as ``"a b"`` strings, which every ``tokenizers`` version reads) and check that it loads back with the same ids."""
    tok = tokenizer if tokenizer is not None else build_hf_tokenizer(context_length, vocab_path)
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    path = Path(path)
    path.write_text(json.dumps(data, ensure_ascii=True), encoding="utf-8")
    probe = ["A Woman's T-shirt (Red); 3 bags.", "“Zoë” ﬁne ＡＢＣ", "word " * 100]
    try:
        back = [e.ids for e in Tokenizer.from_file(str(path)).encode_batch(probe)]
    except Exception as exc:  # tokenizers raises its own exception types
        raise UserError(f"{path}: the tokenizers package cannot read the file it wrote ({exc}); upgrade it "
                        f"({TOKENIZERS_HINT})") from exc
    if back != [e.ids for e in tok.encode_batch(probe)]:
        raise UserError(f"{path}: the tokenizers file does not load back with the same ids; upgrade tokenizers "
                        f"({TOKENIZERS_HINT})")
