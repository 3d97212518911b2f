"""`volfm fit` progress in logs: LineProgressBar prints whole lines (epoch, batches, step, metrics), no carriage
returns; VolfmCLI puts it in place of Lightning's bar only off a terminal, and never against a recipe's choice."""
from __future__ import annotations

import io
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from volfm.cli.main import main
from volfm.cli.progress import LineProgressBar, line_progress_wanted


class ToyModel(pl.LightningModule):
    def __init__(self, patch_size: int = 4):
        super().__init__()
        self.net = torch.nn.Linear(patch_size, 1)

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ToyData(pl.LightningDataModule):
    def __init__(self, patch_size: int = 4, batches: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(2 * batches, patch_size, generator=g), torch.randn(2 * batches, 1, generator=g))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=2)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=4)


def quiet_trainer(**kw):
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
                      num_sanity_val_steps=1, **kw)


def test_line_progress_bar_writes_whole_lines_with_epoch_and_step(capfd):
    log = io.StringIO()  # not a terminal
    bar = LineProgressBar(file=log, every_s=0.0)  # every_s=0: a line per batch, to see the running lines
    trainer = quiet_trainer(max_epochs=2, callbacks=[bar])
    trainer.fit(ToyModel(), datamodule=ToyData())
    assert trainer.progress_bar_callback is bar
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert "epoch 0/1: 1/4 batch (25 %)," in lines[0]
    assert any(line.startswith("epoch 0/1: 4/4 batch in ") for line in lines)
    assert any(line.startswith("epoch 0/1 validation: 2/2 batch in ") for line in lines)
    done = [line for line in lines if ": step " in line]
    assert [line.split(";")[0] for line in done] == ["epoch 0/1: step 4", "epoch 1/1: step 8"]
    assert all("train_loss " in line and "val_loss " in line for line in done)
    assert not any("Sanity" in line or "v_num" in line for line in lines)  # the sanity check prints nothing
    out, err = capfd.readouterr()
    assert "\r" not in out + err


def test_default_rate_is_one_final_line_per_epoch_and_evaluation():
    log = io.StringIO()
    trainer = quiet_trainer(max_epochs=1, callbacks=[LineProgressBar(file=log)])
    trainer.fit(ToyModel(), datamodule=ToyData())
    trainer.validate(ToyModel(), datamodule=ToyData(), verbose=False)
    lines = log.getvalue().splitlines()
    assert [line.split(" in ")[0].split(";")[0] for line in lines] == [
        "epoch 0/0 validation: 2/2 batch", "epoch 0/0: 4/4 batch", "epoch 0/0: step 4", "validation: 2/2 batch"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_line_progress_only_off_a_terminal_and_not_against_the_recipe():
    assert line_progress_wanted(None, None, io.StringIO())
    assert not line_progress_wanted(None, None, Terminal())
    assert not line_progress_wanted(False, None, io.StringIO())  # the recipe turned the bar off
    own = {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar"}
    assert not line_progress_wanted(True, [own], io.StringIO())  # the recipe names its own bar
    assert not line_progress_wanted(True, TQDMProgressBar(), io.StringIO())
    assert line_progress_wanted(True, [{"class_path": "lightning.pytorch.callbacks.EarlyStopping"}], io.StringIO())


@pytest.fixture
def importable(monkeypatch):
    """This module under a name jsonargparse can import (pytest's importlib mode does not register it)."""
    mod = type(sys)("volfm_fit_progress_toys")
    mod.ToyModel, mod.ToyData = ToyModel, ToyData
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod.__name__


def fit_args(name, tmp_path, *extra):
    return ["fit", "--model", f"{name}.ToyModel", "--data", f"{name}.ToyData", "--trainer.max_epochs", "2",
            "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path), *extra]


def test_volfm_fit_into_a_log_has_no_carriage_returns(importable, tmp_path, capfd):
    assert main(fit_args(importable, tmp_path)) == 0
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    assert "epoch 1/1: step 8; train_loss " in err and "epoch 0/1: 4/4 batch in " in err
    # a recipe that turns the bar off gets none, and no error about a progress bar callback
    assert main(fit_args(importable, tmp_path, "--trainer.enable_progress_bar", "false")) == 0
    out, err = capfd.readouterr()
    assert "\r" not in out + err and "step 8" not in err
