"""PretrainTask's epoch metrics are the numbers volfm.metrics gives on the same cases: the ICD AUROC/AUPRC,
retrieval R@k and zero-shot values logged by a validation run equal multilabel_metrics, retrieval_metrics and
zero_shot_scores/zero_shot_metrics computed here from the model's own outputs, and a 2-process DDP run
(gloo on CPU) of the same checkpoint logs the same values: its validation shards are padded with a repeated
case, which must count once."""
import csv
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from volfm.cli.main import main
from volfm.data.datamodules import PretrainDataModule
from volfm.data.dataset import StoreDataset
from volfm.metrics.classification import multilabel_metrics
from volfm.metrics.retrieval import retrieval_metrics
from volfm.metrics.zeroshot import finding_truth, load_prompts, zero_shot_metrics, zero_shot_scores
from volfm.preprocess.spec import load_spec
from volfm.store.build import run_cohort
from volfm.synth.ct import make_ct_cohort
from volfm.targets.reports import report_views
from volfm.tasks import load_task

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
VAL_IDS = [f"ct_{i:04d}" for i in range(1, 8)]  # 7 validation cases: two ranks get 4 each, one case repeats
ARGS = ["--model.init_args.encoder.name", "resnet18_3d", "--model.init_args.encoder.kwargs",
        '{"in_chans": 1, "base_channels": 8}', "--model.init_args.icd.min_count", "1",
        "--model.init_args.contrastive.text_config", '{"vocab_size": 300, "hidden_size": 32, "num_layers": 1, '
        '"num_heads": 2, "intermediate_size": 64}', "--model.init_args.contrastive.embed_dim", "16",
        "--model.init_args.contrastive.text_max_length", "128",
        "--data.init_args.patch_size", "[32, 32, 32]", "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "4", "--data.init_args.val_batch_size", "4",
        "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", "[]"]
# forked workers start in a second (spawned ones re-import torch and volfm: ~30 s on two busy cores); the DDP code
# path is the same. Fork is refused once CUDA is initialised (GPU test runs), spawn then.
DDP = "ddp_spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "ddp_fork"
KEYS = (["val/icd_macro_auroc", "val/icd_micro_auroc", "val/icd_macro_auprc", "val/icd_micro_auprc",
         "val/icd_classes_scored", "val/zeroshot_macro_auroc", "val/zeroshot_macro_f1"]
        + [f"val/{d}_R@{k}" for d in ("i2r", "r2i") for k in (1, 5, 10)])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """14 synthetic CT cases at 32^3: ct_0001..ct_0007 are the validation split (ct_0001, the case DDP repeats,
    has no codes; ct_0003 no report), the other 7 train."""
    root = tmp_path_factory.mktemp("pretrain_values")
    table = make_ct_cohort(root / "ct", 14, seed=5, shape=(40, 40, 24), progress=False)
    rows = list(csv.DictReader(open(table, newline="", encoding="utf-8")))
    for r in rows:
        r["split"] = "val" if r["case_id"] in VAL_IDS else "train"
    rows[1]["icd_codes"] = ""
    rows[3]["report"] = ""
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
def ckpt(store, tmp_path_factory):
    """A multi-task checkpoint after one training step (BatchNorm statistics and heads no longer at init)."""
    root = tmp_path_factory.mktemp("pretrain_values_run")
    assert main(["fit", "--config", str(RECIPES / "demo/multitask_pretrain.yaml"), "--data.init_args.store", str(store),
                 "--trainer.default_root_dir", str(root), "--trainer.logger", "false", *ARGS, "--trainer.devices", "1",
                 "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0",
                 "--trainer.enable_checkpointing", "true"]) == 0
    return sorted(root.rglob("*.ckpt"))[-1]


