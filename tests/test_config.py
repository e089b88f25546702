"""Recipe loading: strict keys, errors that name the file / key / value / line, ``--set`` overrides, dump/load."""

from __future__ import annotations

from pathlib import Path

import pytest

from tbps_compress.config import apply_overrides, dump_recipe, load_recipe, read_yaml
from tbps_compress.errors import ConfigError
from tbps_compress.losses import list_losses
from tbps_compress.recipes import IMAGE_OPS, TrainRecipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _recipe_file(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_recipe(path, TrainRecipe, overrides)
    return str(exc.value)


def test_unknown_key_names_key_path_and_file(tmp_path: Path) -> None:
    path = _recipe_file(tmp_path, "optim:\n  epochs: 2\n  batchsize: 8\n")
    msg = _error(path)
    assert str(path) in msg and "optim.batchsize" in msg and "unknown key" in msg
    msg = _error(_recipe_file(tmp_path, "optimiser: {epochs: 2}\n", "top.yaml"))
    assert "'optimiser'" in msg


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    msg = _error(_recipe_file(tmp_path, "optim:\n  epochs: many\n"))
    assert "optim.epochs" in msg and "'many'" in msg
    msg = _error(_recipe_file(tmp_path, "optim:\n  lr: -1\n", "neg.yaml"))
    assert "optim.lr" in msg and "-1" in msg and "greater than 0" in msg


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = _recipe_file(tmp_path, "seed: 1\noptim:\n  epochs: [1, 2\n  lr: 0.1\n")
    msg = _error(path)
    assert str(path) in msg and "YAML syntax error" in msg
    assert "line 4" in msg  # where the parser notices the unclosed list
    msg = _error(_recipe_file(tmp_path, "seed: 1\n\tbad: tab\n", "tab.yaml"))
    assert "line 2" in msg


def test_empty_non_mapping_missing_and_non_utf8_files(tmp_path: Path) -> None:
    assert "empty" in _error(_recipe_file(tmp_path, "# only a comment\n", "empty.yaml"))
    assert "mapping" in _error(_recipe_file(tmp_path, "- a\n- b\n", "list.yaml"))
    assert "not found" in _error(tmp_path / "missing.yaml")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("output: runs/caf\xe9\n".encode("latin-1"))
    msg = _error(latin)
    assert str(latin) in msg and "UTF-8" in msg


def test_set_overrides_and_creates_sections(tmp_path: Path) -> None:
    path = _recipe_file(tmp_path, "optim:\n  epochs: 2\n")
    r = load_recipe(path, TrainRecipe, ["optim.batch_size=4", "data.root=/data/cuhk", "optim.betas=[0.8, 0.9]",
                                        "tricks.global_gradients=false", "model.checkpoint=null"])
    assert r.optim.epochs == 2 and r.optim.batch_size == 4
    assert r.data.root == "/data/cuhk" and r.optim.betas == (0.8, 0.9)
    assert r.tricks.global_gradients is False and r.model.checkpoint is None
    data = apply_overrides({"a": {"x": 1}}, ["a.b=c", "new.deep.key=3", "a.x=2"])
    assert data == {"a": {"x": 2, "b": "c"}, "new": {"deep": {"key": 3}}}


def test_set_errors(tmp_path: Path) -> None:
    path = _recipe_file(tmp_path, "seed: 1\n")
    assert "key.path=value" in _error(path, ["optim.lr"])
    assert "'seed' is not a section" in _error(path, ["seed.x=1"])
    msg = _error(path, ["optim.epochs=zero"])
    assert "optim.epochs" in msg and "'zero'" in msg
    assert "optim.bogus" in _error(path, ["optim.bogus=1"])


def test_unknown_loss_lists_valid_names(tmp_path: Path) -> None:
    path = _recipe_file(tmp_path, "losses:\n  n_itc: {weight: 1.0}\n  n_itcc: {weight: 1.0}\n")
    msg = _error(path)
    assert str(path) in msg and "n_itcc" in msg and "losses" in msg
    for name in list_losses():
        assert name in msg
    msg = _error(_recipe_file(tmp_path, "losses:\n  r_itc: {weight: 1.0, epsilon: 2}\n", "param.yaml"))
    assert str(tmp_path / "param.yaml") in msg and "epsilon" in msg


def test_unknown_augmentation_lists_valid_ops(tmp_path: Path) -> None:
    path = _recipe_file(tmp_path, "augment:\n  image:\n    pool: [hflip, gaussian_blur]\n")
    msg = _error(path)
    assert str(path) in msg and "augment.image.pool" in msg and "gaussian_blur" in msg
    for op in IMAGE_OPS:
        assert op in msg


def test_min_lr_above_lr_is_rejected(tmp_path: Path) -> None:
    msg = _error(_recipe_file(tmp_path, "optim: {lr: 1.0e-5, min_lr: 1.0e-4}\n"))
    assert "min_lr" in msg


def test_read_yaml_is_safe(tmp_path: Path) -> None:
    """Python object tags are not constructed."""
    path = _recipe_file(tmp_path, "seed: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError):
        read_yaml(path)


def _all_train_recipes() -> list[TrainRecipe]:
    recipes = [TrainRecipe(), TrainRecipe.model_validate({"optim": {"grad_cache_chunk": 4, "betas": [0.8, 0.9]},
                                                        "augment": {"image": {"pool": ["hflip"], "num_ops": 1}},
                                                        "losses": {"n_itc": None, "id": {"weight": 0.5}}})]
    recipes += [load_recipe(p, TrainRecipe) for p in sorted((RECIPES / "teacher").glob("*.yaml"))]
    return recipes


@pytest.mark.parametrize("index", range(len(_all_train_recipes())))
def test_dump_load_round_trip(tmp_path: Path, index: int) -> None:
    recipe = _all_train_recipes()[index]
    path = tmp_path / "recipe.resolved.yaml"
    dump_recipe(recipe, path)
    again = load_recipe(path, TrainRecipe)
    assert again.model_dump() == recipe.model_dump()
    dump_recipe(again, tmp_path / "twice.yaml")
    assert (tmp_path / "twice.yaml").read_text() == path.read_text()
