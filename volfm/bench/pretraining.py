"""`volfm bench pretraining`: every pretraining objective on one store, one budget, one few-label protocol.

Objectives (``--objectives``; each pretrains its encoder from the same random start, seed ``--pretrain-seed``):

    scratch      no pretraining: the CNN's random init (the baseline of every CNN objective)
    icd          ICD-code pretext (Merlin's EHR signal), whole volumes
    contrastive  CT-report InfoNCE with the small offline BERT, whole volumes
    multitask    icd + contrastive, whole volumes
    masked       masked-volume reconstruction with the segmentation U-Net decoder (nnssl's MAE for CNNs) on random
                 crops of the fine-tuning patch size; fine-tuning carries encoder + pretrained decoder
    masked_enc   the masked checkpoint, fine-tuned from its encoder only (fresh decoder)
    hybrid       masked + icd + contrastive in one loss (whole volumes for the ICD/report losses, crops for masked)
    mae          MAE of a small 3D ViT on the same crops; its baseline is ``scratch_vit`` (added automatically)

Equal pretraining budget: every objective trains ``--pretrain-steps`` optimiser steps on batches of
``--pretrain-batch`` whole stored volumes of the training split (the masked objectives cut one crop per volume
from the same batches). Then, on frozen features of whole volumes (train split to fit, test split to score):

* linear probe: macro AUROC of an L2 logistic regression per finding (:func:`volfm.metrics.probe.linear_probe`),
  over the findings visible at the store's resolution (``--findings``) and over all findings;
* zero-shot macro AUROC on the same findings (objectives with a text tower), image->report Recall@5.

Few-label segmentation of ``--labels`` (default spleen: no objective sees an organ label, so every organ is
"unseen"; the ICD/report signals mention splenomegaly, which is what they are): for each objective, fine-tuning
mode (``--modes``: full, frozen), labelled-case count (``--counts``) and seed (``--seeds``), one
:class:`volfm.tasks.SegmentationTask` run with the same budget (``--finetune-steps`` x ``--finetune-batch`` patches
whatever the count; see ``volfm bench label-efficiency``), tested on the whole test split. The masked objectives
carry their pretrained U-Net decoder too (``masked_enc``: the same checkpoint with a fresh decoder). Differences to scratch are
paired by seed (same cases, patches and decoder init; only the pretrained weights differ).

Output: the representation table, the Dice table (mean +- sample sd over seeds, the paired difference to the
scratch run of the same encoder), ``--out/pretraining.json`` and ``--out/pretraining.png``, and the time each part
took. Runs go ``--jobs`` at a time in separate processes (default: 2 on a machine with 2+ cores, 1 thread each).

    volfm bench pretraining [--store STORE | --cases 200] [--objectives scratch,icd,contrastive,multitask,masked,
        masked_enc,hybrid | all] [--pretrain-steps 150] [--counts 1,5] [--seeds 0,1,2] [--modes full]
        [--frozen-counts 5] [--recompute-bn-batches 0] [--finetune-steps 100] [--finetune-batch 4]
        [--warmup-fraction 0] [--jobs 2] [--out DIR]
    the default runs the CNN objectives: 42 fine-tuning runs of 100 steps x 4 patches (about 50 s each on one CPU
    thread), 22 min 43 s on 2 cores. ``--objectives all`` adds MAE and its scratch ViT, whose UNETR needs about
    ``--finetune-steps 300`` to leave the all-background solution (about 5 min a run on one CPU thread). The full
    protocol adds --counts 1,2,5,all --modes full,frozen --frozen-counts 1,2,5,all, and a GPU affords
    --finetune-steps 300 --finetune-batch 8.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import lightning
import lightning.pytorch as pl
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm import tqdm

from volfm import VolfmError
from volfm.bench.common import (
    counts_arg,
    ints_arg,
    json_dict_arg,
    mean_sd,
    names_arg,
    quiet_lightning,
    seeds_arg,
    write_results,
)
from volfm.bench.label_efficiency import finetune_and_test
from volfm.data.datamodules import PretrainDataModule
from volfm.data.dataset import StoreDataset
from volfm.evaluate.pretrain import extract
from volfm.metrics.probe import linear_probe
from volfm.metrics.retrieval import retrieval_metrics
from volfm.metrics.zeroshot import finding_truth, load_prompts, zero_shot_metrics, zero_shot_scores
from volfm.store.build import run_cohort
from volfm.synth.ct import make_ct_cohort
from volfm.tasks import (
    ContrastiveConfig,
    EncoderConfig,
    IcdHeadConfig,
    MAEConfig,
    MaskedVolumeConfig,
    PretrainOptimConfig,
    PretrainTask,
)
from volfm.utils import progress_bar

PROG = "volfm bench pretraining"
OBJECTIVES = ("scratch", "icd", "contrastive", "multitask", "masked", "masked_enc", "hybrid", "mae")
# The default run leaves out the ViT pair (mae vs scratch_vit): its UNETR does not leave the all-background solution
# within the CPU-sized 100 fine-tuning steps (Dice 0.000 at lr 3e-4, 1e-3 and 3e-3; 0.516 after 300 steps, README)
# while its 12 runs took about 12 of the old default's 34 wall minutes (2 jobs). ``--objectives all`` (or a list with
# mae) adds it.
DEFAULT_OBJECTIVES = tuple(o for o in OBJECTIVES if o != "mae")
# objectives that fine-tune from another objective's checkpoint (no pretraining of their own)
SHARED = {"masked_enc": "masked"}
CNN_KWARGS = {"in_chans": 1, "base_channels": 16}
VIT_KWARGS = {"in_chans": 1, "patch_size": 8, "img_size": [32, 32, 32], "depth": 8, "pos_embed": "sincos"}
# Decoders (the same in masked pretraining and in fine-tuning, so the masked objectives can carry theirs): the default
# U-Net for the CNN (``--cnn-decoder-kwargs`` changes it; a lighter one, {"channels": [8, 16, 16, 32, 64]}, halves a CPU
# step but learnt much more slowly in few-label fine-tuning, see the README) and a UNETR of base width 8 for the ViT.
DECODER_KWARGS = {"resnet18_3d": {}, "vit_tiny_3d": {"feature_size": 8}}
# Findings whose image signal survives 7 x 7 x 10 mm voxels (ct_merlin_demo): whole-organ size and density, fluid.
# Stones, cysts and nodules of a few millimetres and the aneurysm span about one voxel there (the ICD head of the
# demo scores them near chance); ``--findings all`` scores every finding.
VISIBLE_FINDINGS = ("hepatomegaly", "splenomegaly", "fatty_liver", "pleural_effusion", "ascites", "atelectasis")
TEXT = {"text_max_length": 256, "text_lr": 5e-4, "report_mode": "whole", "embed_dim": 128,
        "text_config": {"vocab_size": 2000, "hidden_size": 128, "num_layers": 2, "num_heads": 4,
                        "intermediate_size": 256}}
ICD = {"level": "full", "min_count": 3}


def objective_settings(name: str, crop, block: int, cnn_kwargs=None, vit_kwargs=None, cnn_decoder_kwargs=None) -> dict:
    """Encoder, decoder and loss groups of one objective (``crop``: the masked objectives' crop size)."""
    CNN = ("resnet18_3d", dict(CNN_KWARGS if cnn_kwargs is None else cnn_kwargs))
    VIT = ("vit_tiny_3d", dict(VIT_KWARGS if vit_kwargs is None else vit_kwargs))
    decoders = {**DECODER_KWARGS, **({"resnet18_3d": dict(cnn_decoder_kwargs)} if cnn_decoder_kwargs is not None else {})}
    masked = {"mask_ratio": 0.75, "block_size": block, "crop_size": list(crop), "decoder_kwargs": decoders["resnet18_3d"]}
    table = {
        "scratch": {"encoder": CNN},
        "scratch_vit": {"encoder": VIT},
        "icd": {"encoder": CNN, "icd": ICD, "lr": 2e-3},
        "contrastive": {"encoder": CNN, "contrastive": TEXT, "lr": 1e-3},
        "multitask": {"encoder": CNN, "icd": ICD, "contrastive": TEXT, "lr": 1e-3},
        "masked": {"encoder": CNN, "masked": masked, "lr": 2e-3},
        "masked_enc": {"encoder": CNN, "masked": masked, "lr": 2e-3},
        "hybrid": {"encoder": CNN, "masked": masked, "icd": {**ICD, "weight": 0.1},
                   "contrastive": {**TEXT, "weight": 0.1}, "lr": 1e-3},
        "mae": {"encoder": VIT, "mae": {"mask_ratio": 0.75, "crop_size": list(crop), "decoder_dim": 96,
                                        "decoder_depth": 2, "decoder_heads": 4}, "lr": 1e-3},
    }
    out = table[name]
    out["decoder_kwargs"] = decoders[out["encoder"][0]]
    return out


# --- arguments -------------------------------------------------------------------------------------

def _list(choices=None, kind=str):
    def parse(text):
        out = [kind(s.strip()) if s.strip() != "all" else "all" for s in str(text).split(",") if s.strip()]
        if not out:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        if choices is not None:
            bad = [o for o in out if o not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}; choose from {', '.join(choices)}")
        return out
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="pretraining objectives compared on one store at one budget: "
                                "linear probe, zero-shot, retrieval, few-label segmentation (frozen and full)")
    p.add_argument("--store", help="a ct_merlin_demo-like store with labels, codes and reports (default: synthesise "
                   "--cases cases and preprocess them with ct_merlin_demo into --out/store)")
    p.add_argument("--cases", type=int, default=200, help="synthetic cases when no --store is given (default 200)")
    p.add_argument("--objectives", type=_list(OBJECTIVES + ("all",)), default=list(DEFAULT_OBJECTIVES),
                   help=f"objectives to compare (default {','.join(DEFAULT_OBJECTIVES)}; 'all' adds mae, whose "
                        "ViT needs about --finetune-steps 300 to learn); mae adds scratch_vit")
    p.add_argument("--pretrain-steps", type=int, default=150, help="optimiser steps per objective (default 150)")
    p.add_argument("--pretrain-batch", type=int, default=8, help="whole volumes per pretraining step (default 8)")
    p.add_argument("--pretrain-seed", type=int, default=0, help="seed of every pretraining run (default 0)")
    p.add_argument("--crop", type=ints_arg, default=[32, 32, 32],
                   help="crop of the masked objectives = fine-tuning patch (default 32,32,32)")
    p.add_argument("--block", type=int, default=4, help="masked-volume block size in voxels (default 4)")
    p.add_argument("--cnn-kwargs", type=json_dict_arg, default=None,
                   help=f"resnet18_3d kwargs as JSON (default {json.dumps(CNN_KWARGS)})")
    p.add_argument("--cnn-decoder-kwargs", type=json_dict_arg, default=None,
                   help="UNetDecoder kwargs of the CNN objectives, pretraining and fine-tuning (default: the default "
                        "U-Net)")
    p.add_argument("--vit-kwargs", type=json_dict_arg, default=None,
                   help=f"vit_tiny_3d kwargs as JSON (default {json.dumps(VIT_KWARGS)})")
    p.add_argument("--labels", type=names_arg, default=["spleen"], help="organ(s) to segment (default spleen)")
    p.add_argument("--counts", type=counts_arg, default=[1, 5],
                   help="labelled cases (default 1,5; the full protocol: 1,2,5,all)")
    p.add_argument("--seeds", type=seeds_arg, default=[0, 1, 2], help="fine-tuning seeds (default 0,1,2)")
    p.add_argument("--modes", type=_list(("full", "frozen")), default=["full"],
                   help="fine-tuning modes (default full; full,frozen adds frozen-encoder runs at --frozen-counts)")
    p.add_argument("--frozen-counts", type=counts_arg, default=[5],
                   help="counts at which the frozen mode runs (default 5; 'all counts': give --frozen-counts 1,2,5,all)")
    p.add_argument("--finetune-steps", type=int, default=100,
                   help="optimiser steps per fine-tuning run (default 100, CPU-sized: the default run took 23 min on 2 "
                        "cores; 150-300 on a GPU, 300 for the ViT pair)")
    p.add_argument("--finetune-batch", type=int, default=4, help="patches per fine-tuning step (default 4)")
    p.add_argument("--foreground-fraction", type=float, default=0.5,
                   help="fine-tuning patches forced to contain the organ (default 0.5)")
    p.add_argument("--lr", type=float, default=3e-3, help="fine-tuning learning rate (default 3e-3)")
    p.add_argument("--warmup-fraction", type=float, default=0.0,
                   help="linear learning-rate warm-up over this fraction of the fine-tuning steps, for every "
                        "objective (default 0; 0.1 was measured: it did not stop pretrained runs from staying at Dice 0, "
                        "see the README)")
    p.add_argument("--recompute-bn-batches", type=int, default=0,
                   help="frozen mode: re-estimate the encoder's BatchNorm statistics on this many fine-tuning batches "
                        "before training (default 0: keep the pretraining statistics)")
    p.add_argument("--encoder-lr-scale", type=float, default=0.3,
                   help="encoder lr = lr x this in full fine-tuning, for every objective (default 0.3)")
    p.add_argument("--findings", default="visible",
                   help="findings scored by the probe and zero-shot: visible (default), all, or names a,b,c")
    p.add_argument("--jobs", type=int, help="runs at a time, each in its own process (default: 2 with 2+ CPU cores)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator for every run (default cpu)")
    p.add_argument("--precision", default="32-true", help="Lightning precision (default 32-true)")
    p.add_argument("--out", default="bench_pretraining", help="folder for the store, checkpoints, JSON and PNG")
    p.add_argument("--json", help="also write the results as JSON here")
    return p


