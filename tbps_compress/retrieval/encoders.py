"""One encoder mechanism for every artifact kind, and one evaluation of an encoder on a dataset split.

- :class:`DatasetEncoder`: what everything that embeds images and captions uses (evaluation, ``eval``, ``bench``,
  quantisation, pruning, the layer probe, training-time validation and gallery search). It satisfies the index's
  :class:`~tbps_compress.retrieval.index.Encoder` protocol (``encode_images`` / ``encode_texts``: L2-normalised
  float32 numpy rows) and adds ``encode_image_files`` (decode files batch by batch; a file that does not decode is
  one :class:`~tbps_compress.errors.DataError` line) and ``encode_split``.
- :class:`TorchEncoder`: a PyTorch model (a built or loaded model, or a torch artifact through
  :meth:`TorchEncoder.from_artifact`) on any device, in fp32, bf16 or fp16. Evaluation transform: PIL bicubic resize
  to the model input, ``/ 255``, CLIP mean / std; captions through ``clean_caption`` and the model's tokenizer.
- :class:`OnnxRuntimeEncoder`: an exported ONNX artifact, wrapping the torch-free
  :class:`tbps_compress.runtime.OnnxEncoder` (which reads the artifact's own ``preprocess.json`` and tokenizer).
- :func:`open_encoder`: the encoder of an artifact folder (ONNX or torch).
- :class:`Split`: a split's records and their image paths (:func:`load_split` reads one from a dataset root).
- :func:`evaluate`: ``evaluate(encoder, split)`` -> text-to-image R@1/5/10, mAP, mINP (percent), through
  :func:`~tbps_compress.retrieval.metrics.metrics_from_embeddings`.

Importing this module, and using an ONNX encoder, does not import torch; the torch encoder imports it in its
constructor, and :func:`evaluate` when it computes the metrics.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..artifacts import Artifact, open_artifact
from ..errors import UserError
from ..io_utils import open_image_rgb
from ..models.meta import meta_of
from ..runtime.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessConfig, preprocess_images
from ..runtime.tokenizer import clean_caption

if TYPE_CHECKING:
    import torch

    from ..data.records import Record, TBPSDataset
    from ..runtime import OnnxEncoder

__all__ = ["DEFAULT_BATCH", "PRECISIONS", "DatasetEncoder", "OnnxRuntimeEncoder", "Split", "SplitEmbeddings",
           "TorchEncoder", "evaluate", "load_split", "normalize_pixels", "open_encoder"]

DEFAULT_BATCH = 128  # images / captions per forward pass when an encoder is given no batch size for a split
PRECISIONS = ("fp32", "bf16", "fp16")


# ---------------------------------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Split:
    """The records of a dataset split and the image file of each record (same order).

    ``images``: optionally the split's images already decoded and resized (a
    :class:`~tbps_compress.data.loader.ImageStore`, as training keeps for its validation split); a
    :class:`TorchEncoder` whose input size matches reads them instead of the files. Other encoders use the files.
    """

    records: Sequence[Record]
    image_paths: Sequence[Path]
    images: Any = None

    def __post_init__(self) -> None:
        if len(self.records) != len(self.image_paths):
            raise ValueError(f"a split needs one image path per record: {len(self.records)} records, "
                             f"{len(self.image_paths)} paths")

    @classmethod
    def of(cls, dataset: TBPSDataset, records: Sequence[Record], images: Any = None) -> Split:
        """The split of ``records`` of ``dataset`` (image paths resolved by the dataset)."""
        return cls(list(records), [dataset.image_path(r) for r in records], images)

    @property
    def captions(self) -> list[str]:
        """Every caption of every record (the queries), record by record."""
        return [c for r in self.records for c in r.captions]

    @property
    def image_pids(self) -> np.ndarray:
        return np.array([r.pid for r in self.records], dtype=np.int64)

    @property
    def text_pids(self) -> np.ndarray:
        return np.array([r.pid for r in self.records for _ in r.captions], dtype=np.int64)


def load_split(data: Path, split: str = "test", format: str | None = None) -> tuple[TBPSDataset, Split]:
    """(dataset, split) of a dataset root; an empty or missing split is a :class:`UserError` naming the splits."""
    from ..data.readers import load_dataset

    ds = load_dataset(Path(data), format)
    recs = ds.split(split)
    if not recs:
        raise UserError(f"{ds.annotation}: no records in split '{split}' (splits present: {', '.join(ds.splits())})")
    return ds, Split.of(ds, recs)


@dataclass
class SplitEmbeddings:
    """L2-normalised float32 embeddings of a split: images (G, D) with their identities, captions (Q, D) with theirs."""

    image: np.ndarray
    image_pids: np.ndarray
    text: np.ndarray
    text_pids: np.ndarray

    def metrics(self) -> dict[str, float]:
        """Text-to-image R@1/5/10, mAP and mINP (percent)."""
        from .metrics import metrics_from_embeddings

        return metrics_from_embeddings(self.text, self.image, self.text_pids, self.image_pids)


def evaluate(encoder: DatasetEncoder, split: Split) -> dict[str, float]:
    """Text-to-image R@1/5/10, mAP and mINP (percent) of ``encoder`` on ``split``: captions are the queries, the
    split's images the gallery, a hit is an image of the caption's identity."""
    return encoder.encode_split(split).metrics()


# ---------------------------------------------------------------------------------------------------------------------
# encoders
# ---------------------------------------------------------------------------------------------------------------------


class DatasetEncoder(ABC):
    """Images and captions to L2-normalised float32 embeddings (one row per input).

    ``batch_size``: inputs per forward pass (``None``: :meth:`encode_images` / :meth:`encode_texts` use the
    backend's default, and files / splits go :data:`DEFAULT_BATCH` at a time).
    """

    kind: str = ""
    batch_size: int | None = None

    @abstractmethod
    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed PIL images: ``(N, D)`` float32."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed raw captions (cleaned here, as in training): ``(N, D)`` float32."""

    def encode_image_files(self, paths: Sequence[Path]) -> np.ndarray:
        """Embed image files, decoding one batch at a time."""
        if not paths:
            return self.encode_images([])
        step = self.batch_size or DEFAULT_BATCH
        return np.concatenate([self.encode_images([open_image_rgb(p) for p in paths[s:s + step]])
                               for s in range(0, len(paths), step)], axis=0)

    def encode_split(self, split: Split) -> SplitEmbeddings:
        """Embed every image and every caption of a split."""
        return SplitEmbeddings(image=self._split_images(split), image_pids=split.image_pids,
                               text=self.encode_texts(split.captions), text_pids=split.text_pids)

    def _split_images(self, split: Split) -> np.ndarray:
        return self.encode_image_files(split.image_paths)


def _check_batch(batch_size: int | None) -> int | None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UserError(f"batch size {batch_size!r}: must be a positive integer")
    return batch_size


class OnnxRuntimeEncoder(DatasetEncoder):
    """An exported ONNX artifact run by onnxruntime (torch-free): wraps a
    :class:`tbps_compress.runtime.OnnxEncoder` (``runtime``), whose sessions and tokenizer stay reachable."""

    kind = "onnx"

    def __init__(self, runtime: OnnxEncoder, batch_size: int | None = None) -> None:
        self.runtime = runtime
        self.batch_size = _check_batch(batch_size)

    @classmethod
    def open(cls, folder: Path, *, providers: Sequence[str] | None = None, threads: int | None = None,
             optimize: bool = True, batch_size: int | None = None) -> OnnxRuntimeEncoder:
        """The encoder of the ONNX files in ``folder`` (an artifact folder, verified or not)."""
        from ..runtime import OnnxEncoder

        return cls(OnnxEncoder(folder, providers=providers, threads=threads, optimize=optimize), batch_size)

    def _kw(self) -> dict[str, int]:
        return {"batch_size": self.batch_size} if self.batch_size else {}

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.runtime.encode_images(list(images), **self._kw())

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.runtime.encode_texts(list(texts), **self._kw())


def normalize_pixels(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) images, already resized, to the model input: float32 ``/ 255`` then CLIP mean / std (the
    torch twin of :func:`~tbps_compress.runtime.preprocess.preprocess_images`, same float32 arithmetic)."""
    import torch

    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std


def _torch_dtype(precision: str) -> torch.dtype:
    import torch

    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class TorchEncoder(DatasetEncoder):
    """A PyTorch model (``encode_image`` / ``encode_text`` with ``normalize=True``, its config in
    ``meta_of(model)``) as an encoder.

    Args:
        model: the model; put in eval mode for each call and returned to its previous mode afterwards.
        device: where to run (``auto``, ``cpu``, ``cuda[:N]`` or a ``torch.device``); the model is moved there (in
            place). ``None``: where the model's parameters are.
        precision: ``fp32`` | ``bf16`` | ``fp16``: the model is cast to it (in place) and so are its image inputs.
            ``None``: the model as it is, inputs in float32.
        tokenizer: captions to token ids (default: the model's tokenizer, with its vocabulary map if pruned).
        clean: caption cleaning before tokenising (default: :func:`~tbps_compress.runtime.tokenizer.clean_caption`).
        batch_size: see :class:`DatasetEncoder` (``None``: one forward pass per ``encode_*`` call).
    """

    kind = "torch"

    def __init__(self, model: Any, *, device: str | torch.device | None = None, precision: str | None = None,
                 tokenizer: Callable[[Sequence[str]], torch.Tensor] | None = None,
                 clean: Callable[[str], str] | None = None, batch_size: int | None = None) -> None:
        import torch

        from ..models.config import image_size_hw

        self._torch = torch
        if device is None:
            first = next(iter(model.parameters()), None)
            self.device = first.device if first is not None else torch.device("cpu")
        else:
            if isinstance(device, str):
                from ..devices import resolve_device

                device = resolve_device(device)
            self.device = torch.device(device)
            model.to(self.device)
        self.dtype = _torch_dtype(precision) if precision is not None else None
        if self.dtype is not None:
            model.to(self.dtype)
        self.precision = precision
        self.model = model
        self._tokenizer = tokenizer
        self.clean = clean or clean_caption
        self.image_size = image_size_hw(meta_of(model).config)
        self.batch_size = _check_batch(batch_size)
        self._preprocess: PreprocessConfig | None = None

    @classmethod
    def from_artifact(cls, artifact: Artifact | Path, *, device: str | torch.device = "auto",
                      precision: str | None = None, batch_size: int | None = None) -> TorchEncoder:
        """Load a torch artifact's model (and its tokenizer) onto ``device``."""
        from ..devices import resolve_device
        from ..models.io import load_model

        art = artifact if isinstance(artifact, Artifact) else open_artifact(Path(artifact))
        dev = resolve_device(device) if isinstance(device, str) else device
        if precision is not None:
            _torch_dtype(precision)  # a bad name fails before the model is loaded
        model = load_model(art, device=dev, verify=False).eval()
        return cls(model, device=dev, precision=precision, batch_size=batch_size)

    @property
    def tokenizer(self) -> Callable[[Sequence[str]], torch.Tensor]:
        """Captions to token ids (built on first use when none was given)."""
        if self._tokenizer is None:
            from ..models.tokenizer import model_tokenizer

            self._tokenizer = model_tokenizer(self.model)
        return self._tokenizer

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with self._torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _image_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        return x.to(self.dtype) if self.dtype is not None else x

    # -- torch-side entry points (the layer probe re-embeds one tower many times from fixed inputs) ------------------

    def embed_pixels(self, images: Any) -> torch.Tensor:
        """Embed uint8 (3, H, W) images at the model input size (a sequence or an ``ImageStore``): (N, D) float32
        on the CPU."""
        torch = self._torch
        n = len(images)
        step = self.batch_size or DEFAULT_BATCH
        out = []
        with self._evaluating():
            for s in range(0, n, step):
                batch = torch.stack([images[i] for i in range(s, min(n, s + step))])
                x = self._image_input(normalize_pixels(batch))
                out.append(self.model.encode_image(x, normalize=True).float().cpu())
        return torch.cat(out) if out else torch.empty(0, 0)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embed token ids (Q, L): (Q, D) float32 on the CPU."""
        torch = self._torch
        step = self.batch_size or max(1, tokens.shape[0])
        out = []
        with self._evaluating():
            for s in range(0, tokens.shape[0], step):
                out.append(self.model.encode_text(tokens[s:s + step].to(self.device), normalize=True).float().cpu())
        return torch.cat(out) if out else torch.empty(0, 0)

    # -- the encoder interface -----------------------------------------------------------------------------------------

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if self._preprocess is None:
            self._preprocess = PreprocessConfig(image_size=self.image_size, mean=OPENAI_CLIP_MEAN,
                                                std=OPENAI_CLIP_STD, resize="bicubic")
        images = list(images)
        if not images:
            return np.zeros((0, 0), dtype=np.float32)
        step = self.batch_size or len(images)
        out = []
        with self._evaluating():
            for s in range(0, len(images), step):
                x = self._torch.from_numpy(preprocess_images(images[s:s + step], self._preprocess))
                out.append(self.model.encode_image(self._image_input(x), normalize=True).float().cpu().numpy())
        return np.concatenate(out, axis=0)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        step = self.batch_size or len(texts)
        out = []
        with self._evaluating():
            for s in range(0, len(texts), step):
                tokens = self.tokenizer([self.clean(t) for t in texts[s:s + step]]).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu().numpy())
        return np.concatenate(out, axis=0)

    def encode_image_files(self, paths: Sequence[Path]) -> np.ndarray:
        from ..data.loader import ImageStore

        return self.embed_pixels(ImageStore(paths, self.image_size, cache=False)).numpy()

    def _split_images(self, split: Split) -> np.ndarray:
        store = split.images
        if store is not None and tuple(getattr(store, "size", ())) == tuple(self.image_size):
            return self.embed_pixels(store).numpy()
        return self.encode_image_files(split.image_paths)


def open_encoder(artifact: Artifact | Path, *, device: str = "auto", precision: str | None = None,
                 providers: Sequence[str] | None = None, threads: int | None = None,
                 batch_size: int | None = None) -> DatasetEncoder:
    """The encoder of an artifact: :class:`OnnxRuntimeEncoder` for ONNX artifacts (``providers``, ``threads``; a
    CUDA ``device`` picks the CUDA provider when no providers are given), :class:`TorchEncoder` otherwise
    (``device``: auto | cpu | cuda[:N], ``precision``: fp32 | bf16 | fp16)."""
    art = artifact if isinstance(artifact, Artifact) else open_artifact(Path(artifact))
    if art.kind == "onnx":
        if precision is not None:
            raise UserError(f"{art.path}: an ONNX artifact runs in the precision of its graphs; a precision "
                            f"({precision!r}) applies to PyTorch artifacts only")
        if providers is None and device.startswith("cuda"):
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return OnnxRuntimeEncoder.open(art.path, providers=providers, threads=threads, batch_size=batch_size)
    return TorchEncoder.from_artifact(art, device=device, precision=precision, batch_size=batch_size)
