"""Segmentation fine-tuning: recipes run, fine-tuning modes freeze/train what they say, predictions land
in the source image's own grid, bad input gets clear errors."""
from pathlib import Path

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from volfm import VolfmError
from volfm.cli.main import main
from volfm.data.datamodules import SegmentationDataModule
from volfm.io import write_nifti
from volfm.preprocess.pipeline import Pipeline
from volfm.preprocess.spec import load_spec
from volfm.store.build import run_cohort
from volfm.synth.ct import LABEL_IDS, make_ct_case, make_ct_cohort
from volfm.tasks import EncoderConfig, SegmentationTask

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY_ENC = {"in_chans": 1, "base_channels": 8}
TINY = ["--model.init_args.encoder.name", "resnet18_3d", "--model.init_args.encoder.kwargs",
        '{"in_chans": 1, "base_channels": 8}',
        "--data.init_args.patch_size", "[16, 16, 16]", "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "2", "--data.init_args.samples_per_volume", "1",
        "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.callbacks", "[]"]


def _spec(root: Path, spacing=(10.5, 10.5, 15.0), size=(32, 32, 32)) -> Path:
    spec = load_spec("ct_merlin_demo")
    spec.update(spacing=list(spacing), crop={"size": list(size), "mode": "center"})
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    table = make_ct_cohort(root / "ct", 8, seed=11, shape=(40, 40, 24), progress=False)
    assert run_cohort(_spec(root), root / "store", cohort=table, progress=False, qc=False)["failed"] == 0
    return root / "store"


def _task(pretrained=None, **finetune) -> SegmentationTask:
    """A tiny spleen task; ``finetune`` keys as in FinetuneConfig, passed as a plain dict (as a checkpoint does)."""
    ft = {"mode": finetune.pop("finetune", "full"), **finetune}
    return SegmentationTask(encoder=EncoderConfig("resnet18_3d", TINY_ENC, pretrained), labels=["spleen"], finetune=ft,
                            patch_size=(16, 16, 16))


def _setup(task, store, **dm_kw):
    dm = SegmentationDataModule(str(store), patch_size=(16, 16, 16), num_workers=0, batch_size=2, **dm_kw)
    trainer = pl.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    return dm


@pytest.mark.parametrize("recipe", ["seg_finetune.yaml", "demo/seg_finetune.yaml"])
def test_recipes_fast_dev_run(recipe, store, tmp_path):
    assert main(["fit", "--config", str(RECIPES / recipe), "--data.init_args.store", str(store),
                 "--trainer.default_root_dir", str(tmp_path), *TINY, "--trainer.fast_dev_run", "true",
                 "--data.init_args.num_train_cases", "2"]) == 0


def _one_step(task, store):
    """Parameters before and after one real optimiser step (Dice+CE on a batch of patches)."""
    dm = _setup(task, store)
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    opt = task.configure_optimizers()["optimizer"]
    task.train()
    batch = next(iter(dm.train_dataloader()))
    loss = task._loss(task.model(batch["image"]), task._target(batch))  # what training_step optimises
    loss.backward()
    opt.step()
    changed = {n for n, p in task.named_parameters() if not torch.equal(p.detach(), before[n])}
    return changed


@pytest.mark.parametrize("mode", ["full", "frozen", "partial", "lora"])
def test_finetune_modes_train_what_they_say(mode, store):
    task = _task(finetune=mode, unfreeze_stages=1)
    changed = _one_step(task, store)
    enc = {n for n, _ in task.named_parameters() if n.startswith("encoder.")}
    dec = {n for n, _ in task.named_parameters() if n.startswith("decoder.")}
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert dec <= trainable and dec & changed  # the decoder always trains
    if mode == "full":
        assert enc <= trainable and len(enc & changed) > 0.8 * len(enc)
    elif mode == "frozen":
        assert not (enc & trainable) and not (enc & changed)
    elif mode == "partial":
        assert enc & trainable == {n for n in enc if n.startswith("encoder.layer4.")}
        assert enc & changed and all(n.startswith("encoder.layer4.") for n in enc & changed)
    else:
        lora = {n for n in enc if "lora_" in n}
        assert lora and enc & trainable == lora
        assert {n for n in enc & changed} <= lora and any("lora_B" in n for n in enc & changed)
    # BatchNorm running statistics move only in layers that train (one more training-mode forward pass)
    bns = {n: m for n, m in task.encoder.named_modules() if isinstance(m, torch.nn.BatchNorm3d)}
    before = {n: m.running_mean.clone() for n, m in bns.items()}
    task.train()
    with torch.no_grad():
        task.model(torch.rand(2, 1, 16, 16, 16))
    moved = {n for n, m in bns.items() if not torch.equal(m.running_mean, before[n])}
    expect = {"full": set(bns), "frozen": set(), "lora": set(),
              "partial": {n for n in bns if n.startswith("layer4.")}}[mode]
    assert moved == expect
    n_enc = sum(p.numel() for n, p in task.named_parameters() if n.startswith("encoder.") and p.requires_grad)
    assert f"encoder {n_enc / 1e6:.2f} M of" in task.trainable_summary()


