"""Annotator-like captions for SynthPedes images.

Captions are written in two stages so that a faithful paraphrase can be produced: :func:`choose_content` picks
which visible facts a caption mentions and which colour word it uses for each (occasionally a vague or a slightly
wrong one, as real annotators do), then :func:`realize` turns that content into sentences with a randomly chosen
structure and synonyms. Realising the same content a second time with a different structure gives the
``captions_bt`` paraphrase (it stands in for back-translation).

Every fact in a content dict is realised by every template, so a caption and its paraphrase state exactly the
facts of their content. :func:`flatten_visible` and :func:`flatten_stated` turn the facts of an image and the
content of a caption into flat ``{family: value}`` dicts over :data:`TRUTH_FAMILIES`; SynthPedes writes them to its
ground-truth sidecar ``synth_truth.json``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

COLOURS: tuple[str, ...] = (
    "black", "white", "grey", "navy", "blue", "green", "red", "pink", "orange", "yellow", "purple", "brown", "beige",
)  # fmt: skip

MIN_WORDS = 15
MAX_WORDS = 40

# The families of the ground-truth sidecar, in order, and the coarse ones (what a low-resolution glance shows).
TRUTH_FAMILIES: tuple[str, ...] = (
    "gender", "build", "view", "hair_style", "hair_color", "hat", "hat_color", "face", "upper_type", "upper_color",
    "upper_pattern", "upper_color2", "upper_inner", "lower_type", "lower_color", "shoe_type", "shoe_color", "bag",
    "bag_color", "held", "held_color",
)  # fmt: skip
COARSE_FAMILIES: tuple[str, ...] = ("gender", "upper_type", "upper_color", "upper_pattern", "lower_type",
                                    "lower_color")

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of a caption, as in CUHK-PEDES ``processed_tokens`` (punctuation dropped)."""
    return _TOKEN_RE.findall(text.lower())


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------------

_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black",),
    "white": ("white",),
    "grey": ("grey", "gray"),
    "navy": ("navy", "dark blue", "navy blue"),
    "blue": ("blue", "bright blue", "royal blue"),
    "green": ("green",),
    "red": ("red",),
    "pink": ("pink",),
    "orange": ("orange",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "brown": ("brown",),
    "beige": ("beige", "khaki", "tan"),
    # vague colour words
    "dark": ("dark", "dark colored", "dark coloured"),
    "light": ("light", "light colored", "pale"),
    "bright": ("bright", "brightly colored"),
}
_VAGUE = {
    "black": "dark", "navy": "dark", "brown": "dark", "purple": "dark", "grey": "dark", "green": "dark",
    "white": "light", "beige": "light", "yellow": "light", "pink": "light",
    "red": "bright", "orange": "bright", "blue": "bright",
}  # fmt: skip
_NEAR = {
    "black": ("navy", "grey"), "white": ("grey", "beige"), "grey": ("white", "black"), "navy": ("black", "blue"),
    "blue": ("navy", "purple"), "green": ("blue", "grey"), "red": ("orange", "pink"), "pink": ("red", "purple"),
    "orange": ("red", "yellow"), "yellow": ("orange", "beige"), "purple": ("pink", "navy"),
    "brown": ("beige", "black"), "beige": ("white", "brown"),
}  # fmt: skip
_HAIR_COLOUR_WORDS = {
    "black": ("black", "dark"),
    "brown": ("brown", "dark brown", "light brown"),
    "blonde": ("blonde", "blond", "light blonde"),
    "grey": ("grey", "gray", "silver"),
    "red": ("red", "auburn", "ginger"),
}
# hair colour word -> hair colour, for the words that name exactly one hair colour
_HAIR_WORD_VALUE: dict[str, str] = {
    word: value for value, words in _HAIR_COLOUR_WORDS.items() for word in words
    if sum(word in ws for ws in _HAIR_COLOUR_WORDS.values()) == 1
}
_HAIR_LENGTH_WORDS = {
    "short": ("short", "short", "cropped"),
    "medium": ("medium length", "shoulder length", "chin length"),
    "long": ("long", "long", "long flowing"),
}

