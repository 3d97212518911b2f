"""Merlin-style pretraining tasks: recipes run through `volfm fit`, checkpoints carry their vocabulary and
tokenizer, staged initialisation loads the ICD encoder, and bad input is handled as the issue asks."""
import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from volfm import VolfmError
from volfm.cli.main import main
from volfm.data.datamodules import PretrainDataModule
from volfm.models import create_encoder, load_encoder_weights
from volfm.preprocess.spec import load_spec
from volfm.store.build import run_cohort
from volfm.synth.ct import make_ct_cohort
from volfm.tasks import ContrastiveConfig, EncoderConfig, IcdHeadConfig, PretrainTask

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = ["--model.init_args.encoder.name", "resnet18_3d", "--model.init_args.encoder.kwargs",
        '{"in_chans": 1, "base_channels": 8}', "--data.init_args.patch_size", "[32, 32, 32]",
        "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4", "--data.init_args.val_batch_size", "4",
        "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false"]
TEXT = ["--model.init_args.contrastive.text_config", '{"vocab_size": 500, "hidden_size": 32, "num_layers": 1, '
        '"num_heads": 2, "intermediate_size": 64}', "--model.init_args.contrastive.embed_dim", "16",
        "--model.init_args.contrastive.text_max_length", "128"]
ICD1 = ["--model.init_args.icd.min_count", "1"]  # only for recipes with an ICD head: it would switch one on
ENC = EncoderConfig("resnet18_3d", {"in_chans": 1, "base_channels": 8})
SMALL_TEXT = ContrastiveConfig(text_config={"vocab_size": 300, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                            "intermediate_size": 64}, embed_dim=16)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """14 synthetic CT cases at 32^3 (the Merlin field of view at 10.5 x 10.5 x 15 mm); case 0 has its
    report blanked and case 1 its codes (bad input the tasks must survive)."""
    root = tmp_path_factory.mktemp("pretrain")
    table = make_ct_cohort(root / "ct", 14, seed=5, shape=(40, 40, 24), progress=False)
    rows = list(csv.DictReader(open(table, newline="", encoding="utf-8")))
    rows[0]["report"] = ""
    rows[1]["icd_codes"] = ""
    rows[2]["icd_codes"] = rows[2]["icd_codes"] + ";NOT.A.CODE;Z99.999"  # malformed and unknown
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


def _fit(recipe, store, root, *extra):
    args = ["fit", "--config", str(RECIPES / recipe), "--data.init_args.store", str(store),
            "--trainer.default_root_dir", str(root), "--trainer.logger", "false", *TINY, *extra]
    assert main(args) == 0


@pytest.mark.parametrize("recipe", ["icd_pretrain.yaml", "report_contrastive.yaml", "multitask_pretrain.yaml",
                                    "demo/icd_pretrain.yaml", "demo/report_contrastive.yaml",
                                    "demo/multitask_pretrain.yaml"])
def test_every_recipe_fast_dev_run(recipe, store, tmp_path):
    extra = (TEXT if "icd" not in recipe else []) + (ICD1 if "report" not in recipe else [])
    _fit(recipe, store, tmp_path, "--trainer.fast_dev_run", "true", "--trainer.callbacks", "[]", *extra)


def test_print_config_and_unknown_key(store, capsys):
    with pytest.raises(SystemExit) as ok:
        main(["fit", "--config", str(RECIPES / "icd_pretrain.yaml"), "--print_config"])
    assert ok.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"] == "volfm.tasks.PretrainTask"
    assert cfg["model"]["init_args"]["icd"]["level"] == "category" and cfg["model"]["init_args"]["contrastive"] is None
    # model.init_args.patch_size is linked from data.init_args.patch_size, so the recipe cannot set it apart
    assert "patch_size" not in cfg["model"]["init_args"] and cfg["data"]["init_args"]["patch_size"] == [224, 224, 160]
    assert cfg["trainer"]["use_distributed_sampler"] is False
    with pytest.raises(SystemExit) as bad:
        main(["fit", "--config", str(RECIPES / "icd_pretrain.yaml"), "--model.init_args.icd.levle", "block"])
    assert bad.value.code != 0
    assert "levle" in capsys.readouterr().err