def test_labels_from_a_yaml_label_map_merge_kidneys(store, tmp_path):
    lm = tmp_path / "map.yaml"
    lm.write_text(yaml.safe_dump({"source": LABEL_IDS, "classes": {"kidney": ["kidney_left", "kidney_right"],
                                                                  "spleen": "spleen"}}))
    task = SegmentationTask(encoder=EncoderConfig("resnet18_3d", TINY_ENC), labels=str(lm))
    _setup(task, store)
    assert task.class_names == ["background", "kidney", "spleen"]
    lab = torch.tensor([[[[[0, 3, 4, 2, 1]]]]], dtype=torch.uint8)
    target = task._target({"label": lab, "case_id": ["x"]})
    assert target.flatten().tolist() == [0, 1, 1, 2, 0]


def test_label_values_missing_from_the_label_map_fail_clearly(store, tmp_path, capsys):
    import json

    partial = tmp_path / "labels.json"  # a source map that lacks the kidneys, lungs, aorta, ...
    partial.write_text(json.dumps({"background": 0, "liver": 1, "spleen": 2}))
    rc = main(["fit", "--config", str(RECIPES / "demo/seg_finetune.yaml"), "--data.init_args.store", str(store),
               "--trainer.default_root_dir", str(tmp_path), *TINY, "--trainer.fast_dev_run", "true",
               "--model.init_args.source_labels", str(partial), "--data.init_args.foreground_fraction", "1.0"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing from the label map" in err and len(err.strip().splitlines()) == 1


def test_checkpoint_of_a_different_encoder_lists_mismatched_keys(store, tmp_path):
    from volfm.models import create_encoder, save_encoder

    path = save_encoder(create_encoder("resnet18_3d", base_channels=16), tmp_path / "enc16.safetensors")
    task = _task(pretrained=str(path))
    with pytest.raises(VolfmError, match=r"shape-mismatched keys: .*conv1.weight"):
        _setup(task, store)


def test_label_on_another_grid_than_the_image_is_refused(tmp_path):
    case = make_ct_case(3, shape=(40, 40, 24))
    img, lab = case["image"], case["label"]
    write_nifti(img, tmp_path / "img.nii.gz")
    shifted = lab.affine.copy()
    shifted[:3, 3] += 7.5
    write_nifti(type(lab)(lab.array, shifted, lab.meta), tmp_path / "lab.nii.gz")
    (tmp_path / "cohort.csv").write_text("case_id,image,label\nc0,img.nii.gz,lab.nii.gz\n")
    summary = run_cohort(_spec(tmp_path), tmp_path / "store", cohort=tmp_path / "cohort.csv", progress=False, qc=False)
    assert summary["failed"] == 1 and "is not on the grid of image" in summary["failures"][0][1]


class _OracleTask(SegmentationTask):
    """Predicts the stored-grid label of the case it was given (a perfect model on the stored grid)."""
    oracle: np.ndarray = None

    def predict_volume(self, image, patch_size=None):
        assert image.shape[1:] == self.oracle.shape
        return self.oracle


def _one_voxel_shift_dice(truth):
    """The best Dice a copy of the (I, J, K) mask moved by one voxel along one axis (either way) gets."""
    best = 0.0
    for axis in range(3):
        for src, dst in ((slice(0, -1), slice(1, None)), (slice(1, None), slice(0, -1))):
            moved = np.zeros_like(truth)
            moved[(slice(None),) * axis + (dst,)] = truth[(slice(None),) * axis + (src,)]
            best = max(best, 2 * (moved & truth).sum() / (moved.sum() + truth.sum()))
    return best


def _centroid_offset(mask, truth, affine, stored_affine):
    """World (RAS mm, voxel index -> mm through ``affine``) centroid of ``mask`` minus that of ``truth``,
    in stored voxels along each stored axis."""
    d = affine[:3, :3] @ (np.argwhere(mask).mean(0) - np.argwhere(truth).mean(0))
    return np.linalg.solve(np.asarray(stored_affine)[:3, :3], d)


@pytest.mark.parametrize("flip", [False, True])
def test_prediction_is_written_in_the_oblique_anisotropic_source_grid(tmp_path, monkeypatch, flip):
    """An oblique (10 deg), anisotropic source: the written label has the input's exact shape and affine and,
    from an oracle on the stored grid, lands on the source labels (world centroid within a quarter of a stored
    voxel, Dice above a one-voxel shift's); a flipped prediction does not."""
    import volfm.cli.predict as vp

    case = make_ct_case(7, shape=(72, 64, 28), orientation="LPS", oblique_deg=10.0)
    src = tmp_path / "scan.nii.gz"
    write_nifti(case["image"], src)
    write_nifti(case["label"], tmp_path / "scan_label.nii.gz")
    store = tmp_path / "store"
    spec_path = _spec(tmp_path, spacing=(3.0, 3.0, 3.0), size=(112, 112, 160))
    (tmp_path / "cohort.csv").write_text("case_id,image,label\nc0,scan.nii.gz,scan_label.nii.gz\n")
    assert run_cohort(spec_path, store, cohort=tmp_path / "cohort.csv", progress=False, qc=False)["failed"] == 0
    spec = yaml.safe_load((store / "spec.yaml").read_text())["spec"]
    proc = Pipeline(spec)({"image": str(src), "label": str(tmp_path / "scan_label.nii.gz")}, "c0")
    liver = (proc.arrays["label"][0] == LABEL_IDS["liver"]).astype(np.uint8)
    task = _task()
    task._build(__import__("volfm.targets.labelmap", fromlist=["LabelMap"]).LabelMap.from_names(["liver"], LABEL_IDS))
    oracle = _OracleTask.__new__(_OracleTask)
    oracle.__dict__ = task.__dict__
    oracle.oracle = liver[::-1].copy() if flip else liver
    monkeypatch.setattr(vp, "load_predictor", lambda ckpt: (oracle, {"datamodule_hyper_parameters": {"store": str(store)}}))
    summary = vp.predict_files("unused.ckpt", src, tmp_path / "out", progress=False)
    assert not summary["failures"]
    written, source = nib.load(summary["outputs"][0]["output"]), nib.load(str(src))
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    pred = np.asarray(written.dataobj) == 1
    truth = np.asarray(nib.load(str(tmp_path / "scan_label.nii.gz")).dataobj) == LABEL_IDS["liver"]
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    if flip:
        assert dice < 0.5
    else:
        off = _centroid_offset(pred, truth, written.affine, proc.affine)
        assert np.abs(off).max() <= 0.25, f"centroid off by {off} stored voxels"
        bound = _one_voxel_shift_dice(truth)
        assert dice > bound, f"Dice {dice:.4f} <= {bound:.4f} of a one-voxel shift"
        assert Path(summary["outputs"][0]["qc"]).stat().st_size > 1000


def test_predict_cli_reports_bad_inputs_and_goes_on(store, tmp_path, capsys):
    ck = tmp_path / "run"
    assert main(["fit", "--config", str(RECIPES / "demo/seg_finetune.yaml"), "--data.init_args.store", str(store),
                 "--trainer.default_root_dir", str(ck), *TINY[:-2], "--trainer.max_epochs", "1",
                 "--trainer.limit_train_batches", "1",
                 "--trainer.enable_checkpointing", "true", "--trainer.limit_val_batches", "0"]) == 0
    ckpt = sorted(ck.rglob("*.ckpt"))[-1]
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_nifti(make_ct_case(1, shape=(40, 40, 24))["image"], inputs / "good.nii.gz")
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti file")
    rc = main(["predict", "--config", str(RECIPES / "demo/seg_finetune.yaml"), "--ckpt_path", str(ckpt),
               "--store", str(store), "--input", str(inputs), "--out", str(tmp_path / "pred"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1 and "1 written, 1 failed" in out and "FAILED" in out and "broken.nii.gz" in out
    good = nib.load(str(tmp_path / "pred" / "good_seg.nii.gz"))
    assert good.shape == (40, 40, 24)


def test_validating_a_checkpoint_with_other_labels_is_refused(store, tmp_path):
    ck = tmp_path / "run"
    assert main(["fit", "--config", str(RECIPES / "demo/seg_finetune.yaml"), "--data.init_args.store", str(store),
                 "--trainer.default_root_dir", str(ck), *TINY[:-2], "--trainer.max_epochs", "1",
                 "--trainer.limit_train_batches", "1", "--trainer.enable_checkpointing", "true",
                 "--trainer.limit_val_batches", "0"]) == 0
    ckpt = sorted(ck.rglob("*.ckpt"))[-1]
    task = SegmentationTask(encoder=EncoderConfig("resnet18_3d", TINY_ENC), labels=["liver"])
    dm = SegmentationDataModule(str(store), patch_size=(16, 16, 16), num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, default_root_dir=str(tmp_path))
    with pytest.raises(VolfmError, match=r"trained for classes \['background', 'spleen'\] but the recipe asks for "
                                         r"\['background', 'liver'\]"):
        trainer.validate(task, datamodule=dm, ckpt_path=str(ckpt))  # the recipe says liver, the checkpoint spleen
    loaded = SegmentationTask.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True)
    assert loaded.class_names == ["background", "spleen"] and loaded._pretrained_loaded


def test_a_lora_checkpoint_loads_as_a_plain_encoder_with_the_adapters_merged(store, tmp_path):
    """Any volfm checkpoint (here LoRA segmentation) gives its encoder to load_encoder_weights."""
    from volfm.models import create_encoder, load_encoder_weights

    task = _task(finetune="lora", lora_r=4, lora_alpha=8)
    _one_step(task, store)
    with torch.no_grad():  # make the adapters matter
        for n, p in task.encoder.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.strategy.connect(task)
    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(str(ckpt))
    plain = load_encoder_weights(create_encoder("resnet18_3d", **TINY_ENC), ckpt).eval()
    task.encoder.eval()
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(x), task.encoder.forward_features(x), atol=1e-5, rtol=1e-4)


def test_validate_and_resume_from_a_checkpoint_through_the_cli(store, tmp_path):
    """`volfm validate|fit --ckpt_path`: LightningCLI rebuilds the task from the checkpoint's hyper-parameters
    (they name their class), then restores its label map and weights."""
    ck = tmp_path / "run"
    args = ["--config", str(RECIPES / "demo/seg_finetune.yaml"), "--data.init_args.store", str(store),
            "--trainer.default_root_dir", str(ck), *TINY[:-2], "--trainer.limit_train_batches", "1",
            "--trainer.limit_val_batches", "1", "--data.init_args.num_train_cases", "2"]
    assert main(["fit", *args, "--trainer.max_epochs", "1", "--trainer.enable_checkpointing", "true"]) == 0
    ckpt = sorted(ck.rglob("*.ckpt"))[-1]
    first = torch.load(str(ckpt), weights_only=True)
    assert first["hyper_parameters"]["_class_path"] == "volfm.tasks.segmentation.SegmentationTask"
    assert main(["validate", *args, "--ckpt_path", str(ckpt)]) == 0
    assert main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt)]) == 0
    resumed = torch.load(str(sorted(ck.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)[-1]), weights_only=True)
    assert resumed["epoch"] == first["epoch"] + 1 and resumed["global_step"] > first["global_step"]