def _direct_metrics(task, store) -> dict:
    """The validation metrics from the model's outputs on each validation case, one case at a time."""
    ds = StoreDataset(store, split="val", arrays=("image",), label=None)
    assert list(ds.case_ids) == VAL_IDS
    prompts = load_prompts(task.eval_cfg.prompts)
    scores, targets, img, txt, codes = [], [], [], [], []
    with torch.no_grad():
        for i in range(len(ds)):
            case = ds[i]
            x = torch.from_numpy(np.asarray(case["image"], dtype=np.float32))[None]
            feats = task.image_features(x)
            scores.append(torch.sigmoid(task.icd_head(feats))[0].numpy())
            targets.append(task.vocab.encode_many([case["icd_codes"]])[0])
            img.append(task.image_embedding(feats)[0].numpy())
            report = case["report"].strip()
            txt.append(task.text_embedding([report_views(report, "whole")])[0].numpy() if report else None)
            codes.append(case["icd_codes"])
    out = {}
    m = multilabel_metrics(np.stack(targets), np.stack(scores), class_names=list(task.vocab.classes),
                           min_positives=task.eval_cfg.min_positives)
    for k in ("macro_auroc", "micro_auroc", "macro_auprc", "micro_auprc"):
        out[f"val/icd_{k}"] = m[k]
    out["val/icd_classes_scored"] = float(m["n_classes_scored"])
    ok = [i for i, t in enumerate(txt) if t is not None]
    r = retrieval_metrics(np.stack([img[i] for i in ok]), np.stack([txt[i] for i in ok]), ks=(1, 5, 10))
    for direction, short in (("image_to_report", "i2r"), ("report_to_image", "r2i")):
        for k in (1, 5, 10):
            out[f"val/{short}_R@{k}"] = r[direction][f"R@{k}"]
    with torch.no_grad():
        zs, names = zero_shot_scores(np.stack(img), task.text_embedding, prompts)
    z = zero_shot_metrics(zs, finding_truth(codes, prompts), names)
    out["val/zeroshot_macro_auroc"] = z["macro_auroc"]
    out["val/zeroshot_macro_f1"] = z["macro_f1"]
    return out


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert set(got) >= set(want), f"{what}: missing {sorted(set(want) - set(got))}"
    bad = {k: (got[k], want[k]) for k in want
           if not (got[k] == pytest.approx(want[k], abs=1e-6) or (math.isnan(got[k]) and math.isnan(want[k])))}
    assert not bad, f"{what}: logged vs expected {json.dumps(bad)}"


@pytest.fixture(scope="module")
def single(ckpt, store):
    """(task loaded from the checkpoint, its metrics of trainer.validate in this process)."""
    task, _ = load_task(ckpt)
    dm = PretrainDataModule(str(store), patch_size=[32, 32, 32], num_workers=0, batch_size=4, val_batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    trainer.validate(task, datamodule=dm)
    return task, dict(task.last_metrics)


def test_validation_metrics_equal_the_metric_functions_on_the_same_cases(single, store):
    task, logged = single
    want = _direct_metrics(task, store)
    assert set(logged) == set(KEYS)
    # the fixture gives numbers, not NaN: classes and findings are scored, retrieval has 6 pairs
    assert all(math.isfinite(want[k]) for k in KEYS), want
    assert want["val/icd_classes_scored"] >= 2 and want["val/i2r_R@1"] < 1
    _assert_same(logged, want, "single process")


def _csv_metrics(log_dir: Path) -> dict:
    files = sorted(log_dir.rglob("metrics.csv"))
    assert len(files) == 1, files
    out = {}
    for row in csv.DictReader(open(files[0], newline="", encoding="utf-8")):
        out.update({k: float(v) for k, v in row.items() if k.startswith("val/") and v != ""})
    return out


def test_two_process_ddp_validation_logs_the_single_process_metrics(single, ckpt, store, tmp_path):
    """Two CPU processes over gloo: rank 0 validates ct_0001, 3, 5, 7 and rank 1 ct_0002, 4, 6 and ct_0001 again
    (the padding); the metrics are gathered over both ranks with the repeat dropped. A Trainer here rather than
    ``volfm validate --ckpt_path``, which cannot parse a volfm checkpoint's hyper-parameters under Lightning 2.6."""
    task, _ = load_task(ckpt)
    dm = PretrainDataModule(str(store), patch_size=[32, 32, 32], num_workers=0, batch_size=4, val_batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDP, logger=CSVLogger(tmp_path, name="csv"),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False)
    trainer.validate(task, datamodule=dm)
    assert trainer.world_size == 2
    logged = _csv_metrics(tmp_path)  # written by rank 0 in its own process
    _assert_same(logged, single[1], "2-process DDP vs single process")
