"""SynthesisTask's validation numbers are volfm.metrics.synthesis' numbers on the same cases: the logged MAE,
PSNR and SSIM of the model and of the identity and mean-image baselines equal synthesis_metrics computed here
(inside ``label > 0``, intensity range the target's range inside that mask, as the task docstring says), and a
checkpoint written by the Trainer and read back with load_task predicts what the model predicted before saving.
A 2-process DDP validation (gloo on CPU; one rank's shard repeats a case) logs the single-process numbers."""
import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from volfm.data.datamodules import PairedModalityDataModule
from volfm.data.dataset import StoreDataset
from volfm.metrics.synthesis import synthesis_metrics
from volfm.preprocess.spec import load_spec
from volfm.store.build import run_cohort
from volfm.synth.mripet import make_mripet_cohort
from volfm.tasks import EncoderConfig, SynthesisTask, load_task

VAL_IDS = ["mripet_0003", "mripet_0004", "mripet_0005"]
# two CPU processes over gloo; forked ones start in a second (spawned ones re-import torch and volfm, ~30 s on two
# busy cores). Fork is refused once CUDA is initialised (GPU test runs), spawn then.
DDP = "ddp_spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "ddp_fork"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """6 simulated MRI/PET pairs on a 24 x 28 x 24 grid of 8 mm voxels: three validation cases, three training."""
    root = tmp_path_factory.mktemp("synth_values")
    table = make_mripet_cohort(root / "mp", 6, seed=2, spacing=6.0, progress=False)
    rows = list(csv.DictReader(open(table, newline="", encoding="utf-8")))
    for r in rows:
        r["split"] = "val" if r["case_id"] in VAL_IDS else "train"
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    spec = load_spec("mri_pet_demo")
    spec.update(spacing=[8.0, 8.0, 8.0], crop={"size": [24, 28, 24], "mode": "center"})
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run_cohort(path, root / "store", cohort=table, progress=False, qc=False)["failed"] == 0
    return root / "store"


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """(task, fit trainer, datamodule): MRI -> PET, residual generator, after three L1 + SSIM steps on full batches
    of two 16^3 patches, then one validation epoch (sliding windows of 16^3 without overlap)."""
    torch.manual_seed(0)
    task = SynthesisTask(encoder=EncoderConfig("resnet18_3d", {"in_chans": 1, "base_channels": 8}), residual=True,
                         losses={"l1": 1.0, "ssim": 0.5}, optim={"lr": 3e-3}, inference={"overlap": 0.0, "batch_size": 8},
                         patch_size=(16, 16, 16))
    dm = PairedModalityDataModule(str(store), label="label", patch_size=[16, 16, 16], num_workers=0, batch_size=2,
                                  samples_per_volume=2, whole_volume_eval=True, columns=[])
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path_factory.mktemp("r")))
    trainer.fit(task, datamodule=dm)
    pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, use_distributed_sampler=False).validate(task, datamodule=dm, verbose=False)
    return task, trainer, dm


def test_validation_metrics_and_baselines_equal_synthesis_metrics_on_the_same_cases(trained, store):
    task, _, _ = trained
    train = StoreDataset(store, split="train", arrays=("mri", "pet"), label="label", columns=())
    mean_image = np.mean([np.asarray(train.array(c, "pet"), dtype=np.float64) for c in train.case_ids], axis=0)
    np.testing.assert_allclose(task.mean_target.numpy(), mean_image, rtol=1e-6, atol=1e-6)
    val = StoreDataset(store, split="val", arrays=("mri", "pet"), label="label", columns=())
    assert list(val.case_ids) == VAL_IDS
    rows = {"model": [], "identity": [], "mean_image": []}
    for cid in val.case_ids:
        src = np.asarray(val.array(cid, "mri"), dtype=np.float32)
        tgt = np.asarray(val.array(cid, "pet"), dtype=np.float32)[0]
        mask = np.asarray(val.array(cid, "label"))[0] > 0
        assert mask.any() and tgt[~mask].min() < tgt[mask].min()  # the range inside the mask is not the volume's
        for name, img in (("model", task.predict_volume(src)), ("identity", src[0]),
                          ("mean_image", mean_image[0].astype(np.float32))):
            m = synthesis_metrics(img, tgt, mask=mask, data_range=None, case_id=cid)
            assert m["protocol"]["data_range_source"] == "target_min_max_in_mask"
            rows[name].append(m)
    want = {}
    for name, ms in rows.items():
        for k in ("mae", "psnr", "ssim"):
            want[f"val/{k}" if name == "model" else f"val/{name}_{k}"] = float(np.mean([m[k] for m in ms]))
    assert all(math.isfinite(v) for v in want.values()), want
    assert len({round(m["psnr"], 6) for m in rows["model"]}) == 3  # the cases differ
    got = task.last_metrics
    assert set(got) == set(want)
    bad = {k: (got[k], want[k]) for k in want if got[k] != pytest.approx(want[k], rel=1e-6, abs=1e-9)}
    assert not bad, f"logged vs synthesis_metrics: {bad}"


def test_a_reloaded_checkpoint_predicts_the_same(trained, store, tmp_path):
    task, trainer, _ = trained
    ckpt = tmp_path / "synth.ckpt"
    trainer.save_checkpoint(str(ckpt))
    loaded, _ = load_task(ckpt)
    assert type(loaded) is SynthesisTask and not loaded.training
    val = StoreDataset(store, split="val", arrays=("mri",), label=None, columns=())
    for cid in val.case_ids:
        src = np.asarray(val.array(cid, "mri"), dtype=np.float32)
        np.testing.assert_allclose(loaded.predict_volume(src), task.predict_volume(src), rtol=1e-6, atol=1e-6,
                                   err_msg=cid)
    # and what else the checkpoint carries: the array names, the settings, the mean-image baseline
    assert (loaded.source_name, loaded.target_name) == ("mri", "pet") and loaded.residual
    torch.testing.assert_close(loaded.mean_target, task.mean_target, atol=0, rtol=0)


def _csv_metrics(log_dir: Path) -> dict:
    """The ``val/`` values a CSVLogger wrote (rank 0 of a DDP run, in its own process)."""
    files = sorted(Path(log_dir).rglob("metrics.csv"))
    assert len(files) == 1, files
    out = {}
    for row in csv.DictReader(open(files[0], newline="", encoding="utf-8")):
        out.update({k: float(v) for k, v in row.items() if k.startswith("val/") and v != ""})
    return out


def test_two_process_ddp_validation_logs_the_single_process_metrics(trained, tmp_path):
    """Rank 0 validates mripet_0003 and 0005, rank 1 mripet_0004 and 0003 again (the padding): each case once."""
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