# (word, plural)
_NOUNS: dict[str, tuple[tuple[str, bool], ...]] = {
    "t-shirt": (("t-shirt", False), ("tee shirt", False), ("short sleeved shirt", False), ("tee", False)),
    "tank top": (("tank top", False), ("sleeveless top", False), ("sleeveless shirt", False)),
    "shirt": (("shirt", False), ("long sleeved shirt", False), ("button up shirt", False), ("collared shirt", False)),
    "sweater": (("sweater", False), ("jumper", False), ("pullover", False), ("knit sweater", False)),
    "hoodie": (("hoodie", False), ("hooded sweatshirt", False), ("sweatshirt with a hood", False)),
    "jacket": (("jacket", False), ("zip up jacket", False), ("short jacket", False)),
    "coat": (("coat", False), ("long coat", False), ("overcoat", False), ("knee length coat", False)),
    "dress": (("dress", False), ("knee length dress", False), ("one piece dress", False)),
    "trousers": (("trousers", True), ("pants", True), ("slacks", True), ("long pants", True)),
    "jeans": (("jeans", True), ("denim jeans", True), ("denim pants", True)),
    "shorts": (("shorts", True), ("short pants", True), ("knee length shorts", True)),
    "skirt": (("skirt", False), ("short skirt", False), ("knee length skirt", False)),
    "long skirt": (("long skirt", False), ("ankle length skirt", False), ("maxi skirt", False)),
    "sneakers": (("sneakers", True), ("trainers", True), ("running shoes", True), ("tennis shoes", True)),
    "boots": (("boots", True), ("ankle boots", True), ("short boots", True)),
    "sandals": (("sandals", True), ("open toed sandals", True), ("strappy sandals", True)),
    "leather shoes": (("leather shoes", True), ("dress shoes", True), ("loafers", True), ("formal shoes", True)),
    "backpack": (("backpack", False), ("back pack", False), ("rucksack", False)),
    "shoulder bag": (("shoulder bag", False), ("messenger bag", False), ("crossbody bag", False), ("satchel", False)),
    "handbag": (("handbag", False), ("purse", False), ("hand bag", False), ("tote bag", False)),
    "cap": (("baseball cap", False), ("cap", False), ("ball cap", False)),
    "beanie": (("beanie", False), ("knit hat", False), ("winter hat", False)),
    "sun hat": (("sun hat", False), ("wide brimmed hat", False), ("hat with a wide brim", False)),
    "glasses": (("glasses", True), ("eyeglasses", True), ("spectacles", True)),
    "sunglasses": (("sunglasses", True), ("dark glasses", True), ("shades", True)),
    "face mask": (("face mask", False), ("mask", False), ("surgical mask", False)),
    "phone": (("phone", False), ("cell phone", False), ("mobile phone", False), ("smartphone", False)),
    "umbrella": (("umbrella", False), ("closed umbrella", False), ("folded umbrella", False)),
    "cup": (("cup", False), ("coffee cup", False), ("paper cup", False)),
    "bottle": (("bottle", False), ("water bottle", False), ("plastic bottle", False)),
}
_PAIR_OK = {"trousers", "jeans", "shorts", "sneakers", "boots", "sandals", "leather shoes", "glasses", "sunglasses"}

_SUBJECT = {
    "male": ("man", "man", "man", "guy", "male", "young man", "gentleman"),
    "female": ("woman", "woman", "woman", "lady", "girl", "female", "young woman"),
}
_BUILD = {
    "slim": ("slim", "thin", "skinny", "slender"),
    "heavy": ("heavy", "heavyset", "chubby", "large", "stocky"),
}
_PRON = {"male": ("he", "his", "him"), "female": ("she", "her", "her")}

_OPTIONAL_KEEP_P = {
    "upper": 0.98, "lower": 0.9, "shoes": 0.72, "hair": 0.72, "hat": 0.85, "face": 0.75, "bag": 0.9,
    "held": 0.8, "build": 0.3, "view": 0.35,
}  # fmt: skip
# drop order when a caption is too long: least important first
_DROP_ORDER = ("view", "build", "held", "face", "hat", "shoes", "hair", "bag", "lower")


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