# --- quiet Lightning -------------------------------------------------------------------------------

def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


# --- pretraining (one process per objective) --------------------------------------------------------

def pretrain(store: str, name: str, settings: dict, steps: int, batch: int, seed: int, out: str,
             accelerator: str = "cpu", precision: str = "32-true", threads: int | None = None,
             findings=VISIBLE_FINDINGS) -> dict:
    """Pretrain one objective for ``steps`` steps, save ``out/<name>.ckpt``, score its frozen features."""
    _set_threads(threads)
    t0 = time.perf_counter()
    enc_name, enc_kwargs = settings["encoder"]
    ckpt = Path(out) / f"{name}.ckpt"
    with quiet_lightning():
        lightning.seed_everything(seed, verbose=False)
        task = PretrainTask(encoder=EncoderConfig(enc_name, dict(enc_kwargs)),
                            icd=IcdHeadConfig(**settings["icd"]) if "icd" in settings else None,
                            contrastive=ContrastiveConfig(**settings["contrastive"]) if "contrastive" in settings
                            else None,
                            masked=MaskedVolumeConfig(**settings["masked"]) if "masked" in settings else None,
                            mae=MAEConfig(**settings["mae"]) if "mae" in settings else None,
                            optim=PretrainOptimConfig(lr=settings["lr"], weight_decay=1e-4, warmup_fraction=0.05),
                            seed=seed)
        dm = PretrainDataModule(store, batch_size=batch, val_batch_size=batch, num_workers=0,
                                persistent_workers=False, pin_memory=False, seed=seed)
        trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=steps,
                             max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             use_distributed_sampler=False, default_root_dir=str(out))
        trainer.fit(task, datamodule=dm)
        losses = {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        trainer.save_checkpoint(str(ckpt))
    fit_s = time.perf_counter() - t0
    scores = representation_scores(task, store, findings)
    return {"objective": name, "checkpoint": str(ckpt), "encoder": enc_name, "encoder_kwargs": enc_kwargs,
            "steps": int(trainer.global_step), "batch": batch, "final_losses": losses, "pretrain_s": round(fit_s, 1),
            "eval_s": round(time.perf_counter() - t0 - fit_s, 1), **scores}


def representation_scores(task, store: str, findings=VISIBLE_FINDINGS) -> dict:
    """Linear probe (and zero-shot, retrieval with a text tower) on frozen whole-volume features."""
    task.eval()
    with torch.no_grad():
        train = extract(task, store, "train", None, batch_size=8, num_workers=0, progress=False)
        test = extract(task, store, "test", None, batch_size=8, num_workers=0, progress=False)
    prompts = load_prompts("ct_findings")
    names = list(prompts)
    y_train, y_test = finding_truth(train["codes"], prompts), finding_truth(test["codes"], prompts)
    probe = linear_probe(train["features"], y_train.astype(float), test["features"], y_test.astype(float),
                         class_names=names, min_positives=2)
    out = {"probe_per_finding": {n: (probe["per_class"].get(n) or {}).get("auroc") for n in names}}
    if "image_emb" in test:
        ok = ~np.isnan(test["text_emb"]).any(axis=1)
        if ok.sum() >= 2:
            r = retrieval_metrics(test["image_emb"][ok], test["text_emb"][ok], ks=(1, 5, 10))
            out["i2r_R@5"] = r["image_to_report"]["R@5"]
            out["r2i_R@5"] = r["report_to_image"]["R@5"]
            out["retrieval_chance_R@5"] = r["chance"]["R@5"]
        with torch.no_grad():
            scores, zs_names = zero_shot_scores(test["image_emb"], lambda t: task.text_embedding(t).cpu(), prompts)
        z = zero_shot_metrics(scores, y_test, zs_names)
        out["zeroshot_per_finding"] = {n: z["per_finding"][n]["auroc"] for n in zs_names}
    for kind in ("probe", "zeroshot"):
        per = out.get(f"{kind}_per_finding")
        if per is None:
            continue
        for label, subset in (("visible", findings), ("all", names)):
            vals = [per[n] for n in subset if per.get(n) is not None and math.isfinite(per[n])]
            out[f"{kind}_auroc_{label}"] = statistics.fmean(vals) if vals else None
    out["n_test"] = len(test["case_ids"])
    return out


def _finetune_job(kwargs: dict, threads: int | None) -> dict:
    _set_threads(threads)
    meta = {k: kwargs.pop(k) for k in ("objective", "count")}
    r = finetune_and_test(**kwargs)
    r.pop("per_case", None)
    return {**meta, **r}


def _pretrain_job(kwargs: dict, threads: int | None) -> dict:
    return pretrain(**kwargs, threads=threads)


# --- summary, table, plot ----------------------------------------------------------------------------

def baseline_of(objective: str) -> str:
    return "scratch_vit" if objective in ("mae", "scratch_vit") else "scratch"


def summarise(runs: list[dict], objectives, modes, ks) -> dict:
    out = {}
    for obj in objectives:
        for mode in modes:
            for k in ks:
                rs = [r for r in runs if r["objective"] == obj and r["finetune"] == mode and r["k"] == k]
                if not rs:
                    continue
                base = {r["seed"]: r for r in runs if r["objective"] == baseline_of(obj) and r["finetune"] == mode
                        and r["k"] == k}
                diffs = [r["test_mean_dice"] - base[r["seed"]]["test_mean_dice"] for r in rs
                         if r["seed"] in base and r["test_mean_dice"] is not None
                         and base[r["seed"]]["test_mean_dice"] is not None]
                out[f"{obj}|{mode}|{k}"] = {"objective": obj, "mode": mode, "k": k,
                                            "dice": mean_sd(r["test_mean_dice"] for r in rs),
                                            "diff_vs_scratch": mean_sd(diffs) if obj != baseline_of(obj) else None,
                                            "seconds": statistics.fmean(r["seconds"] for r in rs)}
    return out


def _fmt(s, spec=".3f", signed=False) -> str:
    if not s or s.get("mean") is None:
        return "-"
    m = f"{round(s['mean'], 3) + 0.0:{'+' if signed else ''}{spec}}"
    return m + (f"±{s['sd']:.3f}" if s.get("sd") is not None else "")


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def representation_table(pre: dict, objectives) -> str:
    lines = ["| objective | encoder | pretrain s | probe AUROC (visible / all) | zero-shot AUROC (visible / all) | "
             "i2r R@5 (chance) |", "| --- | --- | --- | --- | --- | --- |"]
    for obj in objectives:
        p = pre.get(obj, {})
        zs = (f"{_num(p.get('zeroshot_auroc_visible'))} / {_num(p.get('zeroshot_auroc_all'))}"
              if p.get("zeroshot_auroc_all") is not None else "-")
        r5 = (f"{p['i2r_R@5']:.3f} ({p['retrieval_chance_R@5']:.3f})" if p.get("i2r_R@5") is not None else "-")
        lines.append(f"| {obj} | {p.get('encoder', '-')} | {p.get('pretrain_s', 0):.0f} | "
                     f"{_num(p.get('probe_auroc_visible'))} / {_num(p.get('probe_auroc_all'))} | {zs} | {r5} |")
    return "\n".join(lines)


def dice_table(summary: dict, objectives, modes, ks, labels) -> str:
    head = "| objective | fine-tuning | " + " | ".join(f"k={k}" for k in ks) + " |"
    lines = [head, "|" + " --- |" * (2 + len(ks))]
    for mode in modes:
        for obj in objectives:
            cells = []
            for k in ks:
                s = summary.get(f"{obj}|{mode}|{k}")
                if s is None:
                    cells.append("")
                    continue
                c = _fmt(s["dice"])
                if s["diff_vs_scratch"] is not None:
                    c += f" ({_fmt(s['diff_vs_scratch'], signed=True)})"
                cells.append(c)
            if any(cells):
                lines.append(f"| {obj} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, summary: dict, objectives, modes, ks, title: str) -> Path:
    matplotlib.use("Agg")
    fig, axes = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.4), dpi=110, squeeze=False)
    colors = dict(zip(objectives, plt.get_cmap("tab10").colors))
    for ax, mode in zip(axes[0], modes):
        for obj in objectives:
            pts = [(k, summary[f"{obj}|{mode}|{k}"]["dice"]) for k in ks if f"{obj}|{mode}|{k}" in summary]
            pts = [(k, s) for k, s in pts if s["mean"] is not None]
            if not pts:
                continue
            xs, ys = [k for k, _ in pts], [s["mean"] for _, s in pts]
            err = [s["sd"] or 0.0 for _, s in pts]
            style = "--" if obj.startswith("scratch") else "-"
            ax.errorbar(xs, ys, yerr=err, fmt="o" + style, color=colors[obj], lw=1.8, ms=5, capsize=3, label=obj)
        ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.minorticks_off()
        ax.set_ylim(0, 1)
        ax.set_xlabel("labelled training cases (log scale)")
        ax.set_ylabel("test Dice (mean ± sd over seeds)")
        ax.set_title(f"{mode} fine-tuning", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --- main ------------------------------------------------------------------------------------------

def _prepare_store(args, out: Path) -> str:
    if args.store:
        if not (Path(args.store) / "manifest.csv").is_file():
            raise VolfmError(f"--store {args.store} is not a volfm store (no manifest.csv); build one with volfm "
                             "preprocess, or leave --store out to synthesise one")
        return str(args.store)
    store = out / "store"
    if (store / "manifest.csv").is_file() and (out / "synth" / "cohort.csv").is_file():
        print(f"store: {store} (already built; delete it to rebuild)")
        return str(store)
    t0 = time.perf_counter()
    print(f"synthesising {args.cases} CT cases (64 x 64 x 40) and preprocessing them with ct_merlin_demo ...",
          flush=True)
    table = make_ct_cohort(out / "synth", args.cases, seed=11, shape=(64, 64, 40), workers=max(1, _jobs(args)))
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run_cohort("ct_merlin_demo", store, cohort=table, workers=max(1, _jobs(args)), qc=False)
    if summary["failed"]:
        raise VolfmError(f"{summary['failed']} synthetic case(s) failed to preprocess; see {store}/manifest.csv")
    print(f"store: {store} ({time.perf_counter() - t0:.0f} s)")
    return str(store)


def _settings(args, objective: str) -> dict:
    return objective_settings(objective, args.crop, args.block, args.cnn_kwargs, args.vit_kwargs,
                              args.cnn_decoder_kwargs)


def _jobs(args) -> int:
    if args.jobs is not None:
        return max(1, args.jobs)
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def _check(args) -> None:
    for name in ("pretrain_steps", "pretrain_batch", "finetune_steps", "finetune_batch", "cases", "block"):
        if getattr(args, name) < 1:
            raise VolfmError(f"--{name.replace('_', '-')} must be >= 1")
    if args.recompute_bn_batches < 0:
        raise VolfmError("--recompute-bn-batches must be >= 0")
    if args.lr <= 0 or args.encoder_lr_scale < 0:
        raise VolfmError("need --lr > 0 and --encoder-lr-scale >= 0")
    if not 0 <= args.warmup_fraction < 1:
        raise VolfmError(f"--warmup-fraction must be in [0, 1), got {args.warmup_fraction}")


def _run_pool(jobs: int, fn, items: list[dict], threads: int, desc: str, on_done) -> list[dict]:
    results = []
    if jobs == 1:
        for kw in progress_bar(items, desc=desc, unit="run"):
            r = fn(dict(kw), threads)
            on_done(r)
            results.append(r)
        return results
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
    try:
        futures = [pool.submit(fn, dict(kw), threads) for kw in items]
        for fut in progress_bar(as_completed(futures), total=len(futures), desc=desc, unit="run"):
            r = fut.result()
            on_done(r)
            results.append(r)
    except BaseException:
        # Ctrl-C or a failed run: drop the queued runs (the ones running finish theirs, then the workers exit)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return _run(args)
    except VolfmError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)


