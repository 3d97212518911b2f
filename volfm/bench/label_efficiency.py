"""`volfm bench label-efficiency`: segmentation Dice with 1, 2, 5, ... labelled cases, random init vs pretrained.

For every count k in ``--counts`` (``all`` = the whole training split), every initialisation (``scratch``:
the encoder's random init; ``pretrained``: encoder weights from ``--pretrained``, any volfm checkpoint) and
every seed in ``--seeds``, one :class:`volfm.tasks.SegmentationTask` (same encoder, decoder, label map,
fine-tuning mode and hyperparameters for both inits) is fine-tuned on the first k training cases of the
store (:class:`volfm.data.datamodules.SegmentationDataModule` ``num_train_cases=k``: a fixed seeded order,
so the k=1 case lies inside the k=2 cases, which lie inside the k=5 cases, for a given seed), then
evaluated on the whole test split by sliding-window inference (``trainer.test``): mean Dice and HD95 (mm)
over the test cases, per class, as the task logs them (``test/dice_<class>``, ``test/hd95_mm_<class>``).

Equal compute budget per run: every run trains ``--epochs`` x ``--steps-per-epoch`` optimiser steps of
``--batch-size`` patches, whatever k is. A run over k cases draws ``samples_per_volume = ceil(P / k)``
patches per case per epoch (P = steps-per-epoch x batch-size, the patches of one epoch) and the trainer
stops each epoch after ``--steps-per-epoch`` batches, so one labelled case is seen P times per epoch and
six are seen about P/6 times each: differences between rows come from the labels, not from more training.
The default ``--steps-per-epoch`` is what one epoch over all training cases gives at the DataModule's
default two patches per case: ceil(2 x n_train / batch-size). No validation runs during training
(``check_val_every_n_epoch`` > epochs); the last epoch's weights are tested.

Per run: ``lightning.seed_everything(seed)``; the seed also picks the nested case subset, the patches
and the decoder's (and the scratch encoder's) initial weights, so scratch and pretrained at the same
(k, seed) see the same cases and patches and start from the same decoder: only the encoder's starting
weights differ. Several seeds give several subsets and a spread (mean +- sample sd over seeds).

Output: a progress line per run, a table (rows k; scratch Dice, pretrained Dice, pretrained - scratch,
HD95 of both), the number of test cases, notes on what the numbers can and cannot say,
``--out/label_efficiency.png`` (Dice vs labelled cases, log x) and ``--out/label_efficiency.json``
(and ``--json``). Without ``--pretrained`` only the scratch runs are made (and the output says so).

    volfm bench label-efficiency --store STORE --pretrained CKPT [--counts 1,2,5,all] [--labels spleen]
        [--encoder resnet18_3d --encoder-kwargs '{"in_chans": 1, "base_channels": 16}'] [--finetune full]
        [--epochs 30] [--steps-per-epoch N] [--patch 32,32,32] [--batch-size 8] [--lr 3e-3] [--seeds 0]
        [--workers 0] [--out DIR] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import lightning
import lightning.pytorch as pl
import matplotlib
import matplotlib.pyplot as plt
import torch

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
from volfm.data.datamodules import SegmentationDataModule
from volfm.data.dataset import StoreDataset
from volfm.models import create_encoder, load_encoder_weights
from volfm.models.registry import META_KWARGS, META_NAME
from volfm.models.weights import read_encoder_metadata
from volfm.store.arrays import array_file
from volfm.targets.labelmap import LabelMap, load_source_labels
from volfm.tasks import DecoderConfig, EncoderConfig, FinetuneConfig, OptimConfig, SegmentationTask

PROG = "volfm bench label-efficiency"
INITS = ("scratch", "pretrained")
DEFAULT_ENCODER = "resnet18_3d"
DEFAULT_ENCODER_KWARGS = {"in_chans": 1, "base_channels": 16}
DEFAULT_SPV = 2  # StoreDataModule's samples_per_volume default: sets the default --steps-per-epoch
HD = "hd95_mm"


# --- arguments -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="segmentation Dice vs number of labelled training cases, "
                                "random init vs a pretrained encoder, at an equal compute budget per run")
    p.add_argument("--store", required=True, help="a volfm store with labels and train/test splits")
    p.add_argument("--pretrained", help="encoder weights: any volfm checkpoint (.ckpt or encoder .safetensors); "
                   "without it only the scratch runs are made")
    p.add_argument("--counts", type=counts_arg, default=[1, 2, 5, "all"],
                   help="labelled training cases per run, 'all' = the whole training split (default 1,2,5,all)")
    p.add_argument("--labels", type=names_arg, default=["spleen"], help="organ name(s) to segment (default spleen)")
    p.add_argument("--encoder", help=f"encoder name (default: the one the checkpoint records, else {DEFAULT_ENCODER})")
    p.add_argument("--encoder-kwargs", type=json_dict_arg,
                   help=f"encoder kwargs as JSON (default: the checkpoint's, "
                        f"else {json.dumps(DEFAULT_ENCODER_KWARGS)})")
    p.add_argument("--finetune", choices=["full", "frozen", "partial", "lora"], default="full",
                   help="fine-tuning mode, the same for both inits (default full)")
    p.add_argument("--encoder-lr-scale", type=float, default=0.1,
                   help="encoder lr = lr x this in full/partial mode, for both inits (default 0.1, the task's)")
    p.add_argument("--recompute-bn-batches", type=int, default=0,
                   help="frozen/partial/lora: re-estimate the frozen BatchNorm statistics on this many training "
                        "batches first (default 0: keep the pretraining statistics; a random encoder needs this)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs per run (default 30)")
    p.add_argument("--steps-per-epoch", type=int,
                   help="optimiser steps per epoch, the same for every k (default ceil(2 x n_train / batch-size))")
    p.add_argument("--patch", type=ints_arg, default=[32, 32, 32], help="training patch / sliding window (32,32,32)")
    p.add_argument("--batch-size", type=int, default=8, help="patches per step (default 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    p.add_argument("--seeds", type=seeds_arg, default=[0], help="seeds, e.g. 0,1,2 (default 0)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 helps on a busy shared CPU)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu (default auto)")
    p.add_argument("--precision", default="32-true", help="Lightning precision (default 32-true)")
    p.add_argument("--out", default="label_efficiency",
                   help="folder for the PNG and JSON (default ./label_efficiency)")
    p.add_argument("--json", help="also write the results as JSON here")
    return p


# --- set-up checks (before any training) -----------------------------------------------------------

def checkpoint_encoder(path) -> tuple[str, dict] | None:
    """(name, kwargs) of the encoder a volfm checkpoint records, or None when it records none."""
    path = Path(path)
    if not path.is_file():
        raise VolfmError(f"--pretrained {path} does not exist; give a volfm .ckpt or an encoder .safetensors file")
    if path.suffix == ".safetensors":
        meta = read_encoder_metadata(path)
        if META_NAME in meta:
            return meta[META_NAME], json.loads(meta.get(META_KWARGS, "{}"))
        return None

    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - load_encoder_weights reports an unreadable file clearly
        return None
    enc = ((ckpt.get("volfm") or {}).get("encoder") if isinstance(ckpt, dict) else None) or {}
    if isinstance(enc, dict) and enc.get("name"):
        return enc["name"], dict(enc.get("kwargs") or {})
    return None


def _labelled(ds, split: str) -> None:
    """Every case of ``ds`` has a label array (StoreError naming the first one that does not)."""
    have = [array_file(ds.root / "cases" / cid, ds.label) is not None for cid in ds.case_ids]
    if not any(have):
        raise VolfmError(f"{ds.root}: no case of split '{split}' has a '{ds.label}' array (a store built without "
                         "labels?); label efficiency needs labelled training and test cases: preprocess a cohort "
                         "table with a label column")
    for cid in ds.case_ids:
        ds.array(cid, ds.label)


def preflight(args) -> dict:
    """Everything that can fail before training: store, splits, labels, label map, counts, checkpoint."""
    store = Path(args.store)
    if not (store / "manifest.csv").is_file():
        raise VolfmError(f"--store {store} is not a volfm store (no manifest.csv); build one with volfm preprocess")
    train = StoreDataset(str(store), split="train", arrays=("image",), label="label")
    test = StoreDataset(str(store), split="test", arrays=("image",), label="label")
    _labelled(train, "train")
    _labelled(test, "test")
    labelmap = LabelMap.from_names(list(args.labels), load_source_labels(str(store)))
    n_train = len(train)
    ks, seen = [], set()
    for c in args.counts:
        k = n_train if c == "all" else int(c)
        if k > n_train:
            raise VolfmError(f"--counts {k}: {store} has only {n_train} ok labelled cases in split 'train'; "
                             f"use counts up to {n_train} (or 'all')")
        if k not in seen:
            seen.add(k)
            ks.append(k)
    ks.sort()

    recorded = checkpoint_encoder(args.pretrained) if args.pretrained else None
    if args.encoder is None and args.encoder_kwargs is None and recorded is not None:
        enc_name, enc_kwargs, enc_from = recorded[0], recorded[1], "recorded in the checkpoint"
    else:
        enc_name = args.encoder or DEFAULT_ENCODER
        enc_kwargs = args.encoder_kwargs if args.encoder_kwargs is not None else (
            dict(DEFAULT_ENCODER_KWARGS) if enc_name == DEFAULT_ENCODER else {})
        enc_from = "given" if (args.encoder or args.encoder_kwargs is not None) else "default"
    enc = create_encoder(enc_name, **enc_kwargs)
    if args.pretrained:  # a checkpoint of another encoder fails here, listing the mismatched keys
        load_encoder_weights(enc, args.pretrained)
    steps = args.steps_per_epoch or max(1, math.ceil(DEFAULT_SPV * n_train / args.batch_size))
    return {"n_train": n_train, "train_ids": train.case_ids, "test_ids": test.case_ids, "ks": ks,
            "classes": [c for c in labelmap.class_names if c != "background"], "encoder": enc_name,
            "encoder_kwargs": enc_kwargs, "encoder_from": enc_from, "steps_per_epoch": steps,
            "patches_per_epoch": steps * args.batch_size,
            "all_k": n_train if "all" in args.counts else None}


# --- one run ---------------------------------------------------------------------------------------

def _finite(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def finetune_and_test(store, *, encoder: str, encoder_kwargs: dict, labels, k: int, seed: int, epochs: int,
                      steps_per_epoch: int, batch_size: int, patch, lr: float, pretrained: str | None = None,
                      decoder_pretrained: str | None = None, decoder_kwargs: dict | None = None,
                      finetune: str = "full", encoder_lr_scale: float = 0.1,
                      warmup_fraction: float = 0.0, recompute_bn_batches: int = 0,
                      foreground_fraction: float = 1 / 3, workers: int = 0,
                      loss: dict | None = None,
                      accelerator: str = "auto",
                      precision: str = "32-true", out=".") -> dict:
    """One few-label segmentation run (the unit of this benchmark and of ``volfm bench pretraining``): seed, fine-tune
    a :class:`SegmentationTask` on the first ``k`` training cases for ``epochs`` x ``steps_per_epoch`` steps of
    ``batch_size`` patches (``samples_per_volume = ceil(steps_per_epoch x batch_size / k)``), test the last weights
    on the whole test split; returns the numbers (mean/per-class Dice and HD95, per case, timings).
    ``recompute_bn_batches``: see :class:`FinetuneConfig` (frozen mode only here). ``loss``: the
    task's loss group (default: :class:`SegmentationLossConfig`'s, nnU-Net's batch Dice without background)."""
    spv = math.ceil(steps_per_epoch * batch_size / k)
    classes = None
    t0 = time.perf_counter()
    with quiet_lightning():
        lightning.seed_everything(seed, verbose=False)
        task = SegmentationTask(
            encoder=EncoderConfig(encoder, dict(encoder_kwargs), pretrained),
            decoder=DecoderConfig(kwargs=dict(decoder_kwargs or {}), pretrained=decoder_pretrained),
            labels=list(labels), finetune=FinetuneConfig(mode=finetune, encoder_lr_scale=encoder_lr_scale,
                                                                recompute_bn_batches=recompute_bn_batches),
            optim=OptimConfig(lr=lr, weight_decay=1e-5, warmup_fraction=warmup_fraction), patch_size=tuple(patch),
            seed=seed, loss=loss)
        # val_split = test split: validation never runs here (check_val_every_n_epoch > epochs), so this
        # only spares stores without a 'val' split from an error; nothing is selected or tuned on it
        dm = SegmentationDataModule(str(store), patch_size=tuple(patch), num_train_cases=k,
                                    samples_per_volume=spv, batch_size=batch_size, val_batch_size=1,
                                    foreground_fraction=foreground_fraction, num_workers=workers,
                                    persistent_workers=workers > 0, seed=seed,
                                    val_split="test")
        trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision,
                             max_epochs=epochs, limit_train_batches=steps_per_epoch,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0,
                             check_val_every_n_epoch=epochs + 1, limit_val_batches=0,
                             use_distributed_sampler=False, default_root_dir=str(out))
        trainer.fit(task, datamodule=dm)
        fit_s = time.perf_counter() - t0
        loss = trainer.callback_metrics.get("train_loss")
        train_ids = dm.train_dataset().case_ids
        steps = int(trainer.global_step)
        trainer.test(task, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - t0
    m = task.last_metrics
    classes = [c for c in task.class_names if c != "background"]
    per_case = []
    for c in task.last_case_metrics:
        per_case.append({"case_id": c.get("case_id"),
                         "dice": {n: _finite(c["classes"][n]["dice"]) for n in classes},
                         HD: {n: _finite(c["classes"][n][HD]) for n in classes},
                         "status": {n: c["classes"][n]["status"] for n in classes}})
    return {"k": k, "seed": seed, "finetune": finetune,
            "train_case_ids": list(train_ids), "samples_per_volume": spv,
            "patches_per_epoch": steps_per_epoch * batch_size, "train_steps": steps,
            "train_patches": steps * batch_size, "warmup_fraction": warmup_fraction,
            "recompute_bn_batches": recompute_bn_batches,
            "pretrained_loaded": task.pretrained_loaded, "decoder_loaded": task.pretrained_decoder_loaded,
            "final_train_loss": _finite(loss.item()) if loss is not None else None,
            "test_mean_dice": _finite(m.get("test/mean_dice")), f"test_mean_{HD}": _finite(m.get(f"test/mean_{HD}")),
            "dice": {n: _finite(m.get(f"test/dice_{n}")) for n in classes},
            HD: {n: _finite(m.get(f"test/{HD}_{n}")) for n in classes},
            "missed": {n: sum(pc["status"][n] == "pred_empty" for pc in per_case) for n in classes},
            "per_case": per_case, "fit_s": round(fit_s, 3), "seconds": round(seconds, 3)}


def run_one(args, plan: dict, k: int, init: str, seed: int) -> dict:
    r = finetune_and_test(args.store, encoder=plan["encoder"], encoder_kwargs=plan["encoder_kwargs"],
                          labels=args.labels, k=k, seed=seed, epochs=args.epochs,
                          steps_per_epoch=plan["steps_per_epoch"], batch_size=args.batch_size, patch=args.patch,
                          lr=args.lr, pretrained=args.pretrained if init == "pretrained" else None,
                          finetune=args.finetune, encoder_lr_scale=args.encoder_lr_scale,
                          recompute_bn_batches=args.recompute_bn_batches, workers=args.workers,
                          accelerator=args.accelerator, precision=args.precision, out=args.out)
    r.pop("finetune")
    r.pop("decoder_loaded")
    return {"k": k, "count": "all" if k == plan["all_k"] else k, "init": init, **{k_: v for k_, v in r.items()
                                                                                 if k_ != "k"}}


# --- summary, table, plot --------------------------------------------------------------------------

def summarise(runs: list[dict], ks: list[int], inits, classes) -> list[dict]:
    rows = []
    for k in ks:
        row = {"k": k, "count": next(r["count"] for r in runs if r["k"] == k)}
        for init in inits:
            rs = [r for r in runs if r["k"] == k and r["init"] == init]
            row[init] = {"dice": mean_sd(r["test_mean_dice"] for r in rs), HD: mean_sd(r[f"test_mean_{HD}"] for r in rs),
                         "dice_per_class": {n: mean_sd(r["dice"][n] for r in rs) for n in classes},
                         "missed": sum(sum(r["missed"].values()) for r in rs), "seeds": [r["seed"] for r in rs]}
        if "pretrained" in inits:  # paired by seed: same cases, same patches, same decoder start
            by_seed = {r["seed"]: r for r in runs if r["k"] == k and r["init"] == "scratch"}
            diffs = [r["test_mean_dice"] - by_seed[r["seed"]]["test_mean_dice"]
                     for r in runs if r["k"] == k and r["init"] == "pretrained"
                     and r["test_mean_dice"] is not None and by_seed[r["seed"]]["test_mean_dice"] is not None]
            row["diff_dice"] = mean_sd(diffs)
        rows.append(row)
    return rows


def _fmt(s: dict, spec=".3f", signed=False) -> str:
    if s is None or s["mean"] is None:
        return "n/a"
    digits = int(spec.strip(".f"))
    m = f"{round(s['mean'], digits) + 0.0:{'+' if signed else ''}{spec}}"  # + 0.0: no "-0.000"
    return m + (f" ± {s['sd']:{spec}}" if s.get("sd") is not None else "")


def format_table(rows: list[dict], inits, classes) -> str:
    cols = [("k", 9)]
    for init in inits:
        cols.append((f"{init} Dice", 15))
    if "pretrained" in inits:
        cols.append(("diff (p - s)", 15))
    for init in inits:
        cols.append((f"{init} HD95 mm", 19))
    lines = ["  ".join(f"{name:>{w}}" for name, w in cols)]
    for r in rows:
        cells = [f"{r['k']}" + (" (all)" if r["count"] == "all" else "")]
        cells += [_fmt(r[init]["dice"]) for init in inits]
        if "pretrained" in inits:
            cells.append(_fmt(r["diff_dice"], signed=True))
        for init in inits:
            h = _fmt(r[init][HD], ".1f")
            if r[init]["missed"]:
                h += f" [{r[init]['missed']} miss]"
            cells.append(h)
        lines.append("  ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, cols)))
    if len(classes) > 1:
        lines.append("")
        lines.append("per-class Dice: " + "  ".join(f"{n} ({'/'.join(i[0] for i in inits)})" for n in classes))
        for r in rows:
            parts = ["/".join(_fmt(r[i]["dice_per_class"][n]) for i in inits) for n in classes]
            lines.append(f"{r['k']:>9}  " + "  ".join(parts))
    return "\n".join(lines)


def plot(path: Path, runs: list[dict], rows: list[dict], inits, title: str) -> Path:
    matplotlib.use("Agg")

    colors = {"scratch": "tab:gray", "pretrained": "tab:blue"}
    markers = {"scratch": "s", "pretrained": "o"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    ks = [r["k"] for r in rows]
    several = len({r["seed"] for r in runs}) > 1
    for init in inits:
        xs = [r["k"] for r in rows if r[init]["dice"]["mean"] is not None]
        ys = [r[init]["dice"]["mean"] for r in rows if r[init]["dice"]["mean"] is not None]
        ax.plot(xs, ys, marker=markers[init], color=colors[init], lw=2, ms=7,
                label=f"{init}" + (" (mean over seeds)" if several else ""))
        if several:
            px = [r["k"] for r in runs if r["init"] == init and r["test_mean_dice"] is not None]
            py = [r["test_mean_dice"] for r in runs if r["init"] == init and r["test_mean_dice"] is not None]
            ax.scatter(px, py, marker=markers[init], facecolors="none", edgecolors=colors[init], s=28, alpha=0.7,
                       label=f"{init}, per seed")
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()
    ax.set_ylim(0, 1)
    ax.set_xlabel("labelled training cases (log scale)")
    ax.set_ylabel("test mean Dice")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _notes(args, plan: dict, rows: list[dict], inits, n_test: int) -> list[str]:
    notes = [f"each number is the mean over {n_test} test case(s) of split 'test'"
             + (": with so few test cases a difference of a few Dice points is within case-to-case noise"
                if n_test < 10 else "")]
    n_seeds = len(args.seeds)
    if n_seeds == 1:
        notes.append("one seed (one case subset per k, one training run per cell): no run-to-run spread is shown; "
                     "--seeds 0,1,2 gives mean ± sd over seeds")
    else:
        notes.append(f"± = sample sd over {n_seeds} seeds (each seed: its own nested case subset and patches)")
    notes.append(f"equal compute per run: {args.epochs} epochs x {plan['steps_per_epoch']} steps x {args.batch_size} "
                 f"patches = {args.epochs * plan['patches_per_epoch']} training patches, whatever k "
                 f"(samples_per_volume = ceil({plan['patches_per_epoch']} / k))")
    notes.append(f"both inits use the same hyperparameters (finetune {args.finetune}, lr {args.lr:g}, encoder lr "
                 f"x{args.encoder_lr_scale:g}); no validation-based model selection: the last epoch is tested")
    if any(r[i]["missed"] for r in rows for i in inits):
        notes.append("[N miss]: the class was in the test case but nothing was predicted, N times: Dice 0, "
                     "no HD95 (the HD95 shown is over the cases where it was predicted)")
    if "pretrained" in inits:
        diffs = [(r["k"], r["diff_dice"]["mean"]) for r in rows if r["diff_dice"]["mean"] is not None]
        ahead, behind = sum(d >= 0.0005 for _, d in diffs), sum(d <= -0.0005 for _, d in diffs)
        shown = ", ".join(f"k={k} {round(d, 3) + 0.0:+.3f}" for k, d in diffs) or "n/a"
        notes.append(f"pretrained - scratch mean Dice: {shown} (pretrained ahead at {ahead}, behind at {behind} "
                     f"of {len(diffs)} counts)")
    else:
        notes.append("no --pretrained checkpoint: scratch runs only, nothing to compare against")
    return notes


# --- main ------------------------------------------------------------------------------------------

def _check_args(args) -> None:
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise VolfmError(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        raise VolfmError("--steps-per-epoch must be >= 1")
    if args.workers < 0 or args.lr <= 0:
        raise VolfmError("need --workers >= 0 and --lr > 0")
    if args.recompute_bn_batches < 0 or (args.recompute_bn_batches and args.finetune == "full"):
        raise VolfmError("--recompute-bn-batches must be >= 0 and needs --finetune frozen, partial or lora (full "
                         "fine-tuning re-learns the statistics anyway)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise VolfmError("--threads must be >= 1")
            torch.set_num_threads(args.threads)
        return _run(args)
    except VolfmError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # main() may run inside a longer process (tests, notebooks)


def _run(args) -> int:
    _check_args(args)
    plan = preflight(args)
    inits = INITS if args.pretrained else ("scratch",)
    ks, classes, n_test = plan["ks"], plan["classes"], len(plan["test_ids"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print(f"{PROG}: store {args.store}: {plan['n_train']} labelled training cases, {n_test} test case(s); "
          f"classes {', '.join(classes)}")
    print(f"encoder {plan['encoder']} {json.dumps(plan['encoder_kwargs'], sort_keys=True)} ({plan['encoder_from']}); "
          + (f"pretrained weights: {args.pretrained}" if args.pretrained else
             "no --pretrained given: scratch (random init) runs only, no comparison"))
    print(f"counts {', '.join(map(str, ks))}; inits {', '.join(inits)}; seeds {', '.join(map(str, args.seeds))}; "
          f"finetune {args.finetune}, patch {'x'.join(map(str, args.patch))}, batch {args.batch_size}, "
          f"lr {args.lr:g}, {args.epochs} epoch(s) x {plan['steps_per_epoch']} steps per run (equal for every k); "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    total = len(ks) * len(inits) * len(args.seeds)
    runs, i, t_all = [], 0, time.perf_counter()
    for seed in args.seeds:
        for k in ks:
            for init in inits:
                i += 1
                tag = f"[{i}/{total}] k={k:<3} {init:<10} seed {seed}"
                print(f"{tag} training ({math.ceil(plan['patches_per_epoch'] / k)} patches/case/epoch) ...", flush=True)
                r = run_one(args, plan, k, init, seed)
                runs.append(r)
                dice = "n/a" if r["test_mean_dice"] is None else f"{r['test_mean_dice']:.3f}"
                hd = "n/a" if r[f"test_mean_{HD}"] is None else f"{r[f'test_mean_{HD}']:.1f} mm"
                print(f"{tag} done in {r['seconds']:.1f} s (train {r['fit_s']:.1f} s): test Dice {dice}, HD95 {hd}",
                      flush=True)
    total_s = time.perf_counter() - t_all
    rows = summarise(runs, ks, inits, classes)
    notes = _notes(args, plan, rows, inits, n_test)
    print()
    print(f"test mean Dice / HD95 ({', '.join(classes)}); test cases: {n_test}")
    print(format_table(rows, inits, classes))
    print()
    for n in notes:
        print(f"note: {n}")
    title = (f"{', '.join(classes)} on {Path(args.store).name}: {n_test} test case(s), "
             f"{len(args.seeds)} seed(s), {args.epochs} ep x {plan['steps_per_epoch']} steps per run")
    png = plot(out / "label_efficiency.png", runs, rows, inits, title)
    print(f"plot: {png}")
    doc = {"benchmark": "label-efficiency", "store": str(args.store), "pretrained": args.pretrained,
           "scratch_only": not args.pretrained, "inits": list(inits), "labels": list(args.labels),
           "classes": classes, "encoder": plan["encoder"], "encoder_kwargs": plan["encoder_kwargs"],
           "finetune": args.finetune, "encoder_lr_scale": args.encoder_lr_scale, "lr": args.lr,
           "epochs": args.epochs, "steps_per_epoch": plan["steps_per_epoch"], "batch_size": args.batch_size,
           "patches_per_epoch": plan["patches_per_epoch"], "patch": list(args.patch), "seeds": list(args.seeds),
           "counts": ks, "n_train_available": plan["n_train"], "n_test_cases": n_test,
           "test_case_ids": plan["test_ids"], "accelerator": args.accelerator, "precision": args.precision,
           "torch_threads": torch.get_num_threads(), "total_seconds": round(total_s, 3),
           "runs": runs, "summary": rows, "notes": notes, "plot": str(png)}
    write_results(out / "label_efficiency.json", doc)
    if args.json:
        write_results(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