# ----------------------------------------------------------------------------------------------------------------
# Stage 0: what is visible in one image
# ----------------------------------------------------------------------------------------------------------------


def visible_facts(attrs: dict[str, str], extras: dict[str, Any], view: str, facing: str,
                  hidden: Sequence[str] = ()) -> dict[str, Any]:
    """The attributes a viewer could describe in one image, given its viewpoint and occlusions.

    ``view`` is ``front``, ``back`` or ``side``; ``facing`` is ``left``/``right`` (side views only, else ``""``);
    ``hidden`` names facts an occluder covers (e.g. ``shoes`` behind a car).
    """
    build, gender = attrs["body"].split()
    facts: dict[str, Any] = {"gender": gender, "build": build, "view": view, "facing": facing}
    style, hat = attrs["hair_style"], attrs["hat"]
    if style == "bald":
        facts["hair"] = None if hat != "none" else ("bald", None)
    elif hat in ("cap", "beanie") and style == "short":
        facts["hair"] = None
    else:
        facts["hair"] = (style, attrs["hair_color"])
    facts["hat"] = (hat, attrs["hat_color"]) if hat != "none" else None
    face = attrs["face_accessory"]
    facts["face"] = face if face != "none" and view != "back" else None
    pattern = attrs["upper_pattern"]
    if pattern == "logo" and view != "front":
        pattern = "plain"
    inner = None
    if attrs["upper_type"] in ("jacket", "coat") and view == "front":
        inner = attrs["upper_color2"]
    facts["upper"] = {"type": attrs["upper_type"], "colour": attrs["upper_color"], "pattern": pattern,
                      "colour2": attrs["upper_color2"], "inner": inner}
    facts["lower"] = (attrs["lower_type"], attrs["lower_color"]) if attrs["upper_type"] != "dress" else None
    facts["shoes"] = (attrs["shoe_type"], attrs["shoe_color"]) if "shoes" not in hidden else None
    bag = attrs["bag"]
    near = facing == extras.get("bag_side")
    if bag == "none" or (view == "side" and bag in ("shoulder bag", "handbag") and not near):
        facts["bag"] = None
    else:
        facts["bag"] = (bag, attrs["bag_color"], "straps" if bag == "backpack" and view == "front" else "")
    held = attrs["held"]
    held_near = facing == extras.get("held_side")
    if held == "none" or (held == "phone" and view == "back") or (
        view == "side" and held in ("phone", "cup", "bottle") and not held_near
    ):
        facts["held"] = None
    else:
        facts["held"] = (held, extras.get("held_color", "black"))
    return facts


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: what one caption says
# ----------------------------------------------------------------------------------------------------------------


# how often a caption names the second colour of each pattern (plain tops have none to name)
_SAY_COLOUR2_P = {"striped": 2 / 3, "checked": 2 / 3, "logo": 0.6, "two-tone": 1.0}


def _noisy_colour(colour: str, rng: np.random.Generator, p_vague: float = 0.04, p_wrong: float = 0.045,
                  p_omit: float = 0.03) -> str | None:
    r = float(rng.random())
    if r < p_vague:
        return _VAGUE[colour]
    if r < p_vague + p_wrong:
        return str(_pick(rng, _NEAR[colour]))
    if r < p_vague + p_wrong + p_omit:
        return None
    return colour


