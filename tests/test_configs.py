"""Packaged configs (``volfm/configs``, the source) and the repository's user-facing copies (``preprocessing/``,
``recipes/``): same names, same bytes; every packaged spec validates and every packaged prompt set loads."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from volfm.configs import PROMPTS_DIR, RECIPES_DIR, SPECS_DIR
from volfm.metrics.zeroshot import load_prompts
from volfm.preprocess.spec import load_spec

REPO = Path(__file__).resolve().parents[1]

# (packaged folder, the repository's copy, glob): recipes/README.md is documentation, not a copy.
COPIES = [
    pytest.param(SPECS_DIR, REPO / "preprocessing", "*.yaml", id="specs"),
    pytest.param(RECIPES_DIR, REPO / "recipes", "**/*.yaml", id="recipes"),
]


def _files(folder: Path, pattern: str) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.glob(pattern)) if p.is_file()}


@pytest.mark.parametrize(("packaged", "copy", "pattern"), COPIES)
def test_repo_copies_equal_the_packaged_configs(packaged, copy, pattern):
    if not copy.is_dir():
        pytest.skip(f"{copy} is absent: volfm is installed without its repository (non-editable install)")
    ours, theirs = _files(packaged, pattern), _files(copy, pattern)
    assert ours, f"no {pattern} under {packaged}"
    only_packaged, only_copy = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    assert (only_packaged, only_copy) == ([], []), (
        f"file sets differ: only in {packaged}: {only_packaged}; only in {copy}: {only_copy}")
    differ = sorted(name for name in ours if ours[name] != theirs[name])
    assert differ == [], f"{copy} differs from the packaged {packaged} (the source; copy it over) in: {differ}"


@pytest.mark.parametrize("path", sorted(SPECS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_packaged_spec_validates(path):
    spec = load_spec(path)
    assert spec["name"] == path.stem
    assert load_spec(path.stem) == spec  # built-in specs are found by name


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("**/*.yaml")), ids=lambda p: p.relative_to(RECIPES_DIR).as_posix())
def test_packaged_recipe_is_a_yaml_mapping(path):
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(recipe, dict) and {"model", "data"} <= recipe.keys(), f"{path}: keys {sorted(recipe or {})}"


@pytest.mark.parametrize("path", sorted(PROMPTS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_packaged_prompt_set_loads(path):
    prompts = load_prompts(path)
    assert prompts, f"{path}: no findings"
    assert load_prompts(path.stem) == prompts  # built-in prompt sets are found by name
    for finding, entry in prompts.items():
        assert entry["codes"] and entry["positive"] and entry["negative"], f"{path}: {finding}: {entry}"


def test_there_are_packaged_specs_and_prompts():
    assert sorted(p.stem for p in SPECS_DIR.glob("*.yaml")), SPECS_DIR
    assert sorted(p.stem for p in PROMPTS_DIR.glob("*.yaml")), PROMPTS_DIR
