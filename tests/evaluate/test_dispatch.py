"""`volfm.evaluate.evaluate` reads a checkpoint once and picks the protocol of its task; a checkpoint of a task
without an evaluate protocol, or not written by volfm, gets a one-line error naming the file."""
import lightning.pytorch as pl
import pytest
import torch

from volfm import VolfmError
from volfm.evaluate import evaluate
from volfm.targets.labelmap import LabelMap
from volfm.tasks import EncoderConfig, SegmentationTask


def _saved(task, path):
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(path.parent))
    trainer.strategy.connect(task)
    trainer.save_checkpoint(str(path))
    return path


def test_a_segmentation_checkpoint_is_refused_with_the_command_that_scores_it(tmp_path):
    task = SegmentationTask(encoder=EncoderConfig("resnet18_3d", {"in_chans": 1, "base_channels": 8}),
                            labels=["spleen"], patch_size=16)
    task.restore_record({"labelmap": LabelMap.from_names(["spleen"], {"spleen": 1}).to_dict()})
    ckpt = _saved(task, tmp_path / "seg.ckpt")
    raw = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    assert raw["volfm"]["task"] == "volfm.tasks.segmentation.SegmentationTask" and raw["volfm"]["patch_size"] == [16] * 3
    with pytest.raises(VolfmError, match=r"seg.ckpt holds a SegmentationTask; volfm evaluate takes pretraining or "
                                         r"synthesis checkpoints \(segmentation checkpoints are scored by volfm test\)"):
        evaluate(ckpt, store=tmp_path)


def test_a_foreign_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, bad)
    with pytest.raises(VolfmError, match="foreign.ckpt is not a volfm checkpoint"):
        evaluate(bad)
    with pytest.raises(VolfmError, match="does not exist"):
        evaluate(tmp_path / "missing.ckpt")