def choose_content(facts: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Pick the subset of facts one caption mentions, with the colour words it will use."""
    c: dict[str, Any] = {"gender": facts["gender"], "fillers": 0}
    for key in ("upper", "lower", "shoes", "hair", "hat", "face", "bag", "held"):
        if facts.get(key) is not None and rng.random() < _OPTIONAL_KEEP_P[key]:
            c[key] = facts[key]
    if facts["build"] != "average" and rng.random() < _OPTIONAL_KEEP_P["build"]:
        c["build"] = facts["build"]
    if rng.random() < _OPTIONAL_KEEP_P["view"]:
        c["view"] = (facts["view"], facts["facing"])
    if "upper" not in c and "lower" not in c:
        c["upper"] = facts["upper"]
    if "upper" in c:
        u = dict(c["upper"])
        u["colour"] = _noisy_colour(u["colour"], rng)
        colour2 = _noisy_colour(u["colour2"], rng, p_omit=0.1)
        if u["inner"] is not None:
            u["inner"] = _noisy_colour(u["inner"], rng) if rng.random() < 0.6 else None
        if u["pattern"] != "plain" and rng.random() < 0.12:
            u["pattern"] = "plain"  # annotators skip details
        # whether the second colour is said belongs to the content, so that the paraphrase says it too
        say2 = _SAY_COLOUR2_P.get(u["pattern"], 0.0)
        u["colour2"] = colour2 if colour2 is not None and rng.random() < say2 else None
        if u["pattern"] != "plain":
            u["inner"] = None  # a caption describes either the pattern or the layer underneath
        u["sleeves"] = rng.random() < 0.2
        c["upper"] = u
    for key in ("lower", "shoes", "hat"):
        if key in c:
            c[key] = (c[key][0], _noisy_colour(c[key][1], rng))
    if "bag" in c:
        kind, colour, extra = c["bag"]
        c["bag"] = (kind, _noisy_colour(colour, rng, p_omit=0.15 if extra else 0.05), extra)
    if "held" in c:
        kind, colour = c["held"]
        c["held"] = (kind, colour if kind == "umbrella" and rng.random() < 0.5 else None)
    if "hair" in c:
        style, colour = c["hair"]
        if colour is not None:
            # the hair colour word is part of the content: "light brown" and "dark brown" are different facts
            colour = None if rng.random() < 0.15 else str(_pick(rng, _HAIR_COLOUR_WORDS[colour]))
        c["hair"] = (style, colour)
    return c


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: words
# ----------------------------------------------------------------------------------------------------------------


class _Writer:
    """Turns one content dict into text with one random stream."""

    def __init__(self, content: dict[str, Any], rng: np.random.Generator) -> None:
        self.c = content
        self.rng = rng
        self.he, self.his, _ = _PRON[content["gender"]]

    def pick(self, seq: Sequence[Any]) -> Any:
        return _pick(self.rng, seq)

    def p(self, prob: float) -> bool:
        return bool(self.rng.random() < prob)

    def colour(self, colour: str | None) -> str:
        return "" if colour is None else str(self.pick(_COLOUR_WORDS[colour]))

    def noun_phrase(self, kind: str, colour: str | None, pre: str = "", post: str = "",
                    article: bool = True) -> str:
        word, plural = self.pick(_NOUNS[kind])
        words = " ".join(w for w in (pre, self.colour(colour), word) if w)
        if post:
            words = f"{words} {post}"
        if not article:
            return words
        if plural:
            return f"a pair of {words}" if kind in _PAIR_OK and self.p(0.2) else words
        return _article(words)

    def subject(self, article: str = "a") -> str:
        noun = self.pick(_SUBJECT[self.c["gender"]])
        build = self.c.get("build")
        phrase = f"{self.pick(_BUILD[build])} {noun}" if build in _BUILD else noun
        if article == "a":
            return _article(phrase)
        return f"{article} {phrase}" if article else phrase

    # --- items ---
    def upper(self) -> str:
        u = self.c["upper"]
        kind, c1, c2, pattern = u["type"], u["colour"], u["colour2"], u["pattern"]
        sleeve = ""
        if u.get("sleeves"):
            sleeve = {"t-shirt": "short sleeved", "dress": "", "tank top": "", "coat": ""}.get(kind, "long sleeved")
        if pattern == "striped":
            if c2 is None:
                text = self.noun_phrase(kind, c1, pre="striped")
            elif c1 is None or self.p(0.5):
                text = self.noun_phrase(kind, c1, post=f"with {self.colour(c2)} stripes")
            else:
                text = _article(f"{self.colour(c1)} and {self.colour(c2)} striped {self.pick(_NOUNS[kind])[0]}")
        elif pattern == "checked":
            pat = self.pick(("plaid", "checked", "checkered"))
            if c2 is None:
                text = self.noun_phrase(kind, c1, pre=pat)
            elif c1 is not None and self.p(0.5):
                text = _article(f"{self.colour(c1)} and {self.colour(c2)} {pat} {self.pick(_NOUNS[kind])[0]}")
            else:
                text = self.noun_phrase(kind, c1, post=f"with a {self.colour(c2)} {pat} pattern")
        elif pattern == "logo":
            what = self.pick(("logo", "graphic", "design", "print"))
            where = self.pick(("on the front", "on the chest", "on it"))
            col = f"{self.colour(c2)} " if c2 is not None else ""
            text = self.noun_phrase(kind, c1, post=f"with {_article(col + what)} {where}")
        elif pattern == "two-tone":
            if c2 is None:
                text = self.noun_phrase(kind, c1, pre="two tone")
            elif c1 is not None and self.p(0.5):
                text = _article(f"{self.colour(c1)} and {self.colour(c2)} {self.pick(_NOUNS[kind])[0]}")
            else:
                text = self.noun_phrase(kind, c1, post=f"with {self.colour(c2)} sleeves and shoulders")
        else:
            text = self.noun_phrase(kind, c1, pre=sleeve)
        inner = u.get("inner")
        if inner is not None and u["pattern"] == "plain":
            text += f" over {_article(self.colour(inner) + ' ' + self.pick(('shirt', 'top', 't-shirt')))}"
        return text

    def item(self, key: str) -> str:
        if key == "upper":
            return self.upper()
        if key == "face":
            return self.noun_phrase(self.c["face"], None)
        kind, colour = self.c[key][0], self.c[key][1]
        return self.noun_phrase(kind, colour)

    def hair(self, form: str) -> str:
        """form: 'np' -> 'short black hair'; 'has' -> 'has short black hair'/'is bald'."""
        style, colour = self.c["hair"]
        if style == "bald":
            if form == "np":
                return self.pick(("a bald head", "a shaved head"))
            return self.pick(("is bald", "has a shaved head", "has a bald head"))
        col = colour or ""
        if style in ("ponytail", "bun"):
            tied = "a ponytail" if style == "ponytail" else "a bun"
            phrase = self.pick((f"{col} hair tied in {tied}", f"{col} hair in {tied}",
                                f"{col} hair pulled into {tied}"))
            phrase = phrase.strip()
            return phrase if form == "np" else f"has {phrase}"
        length = self.pick(_HAIR_LENGTH_WORDS[style])
        if form == "has" and col and self.p(0.3):
            return f"has hair that is {length} and {col}"
        return (f"{length} {col} hair" if form == "np" else f"has {length} {col} hair").replace("  ", " ")

    def carry(self) -> list[str]:
        """Participial phrases for bag and held object: 'carrying a black backpack'."""
        out: list[str] = []
        if "bag" in self.c:
            kind, colour, extra = self.c["bag"]
            bag = self.noun_phrase(kind, colour)
            if kind == "backpack":
                if extra == "straps" and self.p(0.4):
                    out.append(f"wearing {bag} with the straps over {self.his} shoulders")
                else:
                    out.append(self.pick((f"carrying {bag}", f"wearing {bag}", f"carrying {bag} on {self.his} back")))
            elif kind == "shoulder bag":
                out.append(self.pick((f"carrying {bag}", f"carrying {bag} over {self.his} shoulder",
                                      f"wearing {bag} on {self.his} shoulder")))
            else:
                out.append(self.pick((f"carrying {bag}", f"holding {bag} in {self.his} hand", f"carrying {bag}")))
        if "held" in self.c:
            kind, colour = self.c["held"]
            obj = self.noun_phrase(kind, colour)
            if kind == "phone":
                out.append(self.pick((f"holding {obj}", f"looking at {self.his} {obj.split(' ', 1)[1]}",
                                      f"holding {obj} in {self.his} hand")))
            elif kind == "umbrella":
                out.append(self.pick((f"carrying {obj}", f"holding {obj}")))
            else:
                out.append(self.pick((f"holding {obj}", f"carrying {obj}", f"holding {obj} in {self.his} hand")))
        return out

    def view(self) -> str:
        view, facing = self.c["view"]
        if view == "front":
            return self.pick(("walking towards the camera", "facing the camera", "walking toward the camera"))
        if view == "back":
            return self.pick(("walking away from the camera", "facing away from the camera", "seen from behind"))
        return self.pick((f"walking to the {facing}", f"facing to the {facing}", f"heading {facing}"))

    def filler(self) -> str:
        he = self.he.capitalize()
        return str(self.pick((f"{he} appears to be walking down the street.", f"{he} is walking outside.",
                              f"{he} seems to be on {self.his} way somewhere.", f"{he} is out on the sidewalk.")))


def _join(items: Sequence[str], rng: np.random.Generator) -> str:
    items = list(items)
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    comma = "," if len(items) > 2 and rng.random() < 0.5 else ""
    return ", ".join(items[:-1]) + f"{comma} and {items[-1]}"


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    text = text.replace(" ,", ",")
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


N_TEMPLATES = 8


def realize(content: dict[str, Any], rng: np.random.Generator, template: int | None = None) -> tuple[str, int]:
    """Write one caption for ``content``; returns the text and the template index used."""
    w = _Writer(content, rng)
    t = int(rng.integers(N_TEMPLATES)) if template is None else template
    wear_keys = [k for k in ("upper", "lower", "shoes", "hat", "face") if k in content]
    rest = wear_keys[1:]
    rng.shuffle(rest)
    if wear_keys and wear_keys[0] == "upper" and rng.random() < 0.75:
        wear_keys = ["upper", *rest]
    else:
        wear_keys = [*wear_keys[:1], *rest]
        rng.shuffle(wear_keys)
    wear = [w.item(k) for k in wear_keys]
    carry = w.carry()
    has_hair = "hair" in content
    has_view = "view" in content
    he, his = w.he.capitalize(), w.his
    sents: list[str] = []
    if t == 0:
        # A woman with long black hair is wearing ... She is carrying ...
        with_part = f" with {w.hair('np')}" if has_hair else ""
        view = f" {w.view()}" if has_view else ""
        first = f"{w.subject('a')}{with_part}{view} is wearing {_join(wear, rng)}" if wear else \
            f"{w.subject('a')}{with_part}{view} is walking"
        sents.append(first)
        if carry:
            sents.append(f"{he} is {_join(carry, rng)}")
    elif t == 1:
        # The man is wearing ... He has ...
        sents.append(f"{w.subject('the')} is wearing {_join(wear, rng)}" if wear else f"{w.subject('the')} is walking")
        if has_hair:
            sents.append(f"{he} {w.hair('has')}")
        if carry:
            sents.append(f"{he} is {_join(carry, rng)}")
        if has_view:
            sents.append(f"{he} is {w.view()}")
    elif t == 2:
        # This person has on ... (named when no pronoun follows, and when the build is part of the content)
        follows = has_hair or bool(carry) or has_view
        who = w.subject("this") if "build" in content or not follows else "this person"
        sents.append(f"{who} has on {_join(wear, rng)}" if wear else f"{who} is walking")
        extra = []
        if has_hair:
            extra.append(w.hair("has"))
        if carry:
            extra.append(f"is {_join(carry, rng)}")
        if extra:
            sents.append(f"{he} {_join(extra, rng)}")
        if has_view:
            sents.append(f"{he} is {w.view()}")
    elif t == 3:
        # A man walking away from the camera in ...
        view = f" {w.view()}" if has_view else " walking"
        sents.append(f"{w.subject('a')}{view} in {_join(wear, rng)}" if wear else f"{w.subject('a')}{view}")
        if has_hair:
            sents.append(f"{he} {w.hair('has')}")
        if carry:
            sents.append(f"{he} is also {_join(carry, rng)}")
    elif t == 4:
        # List style: Woman wearing ..., carrying ..., with ...
        parts = [w.subject("")]
        if wear:
            parts.append(f"wearing {_join(wear, rng)}")
        parts.extend(carry)
        if has_hair:
            parts.append(f"with {w.hair('np')}")
        if has_view:
            parts.append(w.view())
        sents.append(", ".join(parts))
    elif t == 5:
        # She wears ... Her hair is ...
        build = content.get("build")
        lead = f"{w.he} is {w.pick(_BUILD[build])} and" if build in _BUILD else w.he
        sents.append(f"{lead} wears {_join(wear, rng)}" if wear else f"{lead} is walking")
        if has_hair:
            style, colour = content["hair"]
            if style in ("short", "medium", "long") and colour and rng.random() < 0.6:
                col = colour
                sents.append(f"{his} hair is {col} and {w.pick(_HAIR_LENGTH_WORDS[style])}")
            else:
                sents.append(f"{he} {w.hair('has')}")
        if carry:
            sents.append(f"{he} is {_join(carry, rng)}")
        if has_view:
            sents.append(f"{he} is {w.view()}")
    elif t == 6:
        # A woman who has ... is dressed in ... and is carrying ...
        who = f" who {w.hair('has')}" if has_hair else ""
        body = f"is dressed in {_join(wear, rng)}" if wear else "is walking"
        tail = f" and is {_join(carry, rng)}" if carry else ""
        sents.append(f"{w.subject('a')}{who} {body}{tail}")
        if has_view:
            sents.append(f"{he} is {w.view()}")
    else:
        # Dressed in ..., the man also has on ...
        if len(wear) >= 2:
            k = max(1, len(wear) // 2)
            sents.append(f"dressed in {_join(wear[:k], rng)}, {w.subject('the')} also has on {_join(wear[k:], rng)}")
        elif wear:
            sents.append(f"dressed in {wear[0]}, {w.subject('the')} is walking")
        else:
            sents.append(f"{w.subject('the')} is walking")
        if carry or has_hair:
            bits = ([w.hair("has")] if has_hair else []) + ([f"is {_join(carry, rng)}"] if carry else [])
            sents.append(f"{he} {_join(bits, rng)}")
        if has_view:
            sents.append(f"{he} is {w.view()}")
    text = " ".join(_sentence(s) for s in sents)
    for _ in range(content.get("fillers", 0)):
        text += " " + w.filler()
    return text, t


def _fit(content: dict[str, Any], facts: dict[str, Any], rng: np.random.Generator,
         template: int | None = None) -> tuple[str, int, dict[str, Any]]:
    """Realise ``content``, dropping or adding details until the caption is MIN_WORDS..MAX_WORDS words."""
    content = dict(content)
    text, t = "", 0
    for _ in range(16):
        text, t = realize(content, rng, template)
        n = len(tokenize(text))
        if n > MAX_WORDS - 3:  # leave the paraphrase a little room
            for key in _DROP_ORDER:
                if key in content and (key != "lower" or "upper" in content):
                    del content[key]
                    break
            else:
                content["fillers"] = 0
            continue
        if n < MIN_WORDS:
            if "view" not in content:
                content["view"] = (facts["view"], facts["facing"])
            elif content["fillers"] < 3:
                content["fillers"] += 1
            continue
        return text, t, content
    return text, t, content


def write_captions(facts: dict[str, Any], n: int, rng: np.random.Generator,
                   ) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """``n`` distinct captions for one image, a faithful paraphrase of each, and the content each realises.

    The content dicts are the final ones (after :func:`_fit` dropped details for length); a caption and its
    paraphrase state the same facts, those of its content (see :func:`flatten_stated`).
    """
    captions: list[str] = []
    paraphrases: list[str] = []
    contents: list[dict[str, Any]] = []
    for _ in range(n):
        text, t, content = "", 0, {}
        for _attempt in range(20):
            content = choose_content(facts, rng)
            text, t, content = _fit(content, facts, rng)
            if text not in captions:
                break
        captions.append(text)
        contents.append(content)
        bt = text
        for attempt in range(24):
            if attempt == 12:  # short content: let the paraphrase add a fact-free sentence
                content = {**content, "fillers": content.get("fillers", 0) + 1}
            other = (t + 1 + int(rng.integers(N_TEMPLATES - 1))) % N_TEMPLATES if attempt % 12 < 8 else None
            cand, _ = realize(content, rng, other)
            if cand != text and MIN_WORDS <= len(tokenize(cand)) <= MAX_WORDS:
                bt = cand
                break
        paraphrases.append(bt)
    return captions, paraphrases, contents


# ----------------------------------------------------------------------------------------------------------------
# Ground truth: flat {family: value} views of what an image shows and what a caption says
# ----------------------------------------------------------------------------------------------------------------


def flatten_visible(facts: dict[str, Any]) -> dict[str, str | None]:
    """What one image shows, as a value (or ``None``) for every family of :data:`TRUTH_FAMILIES`, in order.

    ``facts`` is :func:`visible_facts`' result. A thing the image does not show is the string ``"none"`` (no hat,
    no bag, nothing held, no face accessory or one a back view hides, hair hidden under a hat, shoes behind an
    occluder, no separate lower garment under a dress) and its colour is ``None``. ``view`` is front/back/side,
    ``build`` slim/average/heavy. ``upper_pattern`` is the pattern as seen (a logo only from the front, else
    ``"plain"``); ``upper_color2`` is the second colour only when that pattern shows one (stripes, checks,
    two-tone, logo), else ``None``; ``upper_inner`` is the colour of the layer under an open jacket or coat seen
    from the front, else ``None``; ``held_color`` is set only for umbrellas.
    """
    hair, hat, lower, shoes, bag, held = (facts.get(k) for k in ("hair", "hat", "lower", "shoes", "bag", "held"))
    upper = facts["upper"]
    pattern = upper["pattern"]
    return {
        "gender": facts["gender"], "build": facts["build"], "view": facts["view"],
        "hair_style": hair[0] if hair else "none", "hair_color": hair[1] if hair else None,
        "hat": hat[0] if hat else "none", "hat_color": hat[1] if hat else None,
        "face": facts.get("face") or "none",
        "upper_type": upper["type"], "upper_color": upper["colour"], "upper_pattern": pattern,
        "upper_color2": upper["colour2"] if pattern in _SAY_COLOUR2_P else None, "upper_inner": upper["inner"],
        "lower_type": lower[0] if lower else "none", "lower_color": lower[1] if lower else None,
        "shoe_type": shoes[0] if shoes else "none", "shoe_color": shoes[1] if shoes else None,
        "bag": bag[0] if bag else "none", "bag_color": bag[1] if bag else None,
        "held": held[0] if held else "none", "held_color": held[1] if held and held[0] == "umbrella" else None,
    }  # fmt: skip


def flatten_stated(content: dict[str, Any]) -> dict[str, str]:
    """What one caption says, as ``{family: value}`` for only the families it states (in :data:`TRUTH_FAMILIES`
    order).

    ``content`` is one of the dicts :func:`write_captions` returns. Colours are the value the content carries,
    which is what the caption's colour word means: usually the true colour, sometimes a vague one (``dark``,
    ``light``, ``bright``) or a near miss, recorded as given; a colour the caption leaves out is absent. A hair
    colour word is mapped back to its hair colour (``auburn`` -> ``red``) when it names exactly one, else kept as
    the word. ``gender`` is always stated; ``build`` (slim/heavy) and ``view`` only when the caption says them;
    ``upper_pattern`` only when the caption names a pattern (a caption that names none says nothing about it).
    """
    out: dict[str, str] = {"gender": content["gender"]}
    if content.get("build") is not None:
        out["build"] = content["build"]
    if "view" in content:
        out["view"] = content["view"][0]
    if "hair" in content:
        style, word = content["hair"]
        out["hair_style"] = style
        if word is not None:
            out["hair_color"] = _HAIR_WORD_VALUE.get(word, word)
    if "face" in content:
        out["face"] = content["face"]
    if "upper" in content:
        u = content["upper"]
        out["upper_type"] = u["type"]
        if u["colour"] is not None:
            out["upper_color"] = u["colour"]
        if u["pattern"] != "plain":
            out["upper_pattern"] = u["pattern"]
            if u["colour2"] is not None:
                out["upper_color2"] = u["colour2"]
        elif u.get("inner") is not None:
            out["upper_inner"] = u["inner"]
    for key, kind_family, colour_family in (("hat", "hat", "hat_color"), ("lower", "lower_type", "lower_color"),
                                            ("shoes", "shoe_type", "shoe_color"), ("bag", "bag", "bag_color"),
                                            ("held", "held", "held_color")):
        if key in content:
            out[kind_family] = content[key][0]
            if content[key][1] is not None:
                out[colour_family] = content[key][1]
    return {f: out[f] for f in TRUTH_FAMILIES if f in out}
