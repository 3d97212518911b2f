"""`volfm demo` runs end to end on a small cohort and leaves the promised outputs."""
import json

from volfm.cli.demo import run_demo


def test_demo_end_to_end(tmp_path, capsys):
    assert run_demo(tmp_path / "demo", cases=3, workers=0, encoders=["resnet18_3d"], pretrain_cases=12,
                    pretrain_epochs=1, synthesis_cases=6, synthesis_epochs=1, segment_epochs=1) == 0
    out = capsys.readouterr().out
    for needle in ("findings (ICD-10-CM)", "manifest:", "QC images:", "patches/s", "3 ok, 0 failed",
                   "resnet18_3d", "features (1, 512, 7, 7, 10)"):
        assert needle in out
    store = tmp_path / "demo" / "store_ct_merlin"
    assert (store / "manifest.csv").is_file() and len(list((store / "qc").glob("*.png"))) == 3
    assert f"QC gallery:   {store / 'qc' / 'index.html'}" in out and (store / "qc" / "index.html").is_file()
    assert (tmp_path / "demo" / "patches_ct.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "store_mri_brain" / "manifest.csv").is_file()
    for needle in ("ICD macro AUROC on the validation split, per epoch:", "random-label control",
                   "zero-shot findings macro AUROC", "linear probe:", "image->report:",
                   "masked-voxel MSE on the validation split", "validation Dice (spleen",
                   "random init (scratch)", "masked-volume pretrained encoder", "Dice vs the source label"):
        assert needle in out
    runs = tmp_path / "demo" / "runs"
    masked = next((runs / "masked").glob("csv/version_*"))
    assert (masked / "encoder.safetensors").is_file() and (masked / "decoder.safetensors").is_file()
    # the pretrained segmentation run started from the masked-volume encoder
    assert f"encoder weights loaded from {masked / 'encoder.safetensors'}" in out
    assert (tmp_path / "demo" / "eval_pretrain" / "eval.png").is_file()
    assert "baseline: mean image" in out and (tmp_path / "demo" / "eval_synthesis" / "synthesis_eval.png").is_file()
    n_pred = len(list((tmp_path / "demo" / "predictions").glob("*_seg.nii.gz")))
    assert n_pred >= 1 and out.count("Dice vs the source label") == n_pred
    # the segmentation model went out as a package and the predictions came from it, without the store
    pkg = tmp_path / "demo" / "models" / "spleen_seg"
    assert (pkg / "model.yaml").is_file() and (pkg / "model.safetensors").is_file() and (pkg / "README.md").is_file()
    assert f"volfm predict --model {pkg}" in out
    assert json.loads((tmp_path / "demo" / "predictions" / "predictions.json").read_text())["model"] == str(pkg)
