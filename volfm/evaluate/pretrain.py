"""`volfm evaluate`: the evaluation protocol of a pretrained volfm checkpoint on a store split.

    volfm evaluate --ckpt runs/.../last.ckpt [--store STORE] [--split test] \
                   [--subgroups sex age:0,50,65,200] [--out eval_dir]

Everything runs on frozen features of the checkpoint's image encoder (whole volumes, the crop the
checkpoint was trained with):

* ICD codes: the checkpoint's own head (ICD pretext / multi-task), macro/micro AUROC and AUPRC over
  classes with at least ``min_positives`` positives in the split;
* linear probe: an L2 logistic regression on the frozen pooled features of the training split (C
  chosen on a held-out fifth of it), scored on the split, on the same ICD classes;
* image<->report retrieval Recall@1/5/10 (contrastive checkpoints; cases with a report);
* zero-shot findings: positive/negative prompts (several phrasings averaged), per-finding AUROC, F1;
* subgroups: each of those per value (or band) of any manifest column.

Writes ``eval.json`` (all numbers), one CSV per subgroup column and ``eval.png`` (bars per class /
finding with the chance line), and prints tables.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.utils.data import DataLoader

from volfm import VolfmError
from volfm.data.datamodules import collate_cases
from volfm.data.dataset import StoreDataset
from volfm.data.samplers import PatchDataset, WholeVolumeSampler
from volfm.metrics.classification import multilabel_metrics
from volfm.metrics.probe import linear_probe
from volfm.metrics.retrieval import retrieval_metrics
from volfm.metrics.subgroups import format_table, subgroup_breakdown, write_csv
from volfm.metrics.zeroshot import (
    finding_truth,
    load_prompts,
    zero_shot_metrics,
    zero_shot_scores,
)
from volfm.preprocess.qc import save_png
from volfm.targets.icd import IcdVocabulary
from volfm.tasks.pretrain import PretrainTask
from volfm.utils import progress_bar

__all__ = ["evaluate_pretraining", "extract"]


def _loader(store, split, patch_size, batch_size, num_workers):
    ds = StoreDataset(store, split=split, label=None, columns=None)
    pd = PatchDataset(ds, WholeVolumeSampler(size=patch_size), samples_per_volume=1, seed=0)
    return ds, DataLoader(pd, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          collate_fn=collate_cases)


@torch.no_grad()
def extract(task, store, split, patch_size=None, batch_size: int = 4, num_workers: int = 2, device="cpu",
            progress: bool = True) -> dict:
    """Pooled features, ICD probabilities, image and report embeddings of every ok case of ``split``."""
    ds, loader = _loader(store, split, patch_size, batch_size, num_workers)
    task = task.to(device)
    out: dict[str, list] = {"features": [], "icd_score": [], "image_emb": [], "text_emb": []}
    codes, reports, ids = [], [], []
    for batch in progress_bar(loader, desc=f"features {split}", unit="batch", disable=not progress):
        x = batch["image"].to(device)
        f = task.image_features(x)
        out["features"].append(f.float().cpu())
        if task.icd_head is not None:
            out["icd_score"].append(torch.sigmoid(task.icd_head(f).float()).cpu())
        if task.text is not None:
            out["image_emb"].append(task.image_embedding(f).float().cpu())
            reps = [(r or "").strip() for r in batch["report"]]
            emb = torch.full((len(reps), task.con_cfg.embed_dim), float("nan"))
            keep = [i for i, r in enumerate(reps) if r]
            if keep:
                emb[keep] = task.text_embedding([reps[i] for i in keep]).float().cpu()
            out["text_emb"].append(emb)
        codes += batch["icd_codes"]
        reports += batch["report"]
        ids += batch["case_id"]
    res = {k: torch.cat(v).numpy() for k, v in out.items() if v}
    rows = {r["case_id"]: r for r in ds.rows}
    res.update(codes=codes, reports=reports, case_ids=ids, rows=[rows[c] for c in ids])
    return res


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def evaluate_pretraining(task: PretrainTask, raw: dict, ckpt, store=None, split: str = "test",
                         train_split: str = "train", subgroups: Sequence[str] = (), prompts: str | None = None,
                         out=None, batch_size: int = 4, num_workers: int = 2, device: str | None = None,
                         min_positives: int = 2, progress: bool = True) -> dict:
    """The pretraining protocol (module docstring) for ``task`` loaded from ``ckpt`` (``raw``: its checkpoint
    dict, for the store it was trained on); writes into ``out`` when given and returns the report."""
    dm_h = raw.get("datamodule_hyper_parameters") or {}
    store = store or dm_h.get("store")
    if not store:
        raise VolfmError(f"{ckpt} does not record its store; pass --store")
    patch = task.patch_size or dm_h.get("patch_size")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    test = extract(task, store, split, patch, batch_size, num_workers, device, progress)
    train = extract(task, store, train_split, patch, batch_size, num_workers, device, progress)
    report: dict = {"checkpoint": str(ckpt), "store": str(store), "split": split, "n_cases": len(test["case_ids"]),
                    "train_split": train_split, "n_train": len(train["case_ids"])}

    # ICD classes: the checkpoint's vocabulary, else one built from the training split's codes
    vocab = task.vocab
    if vocab is None:
        vocab = IcdVocabulary.build(train["codes"], level="category", min_count=min_positives,
                                    source=f"{store} ({train_split} split)")
    y_test, y_train = vocab.encode_many(test["codes"]), vocab.encode_many(train["codes"])
    names = list(vocab.classes)
    per_case: dict[str, np.ndarray] = {}
    if "icd_score" in test:
        report["icd_head"] = multilabel_metrics(y_test, test["icd_score"], names, min_positives=min_positives)
    probe = linear_probe(train["features"], y_train, test["features"], y_test, class_names=names,
                         min_positives=min_positives)
    probe_scores = probe.pop("test_scores")
    report["linear_probe"] = probe

    zs_scores = zs_truth = None
    if "image_emb" in test:
        ok = ~np.isnan(test["text_emb"]).any(axis=1)
        if ok.sum() >= 2:
            report["retrieval"] = retrieval_metrics(test["image_emb"][ok], test["text_emb"][ok])
        pset = load_prompts(prompts or task.eval_cfg.prompts or "ct_findings")
        with torch.no_grad():
            zs_scores, zs_names = zero_shot_scores(test["image_emb"], lambda t: task.text_embedding(t).cpu(), pset)
        zs_truth = finding_truth(test["codes"], pset)
        report["zero_shot"] = zero_shot_metrics(zs_scores, zs_truth, zs_names)
        per_case["ok_report"] = ok

    def metric_fn(idx: np.ndarray) -> dict:
        m = {}
        if "icd_score" in test:
            m["icd_macro_auroc"] = multilabel_metrics(y_test[idx], test["icd_score"][idx], names,
                                                      min_positives=1)["macro_auroc"]
        m["probe_macro_auroc"] = multilabel_metrics(y_test[idx], probe_scores[idx], names, min_positives=1)["macro_auroc"]
        if zs_scores is not None:
            m["zeroshot_macro_auroc"] = zero_shot_metrics(zs_scores[idx], zs_truth[idx],
                                                          list(report["zero_shot"]["per_finding"]))["macro_auroc"]
        return m

    report["subgroups"] = {}
    for spec in subgroups:
        rows = subgroup_breakdown(test["rows"], spec, metric_fn, min_cases=5)
        report["subgroups"][spec] = rows
        if out:
            col = spec.split(":")[0]
            write_csv(rows, Path(out) / f"subgroups_{col}.csv")
        print(f"\nsubgroups by {spec}:\n{format_table(rows)}")
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(report, indent=2, default=_json_default))
        _plot(report, out / "eval.png")
        report["files"] = [str(out / "eval.json"), str(out / "eval.png")]
    _print_summary(report)
    return report


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _print_summary(r: dict) -> None:
    print(f"\nevaluation of {r['checkpoint']} on {r['store']} split {r['split']} ({r['n_cases']} cases; "
          f"probe trained on {r['n_train']} {r['train_split']} cases)")
    if "icd_head" in r:
        m = r["icd_head"]
        print(f"ICD head:      macro AUROC {_fmt(m['macro_auroc'])}  micro AUROC {_fmt(m['micro_auroc'])}  "
              f"macro AUPRC {_fmt(m['macro_auprc'])}  ({m['n_classes_scored']} classes scored)")
    m = r["linear_probe"]
    print(f"linear probe:  macro AUROC {_fmt(m['macro_auroc'])}  micro AUROC {_fmt(m['micro_auroc'])}  "
          f"(C={m.get('C')}, {m['n_classes_scored']} classes scored)")
    if "retrieval" in r:
        q = r["retrieval"]
        ks = sorted(int(k[2:]) for k in q["image_to_report"] if k.startswith("R@"))
        for d in ("image_to_report", "report_to_image"):
            recalls = "  ".join(f"R@{k} {_fmt(q[d][f'R@{k}'])} (chance {_fmt(q['chance'][f'R@{k}'])})" for k in ks)
            print(f"{d.replace('_to_', '->') + ':':<15} " + recalls + f"  median rank {q[d]['median_rank']:.0f}/{q['n']}")
    if "zero_shot" in r:
        z = r["zero_shot"]
        print(f"zero-shot:     macro AUROC {_fmt(z['macro_auroc'])}  macro F1 {_fmt(z['macro_f1'])}  "
              f"({z['n_findings_scored']} of {z['n_findings']} findings scored)")
        for name, f in z["per_finding"].items():
            print(f"  {name:<22} AUROC {_fmt(f['auroc'])}  F1 {_fmt(f['f1'])}  positives {f['positives']}")


def _plot(r: dict, path: Path) -> None:
    matplotlib.use("Agg")

    panels = []
    if "icd_head" in r:
        panels.append(("ICD head AUROC per class", r["icd_head"]["per_class"]))
    panels.append(("linear probe AUROC per class", r["linear_probe"]["per_class"]))
    if "zero_shot" in r:
        panels.append(("zero-shot AUROC per finding", r["zero_shot"]["per_finding"]))
    fig, axes = plt.subplots(1, len(panels) + ("retrieval" in r), figsize=(5 * (len(panels) + 1), 4.5), squeeze=False)
    for ax, (title, per) in zip(axes[0], panels):
        items = [(k, v.get("auroc")) for k, v in per.items() if _finite(v.get("auroc")) is not None]
        ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
        ax.axvline(0.5, color="grey", ls="--", lw=1, label="chance")
        ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=7, loc="lower right")
    if "retrieval" in r:
        ax = axes[0][-1]
        q = r["retrieval"]
        ks = sorted(int(k[2:]) for k in q["image_to_report"] if k.startswith("R@"))
        for d, c in (("image_to_report", "tab:blue"), ("report_to_image", "tab:orange")):
            ax.plot(ks, [q[d][f"R@{k}"] for k in ks], "o-", color=c, label=d.replace("_to_", "->"))
        ax.plot(ks, [q["chance"][f"R@{k}"] for k in ks], "--", color="grey", label="chance")
        ax.set_xlabel("k")
        ax.set_ylabel("Recall@k")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"retrieval ({q['n']} cases)", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"{Path(r['checkpoint']).name} on split {r['split']}", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