def _trained(store, root, recipe, *extra, epochs=1):
    _fit(recipe, store, root, "--trainer.max_epochs", str(epochs), "--trainer.callbacks", "[]",
         "--trainer.enable_checkpointing", "true", *extra)
    ckpts = sorted(Path(root).rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    return ckpts[-1]


@pytest.fixture(scope="module")
def multitask_ckpt(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    return _trained(store, root, "demo/multitask_pretrain.yaml", *TEXT, *ICD1)


def test_checkpoint_rebuilds_vocabulary_tokenizer_and_heads(multitask_ckpt, store):
    """load_from_checkpoint needs neither the store nor a tokenizer folder, and gives the same numbers."""
    raw = torch.load(str(multitask_ckpt), map_location="cpu", weights_only=True)
    info = raw["volfm"]
    assert info["task"] == "volfm.tasks.pretrain.PretrainTask" and info["patch_size"] == [32, 32, 32]
    assert "K76.0" in info["icd_vocab"]["classes"] or "R16.0" in info["icd_vocab"]["classes"]
    task = PretrainTask.load_from_checkpoint(str(multitask_ckpt), map_location="cpu", weights_only=True)
    task.eval()
    assert task.icd_cfg.level == "full" and task.con_cfg.embed_dim == 16 and task.patch_size == (32, 32, 32)
    assert list(task.vocab.classes) == list(info["icd_vocab"]["classes"])
    assert task.icd_head[-1].out_features == len(task.vocab)
    x = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = task.image_features(x)
        emb = task.text_embedding(["liver: hepatomegaly.", "spleen: normal size."])
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    state = raw["state_dict"]
    torch.testing.assert_close(task.icd_head[-1].weight, state["icd_head.1.weight"])
    torch.testing.assert_close(task.text.model.embeddings.word_embeddings.weight,
                               state["text.model.embeddings.word_embeddings.weight"])
    assert f.shape == (2, task.num_features)


def test_staged_pretraining_starts_from_the_icd_encoder(store, tmp_path):
    icd = _trained(store, tmp_path / "icd", "demo/icd_pretrain.yaml", *ICD1)
    enc = torch.load(str(icd), map_location="cpu", weights_only=True)["state_dict"]
    task = PretrainTask(encoder=EncoderConfig("resnet18_3d", {"in_chans": 1, "base_channels": 8}, str(icd)),
                        icd=None, contrastive=SMALL_TEXT)

    dm = PretrainDataModule(str(store), patch_size=(32, 32, 32), num_workers=0, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(task, datamodule=dm)  # setup() loads the pretrained encoder, no step taken
    for k, v in task.encoder.state_dict().items():
        torch.testing.assert_close(v, enc[f"encoder.{k}"], msg=k)
    # an encoder of another width cannot take these weights: the error lists the mismatched keys
    with pytest.raises(VolfmError, match="shape-mismatched keys"):
        load_encoder_weights(create_encoder("resnet18_3d", base_channels=16), icd)


def test_empty_reports_are_skipped_for_contrastive_and_kept_for_icd(store):
    task = PretrainTask(encoder=ENC, icd=IcdHeadConfig(min_count=1), contrastive=SMALL_TEXT)

    dm = PretrainDataModule(str(store), patch_size=(32, 32, 32), num_workers=0, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(task, datamodule=dm)
    batch = {"case_id": ["a", "b", "c"], "image": torch.rand(3, 1, 32, 32, 32),
             "icd_codes": [["K76.0"], [], ["R16.0", "bad code"]], "report": ["LIVER: Fatty liver.", "", "   "]}
    keep, texts = task._report_texts(batch, train=True)
    assert keep == [0] and texts == ["LIVER: Fatty liver."]
    # one report in the batch (e.g. the last batch of an epoch): no negatives, so no InfoNCE term
    loss, logs, outs = task._step(batch, train=True)
    assert logs["contrastive_loss"] == 0 and logs["icd_loss"] > 0 and torch.isfinite(loss)
    batch["report"][2] = "SPLEEN: Splenomegaly."
    loss, logs, outs = task._step(batch, train=True)
    assert outs["keep"] == [0, 2] and torch.isfinite(loss)
    target = outs["icd_target"]
    assert target.shape == (3, len(task.vocab)) and target[1].sum() == 0  # no codes: an all-negative row, kept
    assert target[0, task.vocab.index("K76")] == 1  # category level: K76.0 rolls up to K76


def test_vocabulary_reports_bad_codes_without_crashing(store, capsys):
    task = PretrainTask(encoder=ENC, icd=IcdHeadConfig(min_count=1, level="full"))

    dm = PretrainDataModule(str(store), patch_size=(32, 32, 32), num_workers=0, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(task, datamodule=dm)
    stats = task.vocab.stats
    train_ids = {r["case_id"] for r in dm.train_rows()}
    if "ct_0002" in train_ids:
        assert stats["malformed"]["count"] >= 1 and stats["unknown"]["count"] >= 1
    assert set(task.vocab.classes) <= {"R16.0", "R16.1", "K76.0", "N28.1", "N20.0", "K80.20", "J90", "R18.8",
                                       "R91.1", "J98.11", "I71.40", "I10", "E11.9", "E78.5", "Z87.891"}


def test_missing_text_model_path_fails_fast_without_download(store, tmp_path, capsys):
    rc = main(["fit", "--config", str(RECIPES / "demo/report_contrastive.yaml"), "--data.init_args.store", str(store),
               "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", *TINY,
               "--trainer.fast_dev_run", "true", "--model.init_args.contrastive.text_model",
               "emilyalsentzer/Bio_ClinicalBERT"])
    err = capsys.readouterr().err
    assert rc == 2 and "emilyalsentzer/Bio_ClinicalBERT: no such local folder" in err and "nothing is downloaded" in err


def test_random_label_control_permutes_codes_among_training_cases(store):
    task = PretrainTask(encoder=ENC, icd=IcdHeadConfig(min_count=1, random_labels=True))

    dm = PretrainDataModule(str(store), patch_size=(32, 32, 32), num_workers=0, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(task, datamodule=dm)
    rows = dm.train_rows()
    own = {r["case_id"]: sorted(c for c in (r.get("icd_codes") or "").split(";") if c) for r in rows}
    shuffled = {k: sorted(v) for k, v in task._shuffled_codes.items()}
    assert sorted(map(tuple, shuffled.values())) == sorted(map(tuple, own.values()))  # same multiset of code lists
    assert sum(shuffled[k] != own[k] for k in own) >= len(own) // 2  # but mostly on other cases
    batch = {"case_id": [rows[0]["case_id"]], "icd_codes": [own[rows[0]["case_id"]]]}
    assert task._codes(batch, train=True) == [task._shuffled_codes[rows[0]["case_id"]]]
    assert task._codes(batch, train=False) == batch["icd_codes"]  # validation keeps the true codes


def test_evaluate_cli_writes_json_png_and_subgroups(multitask_ckpt, store, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--ckpt", str(multitask_ckpt), "--store", str(store), "--split", "val",
                 "--subgroups", "sex", "age:0,50,200", "--out", str(out), "--workers", "0", "--quiet"]) == 0
    import json

    doc = json.loads((out / "eval.json").read_text())
    text = capsys.readouterr().out
    assert "ICD head:" in text and "linear probe:" in text and "zero-shot:" in text and "image->report:" in text
    assert doc["n_cases"] >= 2 and set(doc["zero_shot"]["per_finding"]) >= {"hepatomegaly", "ascites"}
    assert doc["retrieval"]["n"] == doc["n_cases"]  # every val case has a report
    assert (out / "eval.png").stat().st_size > 1000 and (out / "subgroups_sex.csv").is_file()
    groups = [r["group"] for r in doc["subgroups"]["sex"]]
    assert groups[0] == "all" and set(groups[1:]) <= {"F", "M"}
    assert sum(r["n"] for r in doc["subgroups"]["sex"][1:]) == doc["n_cases"]


def test_evaluate_rejects_a_non_volfm_checkpoint(tmp_path, capsys):
    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bad)
    assert main(["evaluate", "--ckpt", str(bad), "--store", str(tmp_path)]) == 2
    assert "is not a volfm checkpoint" in capsys.readouterr().err


def test_multitask_fit_under_ddp_on_two_cpu_processes(store, tmp_path):
    """Lightning's DDP strategy (gloo on CPU): heads built per rank in setup(), embeddings gathered across
    ranks, validation metrics over both ranks' cases, a checkpoint that loads."""
    _fit("demo/multitask_pretrain.yaml", store, tmp_path, *TEXT, "--trainer.strategy", "ddp_spawn",
         "--trainer.devices", "2", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
         "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "true", *ICD1,
         "--data.init_args.batch_size", "2")
    ckpt = sorted(tmp_path.rglob("*.ckpt"))[-1]
    task = PretrainTask.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True)
    assert task.icd_head is not None and task.text is not None


def test_a_batch_without_reports_still_uses_every_parameter(store):
    """(Under DDP an unused parameter on one rank breaks the gradient all-reduce.)"""
    task = PretrainTask(encoder=ENC, icd=None, contrastive=SMALL_TEXT)

    dm = PretrainDataModule(str(store), patch_size=(32, 32, 32), num_workers=0, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(task, datamodule=dm)
    batch = {"case_id": ["a", "b"], "image": torch.rand(2, 1, 32, 32, 32), "icd_codes": [[], []], "report": ["", " "]}
    loss, logs, _ = task._step(batch, train=True)
    assert loss.requires_grad and float(loss) == 0.0
    loss.backward()
    unused = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


def test_test_with_ckpt_path_uses_the_checkpoints_tokenizer_and_vocabulary(multitask_ckpt, store, tmp_path):
    raw = torch.load(str(multitask_ckpt), map_location="cpu", weights_only=True)
    task = PretrainTask(encoder=ENC, icd=IcdHeadConfig(level="full", min_count=1),
                        contrastive=ContrastiveConfig(text_config={"vocab_size": 500, "hidden_size": 32, "num_layers": 1,
                                                                   "num_heads": 2, "intermediate_size": 64},
                                                      embed_dim=16, text_max_length=128))

    dm = PretrainDataModule(str(store), patch_size=(32, 32, 32), num_workers=0, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, default_root_dir=str(tmp_path))
    trainer.test(task, datamodule=dm, ckpt_path=str(multitask_ckpt))
    assert task.text.to_spec() == raw["volfm"]["text"]
    assert list(task.vocab.classes) == list(raw["volfm"]["icd_vocab"]["classes"])
    assert "test/zeroshot_macro_auroc" in task.last_metrics


def test_cli_test_with_ckpt_path_rebuilds_the_task_from_the_checkpoint(multitask_ckpt, store, tmp_path):
    args = ["test", "--config", str(RECIPES / "demo/multitask_pretrain.yaml"), "--data.init_args.store", str(store),
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", *TINY, *TEXT, *ICD1,
            "--ckpt_path", str(multitask_ckpt)]
    assert main(args) == 0