def test_frozen_encoder_recomputes_batchnorm_statistics_on_training_patches(store):
    """recompute_bn_batches: the frozen encoder's BatchNorm statistics become the average over that many training
    batches before the first step and then stay (eval mode); without it they stay as loaded."""
    def fit(task, steps=2, val=0):
        dm = SegmentationDataModule(str(store), patch_size=(16, 16, 16), num_workers=0, batch_size=2, seed=0)
        pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                   num_sanity_val_steps=val, limit_val_batches=val, val_check_interval=1).fit(task, datamodule=dm)
        return dm

    kept = _task(finetune="frozen")  # trained through a sanity check and a validation between the two steps
    fit(kept, val=1)
    bn = kept.encoder.bn1
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))

    task = _task(finetune="frozen", recompute_bn_batches=3)
    dm = fit(task)
    bn = task.encoder.bn1
    assert int(bn.num_batches_tracked) == 3  # the 3 recalibration batches, none from the 2 training steps
    # reference: the mean of the stem conv's output over the first 3 training batches of the same loader
    with torch.no_grad():
        loader = dm.train_dataloader()
        outs = [task.encoder.conv1(b["image"]).mean(dim=(0, 2, 3, 4)) for _, b in zip(range(3), loader)]
    torch.testing.assert_close(bn.running_mean, torch.stack(outs).mean(0), rtol=1e-4, atol=1e-6)


def test_recompute_bn_batches_needs_a_frozen_encoder():
    with pytest.raises(VolfmError, match="recompute_bn_batches applies to a frozen encoder"):
        _task(finetune="full", recompute_bn_batches=4)
    with pytest.raises(VolfmError, match="must be >= 0"):
        _task(finetune="frozen", recompute_bn_batches=-1)