def expand_objectives(names) -> list[str]:
    """The objectives to run for ``--objectives``: 'all' is every objective; each one's checkpoint source
    (masked for masked_enc) and baseline (scratch, scratch_vit for mae) are added where missing."""
    objectives = list(dict.fromkeys(OBJECTIVES if "all" in names else names))
    for o, src in SHARED.items():
        if o in objectives and src not in objectives:
            objectives.insert(objectives.index(o), src)
    if "mae" in objectives and "scratch_vit" not in objectives:
        objectives.insert(objectives.index("mae"), "scratch_vit")
    if any(o != "scratch" and baseline_of(o) == "scratch" for o in objectives) and "scratch" not in objectives:
        objectives.insert(0, "scratch")
    return objectives


def _run(args) -> int:
    _check(args)
    t_all = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(args)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    store = _prepare_store(args, out)
    n_train = len(StoreDataset(store, split="train", label=None, columns=()))
    prompts = list(load_prompts("ct_findings"))
    findings = (prompts if args.findings == "all" else list(VISIBLE_FINDINGS) if args.findings == "visible"
                else [f.strip() for f in args.findings.split(",") if f.strip()])
    unknown = [f for f in findings if f not in prompts]
    if unknown:
        raise VolfmError(f"--findings: unknown finding {unknown[0]!r}; the prompt set has {', '.join(prompts)}")
    objectives = expand_objectives(args.objectives)
    ks = sorted({n_train if c == "all" else int(c) for c in args.counts})
    # frozen counts only matter when the frozen mode runs (else no empty columns in the tables)
    frozen_ks = (sorted({n_train if c == "all" else int(c) for c in args.frozen_counts}) if "frozen" in args.modes
                 else [])
    if max(ks + frozen_ks) > n_train:
        raise VolfmError(f"--counts up to {max(ks + frozen_ks)} but {store} has {n_train} training cases")
    print(f"{PROG}: store {store} ({n_train} training cases); objectives {', '.join(objectives)}; {jobs} job(s) x "
          f"{threads} thread(s); torch {torch.__version__}")
    print(f"pretraining budget: {args.pretrain_steps} steps x {args.pretrain_batch} whole volumes per objective; "
          f"fine-tuning: {args.finetune_steps} steps x {args.finetune_batch} patches of "
          f"{'x'.join(map(str, args.crop))}, counts {', '.join(map(str, ks))}"
          f"{' (frozen: ' + ', '.join(map(str, frozen_ks)) + ')' if frozen_ks else ''}, seeds "
          f"{', '.join(map(str, args.seeds))}, modes {', '.join(args.modes)}")

    # 1. pretraining
    t0 = time.perf_counter()
    ckdir = out / "checkpoints"
    ckdir.mkdir(exist_ok=True)
    items = [dict(store=store, name=o, settings=_settings(args, o),
                  steps=args.pretrain_steps, batch=args.pretrain_batch, seed=args.pretrain_seed, out=str(ckdir),
                  accelerator=args.accelerator, precision=args.precision, findings=findings)
             for o in objectives if not o.startswith("scratch") and o not in SHARED]

    def pre_done(r):
        zs = f", zero-shot {_num(r['zeroshot_auroc_visible'])}" if "zeroshot_per_finding" in r else ""
        losses = ", ".join(f"{k} {v:.3g}" for k, v in sorted(r["final_losses"].items()))
        tqdm.write(f"pretrained {r['objective']:<11} {r['steps']} steps in {r['pretrain_s']:.0f} s ({losses}); "
                   f"probe AUROC (scored findings) {_num(r['probe_auroc_visible'])}{zs}")

    pre = {r["objective"]: r for r in _run_pool(jobs, _pretrain_job, items, threads, "pretraining", pre_done)}
    for o, src in SHARED.items():
        if o in objectives:
            pre[o] = {**pre[src], "objective": o, "shared_with": src}
    # the baselines' representation scores: the random encoders themselves
    for o in [o for o in objectives if o.startswith("scratch")]:
        s = _settings(args, o)
        lightning.seed_everything(args.pretrain_seed, verbose=False)
        with quiet_lightning():
            task = PretrainTask(encoder=EncoderConfig(s["encoder"][0], dict(s["encoder"][1])), icd=IcdHeadConfig(),
                                seed=args.pretrain_seed)
        pre[o] = {"objective": o, "checkpoint": None, "encoder": s["encoder"][0], "encoder_kwargs": s["encoder"][1],
                  "pretrain_s": 0.0, **representation_scores(task, store, findings)}
    pretrain_s = time.perf_counter() - t0

    # 2. fine-tuning
    t1 = time.perf_counter()
    items = []
    for o in objectives:
        p = pre[o]
        carry = o in ("masked", "hybrid")
        for mode in args.modes:
            for k in (ks if mode == "full" else frozen_ks):
                for seed in args.seeds:
                    items.append(dict(objective=o, count="all" if k == n_train else k, store=store,
                                      encoder=p["encoder"], encoder_kwargs=p["encoder_kwargs"], labels=args.labels,
                                      k=k, seed=seed, epochs=1, steps_per_epoch=args.finetune_steps,
                                      batch_size=args.finetune_batch, patch=tuple(args.crop), lr=args.lr,
                                      pretrained=p["checkpoint"], decoder_pretrained=p["checkpoint"] if carry else None,
                                      decoder_kwargs=_settings(args, o)["decoder_kwargs"],
                                      foreground_fraction=args.foreground_fraction,
                                      finetune=mode, encoder_lr_scale=args.encoder_lr_scale,
                                      warmup_fraction=args.warmup_fraction,
                                      recompute_bn_batches=args.recompute_bn_batches if mode == "frozen" else 0,
                                      workers=0,
                                      accelerator=args.accelerator, precision=args.precision, out=str(out)))

    def ft_done(r):
        tqdm.write(f"  {r['objective']:<11} {r['finetune']:<6} k={r['k']:<3} seed {r['seed']}: Dice "
                   f"{_num(r['test_mean_dice'])} ({r['seconds']:.0f} s)")

    runs = _run_pool(jobs, _finetune_job, items, threads, "fine-tuning", ft_done)
    finetune_s = time.perf_counter() - t1
    all_ks = sorted(set(ks) | set(frozen_ks))
    summary = summarise(runs, objectives, args.modes, all_ks)
    total_s = time.perf_counter() - t_all

    n_test = next(iter(pre.values()))["n_test"]
    print()
    print(f"representations (frozen whole-volume features; test split, {n_test} cases; findings 'visible': "
          f"{', '.join(findings)}):")
    rep = representation_table(pre, objectives)
    print(rep)
    print()
    print(f"few-label segmentation of {', '.join(args.labels)}: test Dice mean±sd over seeds {args.seeds} "
          f"(in brackets: paired difference to the scratch run of the same encoder)")
    dice = dice_table(summary, objectives, args.modes, all_ks, args.labels)
    print(dice)
    print()
    print(f"time: pretraining {pretrain_s / 60:.1f} min, fine-tuning {finetune_s / 60:.1f} min ({len(runs)} runs), "
          f"total {total_s / 60:.1f} min with {jobs} job(s)")
    title = (f"{', '.join(args.labels)}: {args.pretrain_steps}x{args.pretrain_batch} pretraining, "
             f"{args.finetune_steps}x{args.finetune_batch} fine-tuning, seeds {args.seeds}, {n_test} test cases")
    png = plot(out / "pretraining.png", summary, objectives, args.modes, all_ks, title)
    print(f"plot: {png}")
    doc = {"benchmark": "pretraining", "store": store, "objectives": objectives,
           "settings": {o: _settings(args, o) for o in objectives},
           "visible_findings": findings, "args": {k: v for k, v in vars(args).items()},
           "n_train": n_train, "n_test": n_test, "jobs": jobs, "threads_per_job": threads,
           "torch": torch.__version__, "pretraining": pre, "finetune_runs": runs,
           "summary": list(summary.values()), "tables": {"representations": rep, "dice": dice},
           "seconds": {"pretraining": round(pretrain_s, 1), "finetuning": round(finetune_s, 1),
                       "total": round(total_s, 1)}, "plot": str(png)}
    write_results(out / "pretraining.json", doc)
    if args.json:
        write_results(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
