"""SynthPedes: a procedural generator of pedestrian crops with captions in the CUHK-PEDES format.

Every identity is a set of discrete attributes (see :data:`ATTRIBUTE_FAMILIES`) plus a few hidden continuous
ones (skin tone, build, exact shade of each colour). Each image of an identity picks a viewpoint (front, back,
side), a pose, a camera (colour cast, exposure, blur, noise) and a cluttered scene, and draws the person with
Pillow. Captions describe only what that image shows (see :mod:`.captions`). About 30% of the
identities are near-copies of another identity of the same split that differ in one or two attributes, so that
retrieval needs fine detail.

Output (all paths relative to ``OUT``; the layout of CUHK-PEDES, whose loaders join ``OUT/imgs/<file_path>``)::

    reid_raw.json      CUHK-PEDES schema: split, captions, file_path, processed_tokens, id (+ captions_bt);
                       file_path is relative to imgs/, e.g. test/0001/0001_01.jpg
    synth_truth.json   ground truth, one entry per reid_raw.json entry: what each image shows and what each
                       caption states (see :func:`load_truth`)
    synth_meta.json    per-split counts, per-identity attributes, per-image view/camera/occluder, the families
    imgs/<split>/<id>/<id>_<k>.jpg

Identities are numbered test first (1..test_ids), then val, then train, and each split draws its identities and
near-copies from its own random stream; images and captions draw from streams keyed on the identity. So the val
and test splits (their reid_raw.json entries and image bytes) do not change with the number of training
identities. Everything is a pure function of the arguments and the seed: the same call writes the same bytes
whatever the number of worker processes.

Modules: :mod:`.attributes` (families, colours, identity sampling), :mod:`.scenes` (cameras, per-image plans),
:mod:`.render` (drawing with Pillow), :mod:`.captions` (annotator-like captions and the stated facts) and
:mod:`.writer` (split sizes, presets, the files above, the preview sheet).
"""

from .attributes import ATTRIBUTE_FAMILIES, NEAR_COPY_FRACTION, SPLIT_ORDER, VIEWS, make_identities, sample_identity
from .captions import COARSE_FAMILIES, COLOURS, TRUTH_FAMILIES
from .render import render_image, render_person
from .scenes import make_cameras, plan_images
from .writer import (
    ANNOTATION_FILE,
    DEFAULT_IDENTITIES,
    FORMAT_VERSION,
    META_FILE,
    MIN_IDENTITIES,
    MIN_TEST_IDS,
    PRESETS,
    TRUTH_FILE,
    TRUTH_FORMAT,
    TRUTH_VERSION,
    generate,
    load_truth,
    preset_settings,
    resolve_counts,
    save_preview,
    split_counts,
)

__all__ = [
    "ANNOTATION_FILE", "ATTRIBUTE_FAMILIES", "COARSE_FAMILIES", "COLOURS", "DEFAULT_IDENTITIES", "FORMAT_VERSION",
    "META_FILE", "MIN_IDENTITIES", "MIN_TEST_IDS", "NEAR_COPY_FRACTION", "PRESETS", "SPLIT_ORDER", "TRUTH_FAMILIES",
    "TRUTH_FILE", "TRUTH_FORMAT", "TRUTH_VERSION", "VIEWS", "generate", "load_truth", "make_cameras",
    "make_identities", "plan_images", "preset_settings", "render_image", "render_person", "resolve_counts",
    "sample_identity", "save_preview", "split_counts",
]
