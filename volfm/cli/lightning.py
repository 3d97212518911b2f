"""``volfm fit | validate | test``: LightningCLI over recipe YAMLs (used by ``volfm.cli.main`` and the demo)."""
from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from volfm.cli.progress import LineProgressBar, line_progress_wanted

__all__ = ["VolfmCLI", "run_lightning"]


class VolfmCLI(LightningCLI):
    """LightningCLI with volfm's links: the DataModule's ``patch_size`` is the model's ``patch_size``. When stderr is
    not a terminal (a log file, a pipe) and the recipe neither turns the bar off nor names its own, the trainer gets a
    :class:`~volfm.cli.progress.LineProgressBar` (whole lines) instead of Lightning's ``\r``-redrawn bar."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.init_args.patch_size", "model.init_args.patch_size")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer") or {}
        given = self.trainer_defaults.get("callbacks") or []
        given = list(given) if isinstance(given, list | tuple) else [given]
        recipe = trainer.get("callbacks") or []
        recipe = list(recipe) if isinstance(recipe, list | tuple) else [recipe]
        if line_progress_wanted(trainer.get("enable_progress_bar"), [*recipe, *given], sys.stderr):
            # trainer_defaults' callbacks are added to the recipe's when the trainer is made (LightningCLI)
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": [*given, LineProgressBar()]}


def run_lightning(argv: list[str] | None) -> int:
    """``volfm fit|validate|test --config recipe.yaml [--trainer.max_epochs 3 ...]``: LightningCLI, so
    ``--print_config``, class_path/init_args and dotted overrides work as in Lightning; an unknown key is
    a LightningCLI (jsonargparse) error that names it. The model's ``patch_size`` is linked from the
    DataModule's, so the checkpoint records the window size that inference uses."""
    # args=None: LightningCLI reads sys.argv itself; given args (volfm.cli.main.main([...]) from Python or the
    # demo) take precedence, which is what its warning about sys.argv would question
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    VolfmCLI(None, None, subclass_mode_model=True, subclass_mode_data=True, args=argv,
             save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": "volfm"},
             auto_configure_optimizers=False)
    return 0
