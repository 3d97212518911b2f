"""The shared task base: settings groups from dicts or dataclasses, plain-data hyper-parameters that
``torch.load(weights_only=True)`` reads and that rebuild the task, one-line errors for bad groups."""
import io
from dataclasses import astuple
from pathlib import Path

import pytest
import torch
import yaml

from volfm import VolfmError
from volfm.cli.main import main
from volfm.tasks import (
    ContrastiveConfig,
    EncoderConfig,
    FinetuneConfig,
    IcdHeadConfig,
    OptimConfig,
    PretrainTask,
    SegmentationTask,
    SynthesisLossConfig,
    SynthesisTask,
)
from volfm.tasks.base import as_config, plain_data

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = EncoderConfig("resnet18_3d", {"in_chans": 1, "base_channels": 8})


def test_groups_come_from_dicts_or_dataclasses_and_unknown_keys_are_named():
    assert as_config(OptimConfig, None, "optim") == OptimConfig()
    assert as_config(OptimConfig, {"lr": 0.5}, "optim") == OptimConfig(lr=0.5)
    same = OptimConfig(lr=0.1)
    assert as_config(OptimConfig, same, "optim") is same
    with pytest.raises(VolfmError, match=r"optim: unknown key 'lrr' \(did you mean 'lr'\?\); known keys: lr, "):
        as_config(OptimConfig, {"lrr": 0.1}, "optim")
    with pytest.raises(VolfmError, match="optim must be a mapping"):
        as_config(OptimConfig, 0.1, "optim")
    with pytest.raises(VolfmError, match="finetune: unknown key 'lora_rank'"):
        SegmentationTask(encoder=TINY, labels=["spleen"], finetune={"mode": "lora", "lora_rank": 4})


def test_plain_data_is_what_a_weights_only_checkpoint_can_hold():
    data = plain_data({"icd": IcdHeadConfig(level="full"), "ks": (1, 5), "n": torch.tensor(3).numpy()[()]})
    assert data == {"icd": {**IcdHeadConfig(level="full").__dict__}, "ks": [1, 5], "n": 3}
    buf = io.BytesIO()
    torch.save({"hyper_parameters": data}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["hyper_parameters"] == data


@pytest.mark.parametrize("make", [
    lambda: PretrainTask(encoder=TINY, icd=IcdHeadConfig(level="block", min_count=2),
                         contrastive=ContrastiveConfig(embed_dim=16, text_config={"hidden_size": 32}),
                         optim=OptimConfig(lr=3e-4), patch_size=(32, 32, 32)),
    lambda: SegmentationTask(encoder=TINY, labels=["spleen"], finetune=FinetuneConfig(mode="partial", unfreeze_stages=2),
                             patch_size=16),
    lambda: SynthesisTask(encoder=TINY, losses=SynthesisLossConfig(l1=1.0, ssim=0.5), data_range=[0, 10]),
])
def test_hparams_are_plain_data_and_rebuild_the_same_task(make):
    task = make()
    hp = dict(task.hparams)
    buf = io.BytesIO()
    torch.save(hp, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # no pickled classes: dataclasses were stored as dicts
    assert loaded.pop("_class_path") == f"{type(task).__module__}.{type(task).__name__}"  # for --ckpt_path
    again = type(task)(**loaded)  # what load_from_checkpoint does (it drops keys that are not __init__ arguments)
    assert dict(again.hparams) == hp  # _class_path included
    for name in ("encoder_cfg", "optim_cfg", "inference_cfg", "patch_size"):
        assert getattr(again, name) == getattr(task, name)
    assert [n for n, _ in again.named_parameters()] == [n for n, _ in task.named_parameters()]


def test_task_defaults_and_errors():
    icd_only = PretrainTask(encoder=TINY)
    assert icd_only.use_icd and not icd_only.use_contrastive  # ICD pretext unless told otherwise
    assert astuple(icd_only.optim_cfg) == (1e-4, 0.05, 0.05)
    assert astuple(SegmentationTask(encoder=TINY, labels=["spleen"]).optim_cfg) == (1e-3, 1e-5, 0.0)
    # part of a group keeps the task's defaults for the rest (not the generic OptimConfig's)
    assert astuple(SegmentationTask(encoder=TINY, optim={"lr": 3e-3}).optim_cfg) == (3e-3, 1e-5, 0.0)
    assert astuple(SynthesisTask(encoder=TINY, optim={"lr": 3e-3}).optim_cfg) == (3e-3, 1e-5, 0.0)
    assert astuple(PretrainTask(encoder=TINY, optim=OptimConfig(lr=3e-3)).optim_cfg) == (3e-3, 0.05, 0.0)
    assert SegmentationTask(encoder=TINY, labels=["spleen"], patch_size=16).patch_size == (16, 16, 16)
    with pytest.raises(VolfmError, match="PretrainTask has no objective"):
        PretrainTask(encoder=TINY, icd=None, contrastive=None)
    with pytest.raises(VolfmError, match="icd.loss must be 'bce' or 'focal'"):
        PretrainTask(encoder=TINY, icd={"loss": "hinge"})
    with pytest.raises(VolfmError, match="finetune.mode must be one of full, frozen, partial, lora"):
        SegmentationTask(encoder=TINY, finetune={"mode": "half"})
    with pytest.raises(VolfmError, match="losses.perceptual > 0 needs losses.perceptual_encoder"):
        SynthesisTask(encoder=TINY, losses={"perceptual": 0.1})
    with pytest.raises(VolfmError, match="patch_size must be an integer or 3 integers >= 1"):
        SegmentationTask(encoder=TINY, patch_size=(16, 16))
    with pytest.raises(VolfmError, match="unknown encoder 'resnet18_3'"):
        SegmentationTask(encoder={"name": "resnet18_3"})


def test_a_recipe_naming_a_replaced_task_class_says_what_replaced_it(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  class_path: volfm.tasks.IcdPretrainTask\n  init_args: {encoder: resnet18_3d}\n"
                   "data:\n  class_path: volfm.data.PretrainDataModule\n  init_args: {store: nowhere}\n")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(old)])
    assert exc.value.code != 0
    err = " ".join(capsys.readouterr().err.split())
    assert "volfm.tasks.IcdPretrainTask was replaced by volfm.tasks.PretrainTask with icd:" in err


def test_a_recipe_giving_part_of_the_optimiser_group_keeps_the_tasks_defaults(capsys):
    with pytest.raises(SystemExit) as ok:
        main(["fit", "--config", str(RECIPES / "demo" / "seg_finetune.yaml"), "--print_config"])
    assert ok.value.code == 0
    optim = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["optim"]
    assert optim == {"lr": 3e-3, "weight_decay": 1e-5, "warmup_fraction": 0.0}  # the recipe sets lr only
