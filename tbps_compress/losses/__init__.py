"""Task and distillation losses, picked by name from a recipe.

Importing this package registers every loss (``tbps`` task losses, ``kd`` distillation losses).
"""

from tbps_compress.losses import kd, tbps  # noqa: F401  (registers the losses)
from tbps_compress.losses.registry import (
    LossEntry,
    LossFn,
    LossInputs,
    LossParams,
    LossSet,
    get_loss,
    hidden_proj_key,
    list_losses,
    loss_needs,
    make_modules,
    register_loss,
    ssl_head,
)

__all__ = [
    "LossEntry",
    "LossFn",
    "LossInputs",
    "LossParams",
    "LossSet",
    "get_loss",
    "hidden_proj_key",
    "list_losses",
    "loss_needs",
    "make_modules",
    "register_loss",
    "ssl_head",
]
