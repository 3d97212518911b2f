"""volfm.configs: the packaged preprocessing specs (``specs/``), training recipes (``recipes/``, ``recipes/demo/``)
and zero-shot prompt sets (``prompts/``). The repository's top-level ``preprocessing/`` and ``recipes/`` hold the
same files for users to copy and edit (a test keeps them equal)."""
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
SPECS_DIR = CONFIG_DIR / "specs"
RECIPES_DIR = CONFIG_DIR / "recipes"
PROMPTS_DIR = CONFIG_DIR / "prompts"

__all__ = ["CONFIG_DIR", "PROMPTS_DIR", "RECIPES_DIR", "SPECS_DIR"]
