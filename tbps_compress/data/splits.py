"""The splits of one run, carved once: the dataset, its training records, validation and test records.

Every stage that trains or evaluates on a dataset (train, distill, prune, the probe) builds one :class:`Splits`
from its recipe's ``data`` and ``eval`` sections and hands it on (the prune stage to its recovery trainer), so the
rule is written once: a dataset without the validation split named by ``eval.val_split`` gets one carved from
``data.val_fraction`` of the training identities (seeded by the recipe's seed, :func:`carve_val`), and the training
records are ``data.train_fraction`` of the remaining training identities (:func:`identity_subset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UserError
from .loader import identity_subset, steps_per_epoch
from .records import Record, TBPSDataset

__all__ = ["Splits", "build_splits"]


@dataclass(frozen=True)
class Splits:
    """One run's view of a dataset (the dataset after any carving; records per role)."""

    dataset: TBPSDataset
    train: list[Record]
    val: list[Record]
    test: list[Record]
    val_split: str
    test_split: str

    def records(self, split: str) -> list[Record]:
        """Records of a split by name (``train`` is the recipe's training subset, not the whole split)."""
        if split == "train":
            return self.train
        if split == self.val_split:
            return self.val
        if split == self.test_split:
            return self.test
        return self.dataset.split(split)

    def train_captions(self) -> int:
        return sum(len(r.captions) for r in self.train)

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Optimiser steps in one pass over the training captions; a batch larger than the captions is a
        :class:`ConfigError` naming ``optim.batch_size``."""
        n = self.train_captions()
        per_epoch = steps_per_epoch(n, batch_size, world_size)
        if per_epoch < 1:
            raise ConfigError(f"optim.batch_size: {batch_size} x {world_size} process(es) exceeds the {n} training "
                              "captions; use a smaller batch")
        return per_epoch


def build_splits(recipe: Any, dataset: TBPSDataset | Splits | None = None) -> Splits:
    """The :class:`Splits` of a recipe with ``data``, ``eval`` and ``seed`` (a train, distill or prune recipe).

    ``dataset`` is an already loaded dataset (carved here as the recipe says) or finished splits (returned as they
    are); otherwise ``data.root`` is loaded."""
    if isinstance(dataset, Splits):
        return dataset
    from .readers import carve_val, load_dataset

    data, ev = recipe.data, recipe.eval
    ds = dataset if dataset is not None else load_dataset(Path(data.root), data.format, on_error=data.on_error)
    if ev.val_split not in ds.splits():
        ds = carve_val(ds, fraction=data.val_fraction, seed=recipe.seed)
    train = identity_subset(ds.split("train"), data.train_fraction, recipe.seed)
    if not train:
        raise UserError(f"{ds.annotation}: no training records in split 'train'")
    return Splits(dataset=ds, train=train, val=ds.split(ev.val_split), test=ds.split(ev.test_split),
                  val_split=ev.val_split, test_split=ev.test_split)
