"""The one record format every dataset reader produces."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One gallery image with its identity and captions.

    ``image`` is relative to the dataset's image root; ``pid`` is the dataset's own identity label (contiguous
    training labels are made per split by :func:`remap_ids`).
    """

    image: str
    pid: int
    captions: tuple[str, ...]
    split: str
    captions_bt: tuple[str, ...] | None = None


@dataclass
class TBPSDataset:
    """All records of a dataset plus where its images live."""

    root: Path
    image_root: Path
    format: str
    annotation: Path
    records: list[Record] = field(default_factory=list)

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def splits(self) -> list[str]:
        return [s for s in SPLITS if any(r.split == s for r in self.records)]

    def image_path(self, record: Record) -> Path:
        return self.image_root / record.image

    def stats(self) -> dict[str, dict[str, int]]:
        """Per split: number of identities, images and captions."""
        out: dict[str, dict[str, int]] = {}
        for name in self.splits():
            recs = self.split(name)
            out[name] = {
                "identities": len({r.pid for r in recs}),
                "images": len(recs),
                "captions": sum(len(r.captions) for r in recs),
            }
        return out


def remap_ids(records: Iterable[Record]) -> dict[int, int]:
    """Map identity labels to contiguous indices 0..N-1 in order of first appearance."""
    mapping: dict[int, int] = {}
    for r in records:
        if r.pid not in mapping:
            mapping[r.pid] = len(mapping)
    return mapping


def caption_pairs(records: Sequence[Record]) -> list[tuple[int, int]]:
    """Flatten to (record index, caption index) pairs: one training or query sample per caption."""
    return [(i, j) for i, r in enumerate(records) for j in range(len(r.captions))]
