"""tbps_compress.runtime: the torch-free deployment runtime.

Only numpy, Pillow, onnxruntime (imported on first model use) and the standard library are needed; ``regex`` and
``ftfy`` are used when installed (see :mod:`tbps_compress.runtime.tokenizer`). Nothing here imports torch, torchvision
or open_clip.
"""

from .encoder import (
    IMAGE_MODEL_FILE,
    PREPROCESS_FILE,
    TEXT_MODEL_FILE,
    TOKENIZER_FILE,
    OnnxEncoder,
    RuntimeConfigError,
    cosine_topk,
    l2_normalize,
    load_preprocess_config,
    load_tokenizer,
)
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessConfig, load_image, preprocess_images
from .tokenizer import VOCAB_FILENAME, BPETokenizer, clean_caption, default_vocab_path

__all__ = [
    "BPETokenizer",
    "IMAGE_MODEL_FILE",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "OnnxEncoder",
    "PREPROCESS_FILE",
    "PreprocessConfig",
    "RuntimeConfigError",
    "TEXT_MODEL_FILE",
    "TOKENIZER_FILE",
    "VOCAB_FILENAME",
    "clean_caption",
    "cosine_topk",
    "default_vocab_path",
    "l2_normalize",
    "load_image",
    "load_preprocess_config",
    "load_tokenizer",
    "preprocess_images",
]
