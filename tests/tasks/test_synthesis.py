"""Synthesis task: recipes in both directions run, the GAN option trains two optimisers, baselines are
reported next to the model, and predict writes the synthesised image in the source grid."""
import json
from pathlib import Path

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from volfm.cli.main import main
from volfm.data.datamodules import PairedModalityDataModule
from volfm.models import create_encoder, save_encoder
from volfm.preprocess.spec import load_spec
from volfm.store.build import run_cohort
from volfm.synth.mripet import make_mripet_cohort
from volfm.tasks import DiscriminatorConfig, EncoderConfig, SynthesisLossConfig, SynthesisTask

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = ["--model.init_args.encoder.name", "resnet18_3d", "--model.init_args.encoder.kwargs",
        '{"in_chans": 1, "base_channels": 8}', "--data.init_args.patch_size", "[16, 16, 16]",
        "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2", "--data.init_args.samples_per_volume", "1",
        "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    table = make_mripet_cohort(root / "mp", 6, seed=2, spacing=6.0, progress=False)
    spec = load_spec("mri_pet_demo")
    spec.update(spacing=[8.0, 8.0, 8.0], crop={"size": [24, 28, 24], "mode": "center"})
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run_cohort(path, root / "store", cohort=table, progress=False, qc=False)["failed"] == 0
    return root / "store"


@pytest.mark.parametrize("recipe", ["synth_mri2pet.yaml", "synth_pet2mri.yaml", "demo/synth_mri2pet.yaml",
                                    "demo/synth_pet2mri.yaml"])
def test_recipes_fast_dev_run(recipe, store, tmp_path):
    assert main(["fit", "--config", str(RECIPES / recipe), "--data.init_args.store", str(store),
                 "--trainer.default_root_dir", str(tmp_path), *TINY, "--trainer.callbacks", "[]",
                 "--trainer.fast_dev_run", "true"]) == 0


def test_adversarial_and_perceptual_options_train_generator_and_discriminator(store, tmp_path):
    frozen = save_encoder(create_encoder("resnet18_3d", base_channels=8), tmp_path / "perc.safetensors")
    task = SynthesisTask(encoder=EncoderConfig("resnet18_3d", {"in_chans": 1, "base_channels": 8}),
                         losses=SynthesisLossConfig(adversarial=0.1, perceptual=0.1, perceptual_encoder=str(frozen),
                                                    ssim=0.5),
                         discriminator=DiscriminatorConfig(channels=8, layers=1), patch_size=(16, 16, 16))
    dm = PairedModalityDataModule(str(store), label="label", patch_size=(16, 16, 16), num_workers=0, batch_size=2,
                                  whole_volume_eval=True)
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    changed = {n.split(".")[0] for n, p in task.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert {"encoder", "decoder", "discriminator"} <= changed and "perceptual" not in changed
    m = task.last_metrics
    for key in ("val/psnr", "val/ssim", "val/mae", "val/identity_psnr", "val/mean_image_psnr"):
        assert key in m and np.isfinite(m[key])


@pytest.fixture(scope="module")
def ckpt(store, tmp_path_factory):
    ck = tmp_path_factory.mktemp("synth_run")
    assert main(["fit", "--config", str(RECIPES / "demo/synth_mri2pet.yaml"), "--data.init_args.store", str(store),
                 "--trainer.default_root_dir", str(ck), *TINY, "--trainer.max_epochs", "1",
                 "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0"]) == 0
    return sorted(ck.rglob("*.ckpt"))[-1]


def test_evaluate_reports_baselines_and_degraded_inputs(ckpt, store, tmp_path, capsys):
    assert main(["evaluate", "--ckpt", str(ckpt), "--split", "train", "--degrade", "noise:0.5;slices:0.3",
                 "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    doc = json.loads((tmp_path / "ev" / "synthesis_eval.json").read_text())
    assert list(doc["summary"]["model"]) == ["clean", "noise:0.5", "slices:0.3"]
    assert {"identity", "mean_image"} <= set(doc["summary"]) and doc["mask"] == "label > 0"
    case = doc["cases"][0]
    assert set(case["model"]["clean"]["regional"]) == {"csf", "gray_matter", "white_matter"}
    assert case["model"]["clean"] != case["model"]["slices:0.3"]  # the degraded input changes the prediction
    assert "baseline: mean image" in capsys.readouterr().out and (tmp_path / "ev" / "synthesis_eval.png").is_file()


def test_predict_writes_the_synthesised_pet_in_the_source_grid(ckpt, store, tmp_path, capsys):
    mp = store.parent / "mp"
    src, tgt = mp / "mri" / "mripet_0000.nii.gz", mp / "pet" / "mripet_0000.nii.gz"
    assert main(["predict", "--ckpt_path", str(ckpt), "--input", str(src), "--target", str(tgt),
                 "--out", str(tmp_path / "pred"), "--quiet"]) == 0
    out = nib.load(str(tmp_path / "pred" / "mripet_0000_synth.nii.gz"))
    ref = nib.load(str(src))
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine, atol=1e-5)
    assert out.get_data_dtype() == np.float32 and float(np.asarray(out.dataobj).min()) >= 0  # relu head: PET >= 0
    doc = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert set(doc["outputs"][0]["metrics"]) == {"mae", "psnr", "ssim"}
    assert (tmp_path / "pred" / "mripet_0000_qc.png").stat().st_size > 1000
    assert "psnr" in capsys.readouterr().out
