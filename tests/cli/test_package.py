"""Model packages: volfm export -> predict --model without the store gives exactly what the checkpoint with its store
gives; tampered files are refused; checkpoints of older volfm versions still predict with --store; pretrained:
accepts packages and merlin:PATH; volfm convert merlin writes a package whose predictions match a forward pass
written from Merlin's layout, with the text tower when a local Longformer is given."""
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from transformers import LongformerConfig, LongformerModel

from volfm import VolfmError
from volfm.cli.convert import MERLIN_TEXT
from volfm.cli.main import main
from volfm.cli.predict import predict_files
from volfm.io import write_nifti
from volfm.models.package import read_package
from volfm.models.text import merlin_sanitize, train_wordpiece_tokenizer
from volfm.models.weights import load_encoder
from volfm.preprocess.pipeline import Pipeline
from volfm.preprocess.spec import load_spec
from volfm.store.build import run_cohort
from volfm.synth.ct import make_ct_case, make_ct_cohort
from volfm.tasks import ContrastiveConfig, EncoderConfig, PretrainTask, SegmentationTask
from volfm.tasks.checkpoint import load_task
from volfm.tasks.package import export_checkpoint, inference_only

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY_ENC = {"in_chans": 1, "base_channels": 8}
# a tiny encoder, 16^3 patches, one CPU process, no logger: the seg_finetune demo recipe made fast
TINY = ["--model.init_args.encoder", json.dumps({"name": "resnet18_3d", "kwargs": TINY_ENC}),
        "--data.init_args", json.dumps({"patch_size": [16, 16, 16], "num_workers": 0, "batch_size": 2,
                                        "samples_per_volume": 1, "num_train_cases": 2}),
        "--trainer", json.dumps({"precision": "32-true", "accelerator": "cpu", "devices": 1, "logger": False,
                                 "enable_progress_bar": False})]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny spleen model fitted for one step on a 6-case store; the checkpoint and the store."""
    root = tmp_path_factory.mktemp("pkg")
    spec = load_spec("ct_merlin_demo")
    spec.update(spacing=[10.5, 10.5, 15.0], crop={"size": [32, 32, 32], "mode": "center"})
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    table = make_ct_cohort(root / "ct", 6, seed=3, shape=(40, 40, 24), progress=False)
    store = root / "store"
    assert run_cohort(root / "spec.yaml", store, cohort=table, progress=False, qc=False)["failed"] == 0
    assert main(["fit", "--config", str(RECIPES / "demo/seg_finetune.yaml"), "--data.init_args.store", str(store),
                 "--trainer.default_root_dir", str(root / "run"), *TINY, "--trainer.max_epochs", "1",
                 "--trainer.limit_val_batches", "1",
                 "--trainer.check_val_every_n_epoch", "1",
                 "--trainer.enable_checkpointing", "true"]) == 0
    return sorted((root / "run").rglob("*.ckpt"))[-1], store


@pytest.fixture(scope="module")
def oblique(tmp_path_factory):
    """An oblique (10 deg), anisotropic LPS CT, as a NIfTI file."""
    path = tmp_path_factory.mktemp("obl") / "scan.nii.gz"
    write_nifti(make_ct_case(7, shape=(72, 64, 28), orientation="LPS", oblique_deg=10.0)["image"], path)
    return path


def _seg(out: Path) -> nib.Nifti1Image:
    return nib.load(str(out / "scan_seg.nii.gz"))


def test_checkpoint_records_spec_input_counts_and_metrics(trained):
    ckpt, store = trained
    rec = torch.load(ckpt, weights_only=True)["volfm"]
    assert rec["data"]["spec"] == yaml.safe_load((store / "spec.yaml").read_text())["spec"]
    assert rec["data"]["input"] == "image" and sum(rec["data"]["cases"].values()) == 6
    assert rec["data"]["train_cases_used"] == 2 and rec["data"]["cases"]["train"] > 2
    assert set(rec["inference"]) == {"overlap", "batch_size"}
    assert "val/mean_dice" in rec["metrics"] and rec["metrics"]["global_step"] == 1
    # a checkpoint loaded without its store and saved again keeps the record (no trainer, no validation since)
    task, _ = load_task(ckpt)
    again: dict = {}
    task.on_save_checkpoint(again)
    assert again["volfm"]["data"] == rec["data"] and again["volfm"]["metrics"] == rec["metrics"]


def test_export_then_predict_without_the_store_is_exact(trained, oblique, tmp_path, capsys):
    ckpt, store = trained
    want_dir = tmp_path / "from_ckpt"
    predict_files(ckpt, oblique, want_dir, store=store, progress=False, qc=False)
    want = _seg(want_dir)
    assert len(np.unique(np.asarray(want.dataobj))) == 2  # both classes: an equality below is not trivially met
    pkg = tmp_path / "spleen"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(pkg)]) == 0
    doc = yaml.safe_load((pkg / "model.yaml").read_text())
    assert doc["kind"] == "segmentation" and doc["labels"] == ["background", "spleen"]
    assert doc["preprocessing"]["input"] == "image" and doc["preprocessing"]["spec"]["spacing"] == [10.5, 10.5, 15.0]
    assert len(doc["files"]["model.safetensors"]) == 64 and doc["encoder"]["name"] == "resnet18_3d"
    # readable by others as a plainly written file is (safetensors alone writes owner-only files)
    assert (pkg / "model.safetensors").stat().st_mode & 0o777 == (pkg / "README.md").stat().st_mode & 0o777
    card = (pkg / "README.md").read_text()
    assert "## Trained on" in card and "val/mean_dice" in card and "[10.5, 10.5, 15.0]" in card
    assert "The run trained on 2 of the" in card and "spleen" in card
    gone = store.with_name("store_moved")
    store.rename(gone)  # the training store is not there any more
    try:
        assert main(["predict", "--model", str(pkg), "--input", str(oblique), "--out", str(tmp_path / "p"),
                     "--quiet"]) == 0
        got = _seg(tmp_path / "p")
        assert got.shape == want.shape == nib.load(str(oblique)).shape
        np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
        np.testing.assert_allclose(got.affine, want.affine, atol=1e-6)
        # the checkpoint alone (no store) predicts too: it carries the spec
        predict_files(ckpt, oblique, tmp_path / "c", progress=False, qc=False)
        np.testing.assert_array_equal(np.asarray(_seg(tmp_path / "c").dataobj), np.asarray(want.dataobj))
    finally:
        gone.rename(store)
    assert main(["export", "--ckpt", str(ckpt), "--out", str(pkg)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_a_tampered_package_is_refused(trained, tmp_path, capsys):
    ckpt, _ = trained
    pkg = tmp_path / "m"
    main(["export", "--ckpt", str(ckpt), "--out", str(pkg)])
    w = pkg / "model.safetensors"
    original = w.read_bytes()
    data = bytearray(original)
    data[-5] ^= 0x01  # one bit of one weight
    w.write_bytes(bytes(data))
    assert main(["predict", "--model", str(pkg), "--input", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors does not match the sha256" in err
    with pytest.raises(VolfmError, match="does not match the sha256"):
        SegmentationTask(encoder=EncoderConfig("resnet18_3d", TINY_ENC, str(pkg)), labels=["spleen"]).load_pretrained("fit")
    # model.yaml names the class to build: anything but a volfm task is refused (no code runs from a package)
    doc = yaml.safe_load((pkg / "model.yaml").read_text())
    w.write_bytes(original)
    for task_name in ("os.system", "volfm.io.readers.read_volume", "volfm.tasks.base.as_config"):
        (pkg / "model.yaml").write_text(yaml.safe_dump({**doc, "task": task_name}))
        with pytest.raises(VolfmError, match="not a volfm task"):
            load_task(pkg)
    (pkg / "model.yaml").write_text("format: something-else\n")
    with pytest.raises(VolfmError, match="not a volfm model description"):
        read_package(pkg)
    with pytest.raises(VolfmError, match="has no model.yaml"):
        read_package(tmp_path)


def test_an_old_checkpoint_without_the_record_predicts_with_store(trained, oblique, tmp_path):
    ckpt, store = trained
    raw = torch.load(ckpt, weights_only=True)
    for key in ("data", "metrics", "inference"):
        raw["volfm"].pop(key)
    raw["datamodule_hyper_parameters"]["store"] = str(tmp_path / "nowhere")
    old = tmp_path / "old.ckpt"
    torch.save(raw, old)
    with pytest.raises(VolfmError, match="records no preprocessing spec.*nowhere/spec.yaml is missing; pass --store"):
        predict_files(old, oblique, tmp_path / "x", progress=False)
    with pytest.raises(VolfmError, match="--store /nonexistent: /nonexistent/spec.yaml is missing"):
        predict_files(ckpt, oblique, tmp_path / "x", store="/nonexistent", progress=False)
    predict_files(old, oblique, tmp_path / "a", store=store, progress=False, qc=False)
    predict_files(ckpt, oblique, tmp_path / "b", progress=False, qc=False)
    np.testing.assert_array_equal(np.asarray(_seg(tmp_path / "a").dataobj), np.asarray(_seg(tmp_path / "b").dataobj))
    with pytest.raises(VolfmError, match="records no preprocessing spec"):
        export_checkpoint(old, tmp_path / "pkg")
    assert main(["export", "--ckpt", str(old), "--store", str(store), "--out", str(tmp_path / "pkg")]) == 0
    task, raw2 = load_task(tmp_path / "pkg")
    assert raw2["volfm"]["data"]["spec"] == yaml.safe_load((store / "spec.yaml").read_text())["spec"]


def test_pretrained_accepts_a_package(trained, tmp_path):
    ckpt, _ = trained
    pkg = tmp_path / "m"
    main(["export", "--ckpt", str(ckpt), "--out", str(pkg)])
    src = torch.load(ckpt, weights_only=True)["state_dict"]
    task = SegmentationTask(encoder=EncoderConfig("resnet18_3d", TINY_ENC, str(pkg)), labels=["spleen"],
                            decoder={"pretrained": str(pkg)})
    task.restore_record(torch.load(ckpt, weights_only=True)["volfm"])  # builds the decoder for its label map
    task.load_pretrained("fit")
    task.load_pretrained_decoder("fit", task.decoder, task.decoder_cfg)
    for k, v in task.encoder.state_dict().items():
        assert torch.equal(v, src[f"encoder.{k}"]), k
    dec = {k: v for k, v in task.decoder.state_dict().items() if not k.startswith(("head.", "ds_heads.", "out."))}
    assert dec and all(torch.equal(v, src[f"decoder.{k}"]) for k, v in dec.items())
    with pytest.raises(VolfmError, match="folder without model.yaml"):
        SegmentationTask(encoder=EncoderConfig("resnet18_3d", TINY_ENC, str(tmp_path)), labels=["x"]).load_pretrained("fit")


# ------------------------------------------------------------------------------------------------- Merlin
@pytest.fixture(scope="module")
def merlin_pt(tmp_path_factory, merlin_fakes):
    root = tmp_path_factory.mktemp("merlin")
    state = merlin_fakes.make_merlin_state(depth=50, classes=5, seed=4, dtype=torch.float32)
    torch.save(state, root / "merlin.pt")
    (root / "phenotypes.csv").write_text("phecode,phecode_str\n8,Intestinal infection\n8.5,Bacterial enteritis\n"
                                         "8.51,Intestinal e.coli\n10,Tuberculosis\n38,Septicemia\n")
    return root / "merlin.pt", state


def test_convert_merlin_package_predicts_like_merlin(merlin_pt, merlin_fakes, tmp_path, capsys):
    pt, state = merlin_pt
    out = tmp_path / "merlin_pkg"
    assert main(["convert", "merlin", str(pt), "--out", str(out), "--phenotypes", str(pt.with_name("phenotypes.csv")),
                 "--spec", "ct_merlin_demo"]) == 0
    assert "318 encoder tensors -> resnet50_3d, 5 classes" in capsys.readouterr().out
    doc = yaml.safe_load((out / "model.yaml").read_text())
    assert doc["kind"] == "pretraining" and doc["classes"] == 5 and doc["preprocessing"]["spec"]["name"] == "ct_merlin_demo"
    scan = tmp_path / "ct.nii.gz"
    write_nifti(make_ct_case(2, shape=(64, 56, 30), orientation="LPS")["image"], scan)
    assert main(["predict", "--model", str(out), "--input", str(scan), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    feats = np.loadtxt(tmp_path / "p" / "features.csv", delimiter=",", skiprows=1, usecols=range(1, 2049))
    header = (tmp_path / "p" / "probabilities.csv").read_text().splitlines()[0].split(",")
    assert header == ["case", "8", "8.5", "8.51", "10", "38"]
    probs = np.loadtxt(tmp_path / "p" / "probabilities.csv", delimiter=",", skiprows=1, usecols=range(1, 6))
    # the reference: Merlin's layout on the same preprocessed input
    x = Pipeline(load_spec("ct_merlin_demo"))({"image": str(scan)}, "c").arrays["image"]
    s64 = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    ref = merlin_fakes.merlin_reference(s64, torch.from_numpy(np.asarray(x, np.float64))[None])
    np.testing.assert_allclose(feats, ref["pooled"][0].numpy(), rtol=1e-4, atol=1e-4 * float(ref["pooled"].abs().max()))
    np.testing.assert_allclose(probs, torch.sigmoid(ref["logits"][0]).numpy(), atol=1e-4)
    # the encoder file and merlin:PATH give the same weights
    e1 = load_encoder(out / "encoder.safetensors").state_dict()
    task = PretrainTask(encoder=EncoderConfig("resnet50_3d", {}, f"merlin:{pt}"))
    task.load_pretrained("fit")
    assert all(torch.equal(v, e1[k]) for k, v in task.encoder.state_dict().items())
    for enc_cfg, match in ((EncoderConfig("resnet18_3d", {}, f"merlin:{pt}"), "set encoder.name: resnet50_3d"),
                           (EncoderConfig("resnet50_3d", {"pool_time_stride": 1}, f"merlin:{pt}"), "pool_time_stride")):
        with pytest.raises(VolfmError, match=match):
            PretrainTask(encoder=enc_cfg).load_pretrained("fit")


def test_convert_merlin_errors(merlin_pt, tmp_path, capsys):
    pt, _ = merlin_pt
    bad = tmp_path / "p.csv"
    bad.write_text("phecode,phecode_str\n8,a\n")
    assert main(["convert", "merlin", str(pt), "--out", str(tmp_path / "o"), "--phenotypes", str(bad)]) == 2
    assert "has 1 rows but the checkpoint's classifier has 5 outputs" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["convert", "merlin", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "junk.pt" in err and "weights_only=True" in err


def test_convert_merlin_with_a_local_longformer(merlin_pt, merlin_fakes, tmp_path):
    """The text tower: Merlin's text weights in a local Longformer folder, Merlin's settings (normalised reports, no
    global attention, first token), its 768->512 projection: the package's text embedding is Merlin's."""
    _, image_state = merlin_pt
    reports = ["Liver: normal. Spleen: enlarged, 16 cm.", "Kidneys: no stones. Lungs: clear.", "Liver: steatosis."] * 4
    tok = train_wordpiece_tokenizer(reports, vocab_size=200)
    cfg = LongformerConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, attention_window=4, max_position_embeddings=1028, pad_token_id=0)
    torch.manual_seed(0)
    folder = tmp_path / "longformer"
    LongformerModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    torch.manual_seed(1)
    merlin_text = LongformerModel(cfg).eval()  # "Merlin's" text weights: not the folder's
    state = dict(image_state)
    state.update({f"encode_text.text_encoder.{k}": v for k, v in merlin_text.state_dict().items()})
    proj = torch.nn.Linear(16, 512)
    state["encode_text.linear_layer.weight"], state["encode_text.linear_layer.bias"] = proj.weight.data, proj.bias.data
    pt = tmp_path / "merlin_text.pt"
    torch.save(state, pt)
    out = tmp_path / "pkg"
    assert main(["convert", "merlin", str(pt), "--out", str(out), "--text-model", str(folder),
                 "--spec", "ct_merlin_demo"]) == 0
    assert (out / "text.json").is_file() and (out / "text" / "volfm_text_encoder.json").is_file()
    task, _ = load_task(out)
    assert (task.text.global_attention, task.text.normalize, task.text.max_length) == ("none", "merlin", 1024)
    texts = ["Liver: Normal.", "Spleen: enlarged, 16 cm."]
    enc = tok([merlin_sanitize(t) for t in texts], padding=True, truncation=True, max_length=1024, return_tensors="pt")
    with torch.no_grad():
        want = torch.nn.functional.normalize(proj(merlin_text(**enc).last_hidden_state[:, 0]), dim=-1)
        got = task.text_embedding(texts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the image side: pooled features -> Merlin's contrastive head, normalised
    x = torch.randn(1, 1, 40, 36, 20, generator=torch.Generator().manual_seed(5))
    s64 = {k: v.double() if v.is_floating_point() else v for k, v in image_state.items()}
    ref = merlin_fakes.merlin_reference(s64, x.double())
    with torch.no_grad():
        emb = task.image_embedding(task.image_features(x)).double()
    torch.testing.assert_close(emb, torch.nn.functional.normalize(ref["contrastive"], dim=-1), atol=1e-5, rtol=1e-4)
    pkg2 = tmp_path / "copy"
    shutil.copytree(out, pkg2)
    (pkg2 / "text.json").write_text("{}")
    with pytest.raises(VolfmError, match="text.json does not match"):
        load_task(pkg2)
    # continuing report-contrastive pretraining: the projections and logit scale start from the package's / Merlin's
    for source in (str(out), f"merlin:{pt}"):
        cont = PretrainTask(encoder=EncoderConfig("resnet50_3d", {}, source), icd=None,
                            contrastive=ContrastiveConfig(text_model=str(out / "text"), **MERLIN_TEXT))
        cont.restore_record({"text": task.text.to_spec()})  # builds the text tower and fresh projections
        assert not torch.equal(cont.text_proj.net.weight, proj.weight.data)
        cont._continue_projections()
        assert torch.equal(cont.text_proj.net.weight, proj.weight.data)
        assert torch.equal(cont.image_proj.net.weight, task.image_proj.net.weight)
        assert torch.equal(cont.logit_scale.log_scale, task.logit_scale.log_scale)


def test_export_leaves_out_a_training_only_perceptual_network():
    t = torch.zeros(2)
    state, hp, notes = inference_only({"encoder.w": t, "perceptual.enc.w": t, "decoder.w": t},
                                      {"losses": {"l1": 1.0, "perceptual": 0.1, "perceptual_encoder": "/train/enc.st"}})
    assert sorted(state) == ["decoder.w", "encoder.w"]
    assert hp["losses"] == {"l1": 1.0, "perceptual": 0.0, "perceptual_encoder": None}
    assert "/train/enc.st" in notes[0]
    plain = {"losses": {"perceptual": 0.0}}
    assert inference_only({"encoder.w": t}, plain) == ({"encoder.w": t}, plain, [])
