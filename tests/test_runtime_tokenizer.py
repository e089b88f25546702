"""The torch-free BPE tokenizer gives exactly open_clip's ids (open_clip is the reference here)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tbps_compress.runtime import tokenizer as tok_mod
from tbps_compress.runtime.tokenizer import BPETokenizer, clean_caption, default_vocab_path

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

COLOURS = ["red", "dark-blue", "Light Grey", "BLACK", "white", "navy", "khaki", "beige", "pinkish", "off-white"]
GARMENTS = ["t-shirt", "jacket", "jeans", "skirt", "backpack", "sneakers", "hoodie", "coat", "dress", "scarf"]
PEOPLE = ["A woman", "The man", "a young girl", "An elderly man", "This pedestrian", "A boy", "the lady"]
EXTRAS = [
    "he's carrying a bag", "she's got long hair", "they're walking fast", "it'll rain", "he'd stop", "i'm sure",
    "we've seen 2 bags", "about 1.75m tall", "in the 1990s style", "holding 3 umbrellas", "wearing a café apron",
    "her naïve smile", "Zoë's shoes", "with a 👜 handbag", "smiling 😀😀", "a 红色 hat", "size XL/XXL",
    "(maybe) #tagged; ~approx: yes!", 'says "hello"', "price $20 & up", "50% off", "e-mail@example.com",
    "“curly quotes” and ’apostrophes’", "Tom &amp; Jerry &lt;3", "über-cool straße", "ﬁne ligature",
    "full-width ＡＢＣ１２３", "a\ttab\nnewline", "  double  spaces  ", "<start_of_text> literal", "it'ſ odd",
    "x²+½ ⅻ", "ÀÉÎÕÜ", "Ελληνικά λέξεις", "русский текст", "'quoted' words", "o'clock", "rock'n'roll",
]


def _sentences(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "A", "!!!", "...", "a.b.c", "123456789", "can't won't shouldn't", "'s 't 're 've 'm 'll 'd"]
    while len(out) < n:
        parts = [
            f"{rng.choice(PEOPLE)} wearing a {rng.choice(COLOURS)} {rng.choice(GARMENTS)}",
            f"and {rng.choice(COLOURS)} {rng.choice(GARMENTS)}",
        ]
        for _ in range(rng.randint(0, 3)):
            parts.append(rng.choice(EXTRAS))
        sep = rng.choice([", ", ". ", "; ", " - ", "  ", "!", " "])
        text = sep.join(parts) + rng.choice([".", "", "!", " ?", "..."])
        if rng.random() < 0.15:  # long captions that must be truncated
            text = " ".join([text] * rng.randint(4, 8))
        if rng.random() < 0.1:
            text = text.upper()
        out.append(text)
    return out


@pytest.fixture(scope="module")
def reference():
    return open_clip_tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer()


def test_default_vocab_is_open_clips_file():
    assert default_vocab_path().name == "bpe_simple_vocab_16e6.txt.gz"
    assert default_vocab_path().parent.name == "open_clip"


def test_ids_match_open_clip(tokenizer, reference):
    texts = _sentences()
    ours = tokenizer(texts)
    ref = reference(texts, context_length=77).numpy()
    assert ours.dtype == np.int64 and ours.shape == (len(texts), 77)
    bad = [t for t, a, b in zip(texts, ours, ref, strict=True) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} texts differ, e.g. {bad[:3]}"
    assert (ref[:, -1] == reference.eot_token_id).any(), "corpus must contain truncated captions"
    # encode() gives the ids without SOT/EOT, like open_clip's encode
    for text in texts[:50]:
        assert tokenizer.encode(text) == reference.encode(text)


def test_cleaned_captions_and_short_context_match(tokenizer, reference):
    texts = [clean_caption(t) for t in _sentences(120, seed=1)]
    short = BPETokenizer(context_length=16)
    np.testing.assert_array_equal(short(texts), reference(texts, context_length=16).numpy())
    np.testing.assert_array_equal(tokenizer(texts), reference(texts, context_length=77).numpy())


def test_single_string_and_special_ids(tokenizer, reference):
    out = tokenizer("a man in a red coat")
    assert out.shape == (1, 77)
    assert out[0, 0] == reference.sot_token_id == tokenizer.sot_token_id
    np.testing.assert_array_equal(out, reference("a man in a red coat").numpy())
    assert tokenizer.vocab_size == reference.vocab_size == 49408
    assert tokenizer.decode(out[0]) == "a man in a red coat"
    empty = tokenizer("")
    assert empty[0, :3].tolist() == [tokenizer.sot_token_id, tokenizer.eot_token_id, 0]


def test_truncation_keeps_eot_last(tokenizer):
    out = tokenizer(["word " * 200])
    assert out[0, -1] == tokenizer.eot_token_id
    assert (out[0] != 0).all()


def test_fallback_pretokenizer_matches_regex():
    if tok_mod._regex is None:
        pytest.skip("regex not installed: the fallback is the only implementation")
    for text in _sentences(300, seed=2) + EXTRAS:
        cleaned = tok_mod._clip_clean(text)
        assert tok_mod._pretokenize_fallback(cleaned) == tok_mod._REGEX_PATTERN.findall(cleaned), cleaned


def test_without_regex_and_ftfy_plain_text_still_matches(monkeypatch, reference):
    monkeypatch.setattr(tok_mod, "_REGEX_PATTERN", None)
    monkeypatch.setattr(tok_mod, "_ftfy", None)
    tk = BPETokenizer()
    texts = [t for t in _sentences(150, seed=3) if t.isascii() and "&" not in t] + ["café", "ﬁne", "“hi” it’s"]
    np.testing.assert_array_equal(tk(texts), reference(texts).numpy())


def test_vocab_map():
    kept = [0, 320, 786, 1901, 49406, 49407]  # original ids, listed in new-id order
    vocab_map = {orig: new for new, orig in enumerate(kept)}
    base = BPETokenizer()
    ids = base("a red")[0]
    tk = BPETokenizer(vocab_map=vocab_map, unk_id=3)
    out = tk(["a red", "a zebra"])
    n = int((ids != 0).sum())
    assert out[0, :n].tolist() == [vocab_map.get(int(i), 3) for i in ids[:n]]
    assert (out[0, n:] == 0).all()
    assert out[1, 0] == 4 and 3 in out[1].tolist()
    strict = BPETokenizer(vocab_map=vocab_map)
    with pytest.raises(ValueError, match="unk_id"):
        strict(["a zebra"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        BPETokenizer(vocab_map={10**6: 1})


def test_clean_caption():
    assert clean_caption('  A Man (in "RED")!  wearing:   a coat; ~ok*#.  ') == "a man in red wearing a coat ok"
    assert clean_caption("") == ""
    assert clean_caption("he's a t-shirt, 2 bags") == "he's a t-shirt, 2 bags"


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab"):
        BPETokenizer(tmp_path / "missing.txt.gz")
    with pytest.raises(ValueError, match="context_length"):
        BPETokenizer(context_length=1)
    corrupt = tmp_path / "bpe.txt.gz"
    corrupt.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="BPE merges"):
        BPETokenizer(corrupt)
