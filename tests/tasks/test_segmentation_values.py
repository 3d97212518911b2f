"""SegmentationTask's epoch-end numbers are volfm.metrics' numbers on the same cases: the logged per-class Dice
and HD95 (mm), their means and the per-case table equal segmentation_metrics / aggregate_segmentation_metrics
computed here from task.predict_volume, and a checkpoint written by the Trainer and read back with load_task
predicts what the model predicted before saving. A 2-process DDP validation (gloo on CPU; one rank's shard repeats a
case) logs the single-process numbers."""
import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from volfm import VolfmError
from volfm.data.datamodules import SegmentationDataModule
from volfm.data.dataset import StoreDataset
from volfm.metrics.segmentation import aggregate_segmentation_metrics, segmentation_metrics
from volfm.preprocess.spec import load_spec
from volfm.store.build import run_cohort
from volfm.synth.ct import make_ct_cohort
from volfm.tasks import EncoderConfig, SegmentationLossConfig, SegmentationTask, load_task

VAL_IDS = ["ct_0001", "ct_0004", "ct_0006"]
# two CPU processes over gloo; forked ones start in a second (spawned ones re-import torch and volfm, ~30 s on two
# busy cores). Fork is refused once CUDA is initialised (GPU test runs), spawn then.
DDP = "ddp_spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "ddp_fork"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """8 synthetic CT cases at 32^3 (10.5 x 10.5 x 15 mm voxels, so HD95 in mm differs from voxels): three
    validation cases, five training cases."""
    root = tmp_path_factory.mktemp("seg_values")
    table = make_ct_cohort(root / "ct", 8, seed=11, shape=(40, 40, 24), progress=False)
    rows = list(csv.DictReader(open(table, newline="", encoding="utf-8")))
    for r in rows:
        r["split"] = "val" if r["case_id"] in VAL_IDS else "train"
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    spec = load_spec("ct_merlin_demo")
    spec.update(spacing=[10.5, 10.5, 15.0], crop={"size": [32, 32, 32], "mode": "center"})
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run_cohort(path, root / "store", cohort=table, progress=False, qc=False)["failed"] == 0
    return root / "store"


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """(task, trainer, datamodule): liver + spleen on a tiny ResNet-18 U-Net after a few steps (BatchNorm
    statistics moved), then one validation epoch (sliding windows without overlap: 8 per case, to stay fast)."""
    torch.manual_seed(0)
    task = SegmentationTask(encoder=EncoderConfig("resnet18_3d", {"in_chans": 1, "base_channels": 8}),
                            labels=["liver", "spleen"], optim={"lr": 3e-3}, inference={"overlap": 0.0, "batch_size": 8},
                            patch_size=(16, 16, 16))
    dm = SegmentationDataModule(str(store), patch_size=[16, 16, 16], num_workers=0, batch_size=4,
                                samples_per_volume=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path_factory.mktemp("r")))
    trainer.fit(task, datamodule=dm)
    pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, use_distributed_sampler=False).validate(task, datamodule=dm, verbose=False)
    return task, trainer, dm


def _direct(task, store):
    """Per-case segmentation_metrics of task.predict_volume on each validation case, and their aggregate."""
    ds = StoreDataset(store, split="val", arrays=("image",), label="label")
    assert list(ds.case_ids) == VAL_IDS
    cases = []
    for cid in ds.case_ids:
        pred = task.predict_volume(np.asarray(ds.array(cid, "image")))
        target = task.labelmap.lut[np.asarray(ds.array(cid, "label"))[0]]
        spacing = ds.meta(cid)["spacing"]
        cases.append(segmentation_metrics(pred, target, task.labelmap.num_classes, spacing,
                                          class_names=task.class_names, percentile=95, case_id=cid))
    return cases, aggregate_segmentation_metrics(cases)


def _same(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-9)


def test_epoch_end_dice_and_hd95_equal_the_metric_functions_on_the_same_cases(trained, store):
    task, _, _ = trained
    cases, agg = _direct(task, store)
    assert cases[0]["spacing"] == pytest.approx([10.5, 10.5, 15.0])
    want = {}
    for name in ("liver", "spleen"):
        want[f"val/dice_{name}"] = agg["classes"][name]["dice"]["mean"]
        want[f"val/hd95_mm_{name}"] = agg["classes"][name]["hd95_mm"]["mean"]
    want["val/mean_dice"] = float(np.mean([want["val/dice_liver"], want["val/dice_spleen"]]))
    want["val/mean_hd95_mm"] = float(np.mean([want["val/hd95_mm_liver"], want["val/hd95_mm_spleen"]]))
    # the fixture is no degenerate case: predictions overlap both organs, Dice differs between classes and cases
    assert all(math.isfinite(v) and v > 0 for v in want.values()), want
    per_case = np.array([[c["classes"][n]["dice"] for n in ("liver", "spleen")] for c in cases])
    assert np.ptp(per_case, axis=0).min() > 1e-3 and np.ptp(per_case, axis=1).min() > 1e-3, per_case
    got = task.last_metrics
    assert set(got) == set(want)
    bad = {k: (got[k], want[k]) for k in want if not _same(got[k], want[k])}
    assert not bad, f"logged vs segmentation_metrics: {bad}"
    # the per-case table the epoch kept: the same cases, the same numbers
    assert [c["case_id"] for c in task.last_case_metrics] == VAL_IDS
    for mine, theirs in zip(task.last_case_metrics, cases):
        for name in ("liver", "spleen"):
            for key in ("dice", "hd95_mm"):
                assert _same(mine["classes"][name][key], theirs["classes"][name][key]), (mine["case_id"], name, key)


def test_a_reloaded_checkpoint_predicts_the_same(trained, store, tmp_path):
    task, trainer, _ = trained
    ckpt = tmp_path / "seg.ckpt"
    trainer.save_checkpoint(str(ckpt))
    loaded, raw = load_task(ckpt)
    assert type(loaded) is SegmentationTask and loaded.class_names == ["background", "liver", "spleen"]
    assert not loaded.training and raw["volfm"]["patch_size"] == [16, 16, 16]
    ds = StoreDataset(store, split="val", arrays=("image",), label=None)
    for i, cid in enumerate(ds.case_ids):
        image = np.asarray(ds.array(cid, "image"))
        before, after = task.predict_volume(image), loaded.predict_volume(image)
        assert before.dtype == after.dtype == np.uint8 and np.array_equal(after, before), cid
        if i == 0:  # the class scores behind the argmax, to 1e-6 (one case: it costs another pass of each model)
            torch.testing.assert_close(loaded.sliding_window(loaded.model, image), task.sliding_window(task.model, image),
                                       atol=1e-6, rtol=1e-6, msg=lambda m, c=cid: f"{c}: {m}")


def _csv_metrics(log_dir: Path) -> dict:
    """The ``val/`` values a CSVLogger wrote (rank 0 of a DDP run, in its own process)."""
    files = sorted(Path(log_dir).rglob("metrics.csv"))
    assert len(files) == 1, files
    out = {}
    for row in csv.DictReader(open(files[0], newline="", encoding="utf-8")):
        out.update({k: float(v) for k, v in row.items() if k.startswith("val/") and v != ""})
    return out


def test_two_process_ddp_validation_logs_the_single_process_metrics(trained, tmp_path):
    """Rank 0 validates ct_0001 and ct_0006, rank 1 ct_0004 and ct_0001 again (the padding): each case once."""
    task, _, dm = trained
    single = dict(task.last_metrics)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDP, logger=CSVLogger(tmp_path, name="csv"),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False)
    trainer.validate(task, datamodule=dm, verbose=False)
    assert trainer.world_size == 2
    logged = _csv_metrics(tmp_path)
    assert set(logged) == set(single)
    bad = {k: (logged[k], single[k]) for k in single if logged[k] != pytest.approx(single[k], rel=1e-6)}
    assert not bad, f"2-process DDP vs single process: {bad}"


def _dice_ce_by_hand(logits, target, batch_dice, include_background, dice_w=1.0, ce_w=1.0, eps=1e-5):
    """Dice + CE written out from the formulas (softmax probabilities, one-hot target; Dice per class, summed over
    the voxels of each patch or of the whole batch, averaged over the kept classes and patches)."""
    p = torch.softmax(logits, 1)
    t = torch.nn.functional.one_hot(target[:, 0], logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    if not include_background:
        p, t = p[:, 1:], t[:, 1:]
    dims = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
    dice = (2 * (p * t).sum(dims) + eps) / (p.sum(dims) + t.sum(dims) + eps)
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0])
    return dice_w * (1 - dice).mean() + ce_w * ce


@pytest.mark.parametrize("batch_dice,include_background", [(True, False), (False, True), (True, True), (False, False)])
def test_segmentation_loss_equals_dice_plus_ce_by_hand(batch_dice, include_background):
    torch.manual_seed(0)
    logits = torch.randn(3, 3, 6, 5, 4)
    target = torch.randint(0, 3, (3, 1, 6, 5, 4))
    target[1] = 0  # a patch without any organ: per-patch Dice asks for an empty prediction there
    task = SegmentationTask(labels=["spleen"], loss={"batch_dice": batch_dice, "include_background": include_background,
                                                     "dice_weight": 0.7, "ce_weight": 1.3})
    got = task._loss(logits, target)
    want = _dice_ce_by_hand(logits, target, batch_dice, include_background, 0.7, 1.3)
    assert torch.allclose(got, want, atol=1e-5), (got, want)


def test_segmentation_loss_defaults_are_nnunet_batch_dice_without_background():
    task = SegmentationTask(labels=["spleen"])
    assert task.loss_cfg == SegmentationLossConfig(batch_dice=True, include_background=False)
    assert task.hparams["loss"] == {"batch_dice": True, "include_background": False, "dice_weight": 1.0,
                                    "ce_weight": 1.0}


@pytest.mark.parametrize("loss,match", [({"dice_weight": -1.0}, "must be >= 0"),
                                        ({"dice_weight": 0.0, "ce_weight": 0.0}, "not both 0"),
                                        ({"batch_dic": True}, "did you mean 'batch_dice'")])
def test_bad_segmentation_loss_settings_fail_clearly(loss, match):
    with pytest.raises(VolfmError, match=match):
        SegmentationTask(labels=["spleen"], loss=loss)
