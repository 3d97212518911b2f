"""`volfm demo`: the whole pipeline end to end on embedded synthetic cohorts, on CPU.

The steps (each prints what it did and where its output is):

 1. synthesise a CT cohort (organ labels, findings with ICD-10-CM codes, sectioned reports);
 2. preprocess it with Merlin's spec (``ct_merlin``) into a store with QC pictures;
 3. draw training patches from the store (nnU-Net-style foreground oversampling) and picture a batch;
 4. run every registered encoder on a preprocessed volume (shapes, parameters);
 5. synthesise a paired brain MRI/PET cohort;
 6. preprocess it with ``mri_brain`` (z-scored MRI, PET on the same grid);
 7. synthesise and preprocess a larger CT cohort for pretraining (``ct_merlin_demo``, 48^3);
 8. ICD-code pretext training (``recipes/demo/icd_pretrain.yaml``);
 9. CT-report contrastive training staged from the ICD encoder (``recipes/demo/report_contrastive.yaml``);
10. ``volfm evaluate`` of the contrastive checkpoint (linear probe, retrieval, zero-shot findings, subgroups);
11. self-supervised masked-volume pretraining (``recipes/demo/masked_volume.yaml``), the best pretrained start for
    few-label segmentation in ``volfm bench pretraining`` (it ties random initialisation there; none beats it);
12. segmentation of an organ from 5 labelled cases, from scratch and from the masked-volume encoder, Dice side by
    side, then ``volfm export`` of the pretrained model to a package and ``volfm predict --model`` on raw test
    images in their own grids (no store needed);
13. MRI -> PET synthesis (``recipes/demo/synth_mri2pet.yaml``) and its evaluation against baselines.

``--pretrain-cases 0`` skips steps 7-12, ``--synthesis-cases 0`` skips step 13.
"""
from __future__ import annotations

import collections
import csv
import logging
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from volfm.cli.inspect import inspect_store
from volfm.cli.lightning import run_lightning
from volfm.cli.predict import predict_files
from volfm.configs import RECIPES_DIR
from volfm.data.datamodules import collate_cases
from volfm.data.dataset import StoreDataset
from volfm.data.samplers import LabelWeightedPatchSampler, PatchDataset
from volfm.evaluate import evaluate
from volfm.models import create_encoder, list_encoders
from volfm.preprocess.qc import render_patch_batch_png
from volfm.preprocess.spec import load_spec
from volfm.store.build import print_summary, run_cohort
from volfm.store.cohort import read_table
from volfm.synth.ct import FINDINGS, LABEL_IDS, make_ct_cohort
from volfm.synth.mripet import make_mripet_cohort
from volfm.tasks.package import export_checkpoint

# the smallest and the largest of each family (Merlin's ResNet-152, ViT-Base): what a user picks between
DEMO_ENCODERS = ("resnet18_3d", "resnet152_3d", "vit_tiny_3d", "vit_base_3d")


_START = [time.perf_counter()]  # when the demo started: each step header shows the time since


def _step(title: str):
    m, sec = divmod(int(time.perf_counter() - _START[0]), 60)
    print(f"\n== [{m}:{sec:02d}] {title} ==", flush=True)


def run_demo(out="volfm_demo", cases: int = 8, workers: int = 2, encoders=None, pretrain_cases: int = 240,
             pretrain_epochs: int = 10, synthesis_cases: int = 24, synthesis_epochs: int = 14,
             segment_epochs: int = 30) -> int:
    out = Path(out)
    t0 = _START[0] = time.perf_counter()
    _quiet_lightning()
    _step(f"1. synthetic CT cohort ({cases} cases) -> {out / 'synth_ct'}")
    ct_table = make_ct_cohort(out / "synth_ct", cases, seed=0)
    print(f"cohort table: {ct_table}")
    _describe_ct_cohort(ct_table)

    _step("2. preprocess with preprocessing/ct_merlin.yaml (RAS, 1.5x1.5x3 mm, HU [-1000,1000]->[0,1], 224x224x160)")
    ct_store = out / "store_ct_merlin"
    s1 = run_cohort("ct_merlin", ct_store, cohort=ct_table, workers=workers)
    print_summary(s1)
    print(inspect_store(ct_store))

    _step("3. training patches from the store: 96^3, nnU-Net style foreground oversampling (1/3), memory-mapped")
    _show_patches(ct_store, out / "patches_ct.png", workers=workers)

    _step("4. encoders from the registry on a preprocessed demo volume (Merlin input 1 x 224 x 224 x 160)")
    _show_encoders(ct_store, encoders)

    n_mr = max(2, cases // 2)
    _step(f"5. simulated paired brain MRI/PET cohort ({n_mr} cases) -> {out / 'synth_mripet'}")
    mp_table = make_mripet_cohort(out / "synth_mripet", n_mr, seed=0, spacing=2.0)
    print(f"cohort table: {mp_table}")
    spec = load_spec("mri_brain")
    spec["spacing"] = [2.0, 2.0, 2.0]  # the demo keeps the 2 mm grid; the shipped spec resamples to 1 mm
    mp_store = out / "store_mri_brain"
    _step("6. preprocess with mri_brain.yaml at 2 mm (z-scored MRI, PET carried along on the same grid)")
    spec_path = out / "mri_brain_2mm.yaml"

    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    s2 = run_cohort(spec_path, mp_store, cohort=mp_table, workers=workers)
    print_summary(s2)

    pre = None
    if pretrain_cases:
        pre = _pretrain(out, pretrain_cases, pretrain_epochs, workers, segment_epochs)
    syn = None
    if synthesis_cases:
        syn = _synthesis(out, synthesis_cases, synthesis_epochs, workers)

    _step(f"done in {time.perf_counter() - t0:.0f} s")
    qc = sorted((ct_store / "qc").glob("*.png"))
    print(f"CT store:       {ct_store}\n  manifest:     {ct_store / 'manifest.csv'}\n  QC images:    {ct_store / 'qc'}"
          f"{'  (e.g. ' + str(qc[0]) + ')' if qc else ''}\n  QC gallery:   {ct_store / 'qc' / 'index.html'}")
    print(f"MRI/PET store:  {mp_store}\n  manifest:     {mp_store / 'manifest.csv'}\n  QC images:    {mp_store / 'qc'}"
          f"\n  QC gallery:   {mp_store / 'qc' / 'index.html'}")
    print(f"Training patches: {out / 'patches_ct.png'}")
    if pre:
        print(f"Pretraining:    ICD run {pre['icd_dir']}\n  contrastive:  {pre['clip_dir']}\n  masked volume: "
              f"{pre['masked_dir']}\n  evaluation:   {pre['eval_dir']} (eval.json, eval.png)\n"
              f"Segmentation:   {pre['seg_dir']} (scratch: {pre['seg_scratch_dir']})")
    if syn:
        print(f"Synthesis:      run {syn['run_dir']}\n  evaluation:   {syn['eval_dir']} (synthesis_eval.json, .png)")
    print("Next: volfm inspect " + str(ct_store) + "   |   volfm bench preprocess | loader | sliding-window | patch-embed")
    return 0 if not (s1["failed"] or s2["failed"]) else 1


def _fit(recipe: str, store, run_dir, *overrides) -> Path:
    """``volfm fit --config recipes/demo/<recipe>`` into ``run_dir``; returns the run's log folder."""
    recipe_path = RECIPES_DIR / "demo" / recipe
    run_dir = Path(run_dir)
    run_lightning(["fit", "--config", str(recipe_path), "--data.init_args.store", str(store),
                   "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
                   "--trainer.enable_progress_bar", "false", *overrides])
    return max(run_dir.glob("csv/version_*"), key=lambda p: p.stat().st_mtime)


def _val_history(log_dir: Path, key: str) -> list[float]:
    with open(log_dir / "metrics.csv", newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


def _pretrain(out: Path, n_cases: int, epochs: int, workers: int, segment_epochs: int = 30) -> dict:
    """Merlin-style pretraining on a larger synthetic cohort at demo resolution: ICD pretext, report contrastive
    learning staged from it (metrics on the test split), self-supervised masked-volume pretraining, then few-label
    segmentation from scratch and from the pretrained encoder + decoder, side by side."""
    _step(f"7. Merlin-style pretraining cohort: {n_cases} synthetic CT cases, preprocessed with ct_merlin_demo "
          "(the Merlin field of view at 7 x 7 x 10 mm, 48^3)")
    table = make_ct_cohort(out / "synth_ct_pretrain", n_cases, seed=1, shape=(64, 64, 40), workers=max(1, workers))
    store = out / "store_ct_merlin_demo"
    summary = run_cohort("ct_merlin_demo", store, cohort=table, workers=workers, qc=False)
    print_summary(summary)
    common = ["--trainer.max_epochs", str(epochs), "--data.init_args.num_workers", str(workers)]

    _step(f"8. ICD-code pretext (recipes/demo/icd_pretrain.yaml, {epochs} epochs, quarter-width ResNet-18 I3D; the "
          "random-label control of the README: --model.init_args.icd.random_labels true)")
    t = time.perf_counter()
    icd_dir = _fit("icd_pretrain.yaml", store, out / "runs" / "icd", *common)
    icd = _val_history(icd_dir, "val/icd_macro_auroc")
    print(f"ICD macro AUROC on the validation split, per epoch: {' '.join(f'{v:.2f}' for v in icd)} "
          f"({time.perf_counter() - t:.0f} s)")

    _step(f"9. CT-report contrastive learning, staged from the ICD encoder (recipes/demo/report_contrastive.yaml, "
          f"{max(1, (2 * epochs) // 3)} epochs)")
    t = time.perf_counter()
    short = ["--trainer.max_epochs", str(max(1, (2 * epochs) // 3)), "--data.init_args.num_workers", str(workers)]
    clip_dir = _fit("report_contrastive.yaml", store, out / "runs" / "contrastive", *short,
                    "--model.init_args.encoder.pretrained", str(icd_dir / "encoder.safetensors"))
    zs = _val_history(clip_dir, "val/zeroshot_macro_auroc")
    print(f"zero-shot findings macro AUROC on the validation split, per epoch: {' '.join(f'{v:.2f}' for v in zs)} "
          f"({time.perf_counter() - t:.0f} s)")

    _step("10. evaluation on the test split (volfm evaluate): ICD head, linear probe, retrieval, zero-shot, subgroups")
    eval_dir = out / "eval_pretrain"
    evaluate(clip_dir / "checkpoints" / "last.ckpt", store=store, out=eval_dir, subgroups=["sex"],
             num_workers=workers, progress=False)

    _step(f"11. self-supervised masked-volume pretraining (recipes/demo/masked_volume.yaml, {max(1, epochs // 3)} epochs): "
          "75 % of 4^3-voxel blocks of random 32^3 crops masked, reconstructed by the encoder + a U-Net decoder")
    t = time.perf_counter()
    third = ["--trainer.max_epochs", str(max(1, epochs // 3)), "--data.init_args.num_workers", str(workers)]
    masked_dir = _fit("masked_volume.yaml", store, out / "runs" / "masked", *third)
    rec = _val_history(masked_dir, "val/masked_loss")
    print(f"masked-voxel MSE on the validation split, per epoch: {' '.join(f'{v:.4f}' for v in rec)} "
          f"({time.perf_counter() - t:.0f} s)")
    seg = _segment(out, store, table, masked_dir, workers=workers, epochs=segment_epochs)
    return {"icd_dir": icd_dir, "clip_dir": clip_dir, "masked_dir": masked_dir, "eval_dir": eval_dir,
            "icd_auroc": icd, **seg}


def _segment(out: Path, store, table, pretrained_dir: Path, workers: int, organ: str = "spleen",
             epochs: int = 30) -> dict:
    """Few-label segmentation of an organ no pretraining saw a label of: scratch and pretrained (the masked-volume
    run's encoder, with a fresh decoder: the variant that did best in volfm bench pretraining), same seed, cases and
    patches; then volfm predict on raw test images."""
    _step(f"12. segmentation of {organ} from 5 labelled cases (recipes/demo/seg_finetune.yaml, {epochs} epochs): "
          "random init vs the masked-volume encoder, same cases, patches and seed")
    common = ["--trainer.max_epochs", str(epochs), "--data.init_args.num_workers", str(workers),
              "--model.init_args.labels", f"[{organ}]", "--trainer.check_val_every_n_epoch", str(epochs)]
    t = time.perf_counter()
    scratch_dir = _fit("seg_finetune.yaml", store, out / "runs" / "seg_scratch", *common)
    t_scratch = time.perf_counter() - t
    # encoder only: in volfm bench pretraining the carried decoder did worse than a fresh one (README); add
    # --model.init_args.decoder.pretrained <run>/decoder.safetensors to carry it
    seg_dir = _fit("seg_finetune.yaml", store, out / "runs" / "seg", *common,
                   "--model.init_args.encoder.pretrained", str(pretrained_dir / "encoder.safetensors"))
    d_scratch = _val_history(scratch_dir, f"val/dice_{organ}")[-1]
    d_pre = _val_history(seg_dir, f"val/dice_{organ}")[-1]
    print(f"validation Dice ({organ}, sliding window over whole volumes, 5 labelled cases):")
    print(f"  random init (scratch)              {d_scratch:.3f}")
    print(f"  masked-volume pretrained encoder   {d_pre:.3f}   ({d_pre - d_scratch:+.3f}; one seed -- "
          "volfm bench pretraining gives the spread over seeds)")
    print(f"  ({t_scratch:.0f} s per run)")

    rows = [r for r in csv.DictReader(open(table, newline="", encoding="utf-8")) if r["split"] == "test"][:3]
    raw = out / "raw_test_images"
    raw.mkdir(exist_ok=True)
    for r in rows:
        (raw / Path(r["image"]).name).write_bytes((Path(table).parent / r["image"]).read_bytes())
    package = export_checkpoint(seg_dir / "checkpoints" / "last.ckpt", out / "models" / f"{organ}_seg", overwrite=True)
    print(f"volfm export: the pretrained model as a self-contained package {package} (model.yaml with its "
          f"preprocessing spec and labels, model.safetensors, model card README.md)")
    print(f"volfm predict --model {package} on {len(rows)} raw test images (no store needed; their own grids: "
          "orientations/obliquity as acquired):")
    res = predict_files(package, raw, out / "predictions", progress=False)
    scores = []
    for r, o in zip(rows, res["outputs"]):
        pred = np.asarray(nib.load(o["output"]).dataobj) == 1
        truth = np.asarray(nib.load(str(Path(table).parent / r["label"])).dataobj) == LABEL_IDS[organ]
        d = 2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum())
        scores.append(float(d))
        print(f"  {Path(o['output']).name}: shape {tuple(o['shape'])}, Dice vs the source label {d:.2f}; QC {o['qc']}")
    return {"seg_dir": seg_dir, "seg_scratch_dir": scratch_dir, "seg_dice": scores, "package": package,
            "val_dice": {"scratch": d_scratch, "pretrained": d_pre}}


def _quiet_lightning() -> None:
    """The demo prints its own summary of each run: drop Lightning's start-up notices and its internal
    deprecation warnings (they are about Lightning's code, not the user's)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*number of training batches .* is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*Found \d+ module\(s\) in eval mode.*")


def _describe_ct_cohort(table) -> None:
    """Finding prevalence with ICD-10-CM codes, and one report, so the pretraining targets are visible."""
    rows = read_table(table)
    counts = collections.Counter(f for r in rows for f in r["findings"].split(";") if f)
    print("findings (ICD-10-CM): " + ", ".join(f"{name} {FINDINGS[name].code} x{counts[name]}"
                                               for name in FINDINGS if counts[name]))
    example = next((r for r in rows if r["findings"]), rows[0])
    print(f"example report ({example['case_id']}; codes {example['icd_codes']}):")
    for line in example["report"].splitlines():
        print("    " + line)


def _show_patches(store, png, workers: int = 2, n_batches: int = 8, batch_size: int = 4) -> None:
    """A QC picture of one batch and the loader's throughput (patches/s) with ``workers`` processes."""
    ds = PatchDataset(StoreDataset(store, label="label"), LabelWeightedPatchSampler((96, 96, 96)),
                      samples_per_volume=4, seed=0)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate_cases)
    t0, seen, first = time.perf_counter(), 0, None
    for i, batch in enumerate(loader):
        if first is None:
            first, t_first = batch, time.perf_counter()
        seen += len(batch["case_id"]) if i > 0 else 0
        if i >= n_batches:
            break
    rate = seen / max(time.perf_counter() - t_first, 1e-9)
    titles = [f"{c} @ {tuple(int(v) for v in s)}" for c, s in zip(first["case_id"], first["patch_start"])]
    render_patch_batch_png(png, first["image"].numpy(), first["label"].numpy(), titles)
    print(f"batch: image {tuple(first['image'].shape)}, label {tuple(first['label'].shape)}; QC picture: {png}")
    print(f"loader: {rate:.0f} patches/s with {workers} worker(s) after start-up "
          f"(first batch {t_first - t0:.1f} s); volfm bench loader compares TorchIO and MONAI")


def _show_encoders(store, names=None) -> None:
    """Build every registered encoder and run it on one stored Merlin volume: parameters and shapes."""
    case = StoreDataset(store, label=None, columns=())[0]
    x = torch.from_numpy(np.array(case["image"], dtype=np.float32))[None]
    print(f"input {case['case_id']}: {tuple(x.shape)}")
    torch.manual_seed(0)
    names = list(names or DEMO_ENCODERS)
    rest = [n for n in list_encoders() if n not in names]
    if rest:
        print(f"  (also registered, same interface: {', '.join(rest)})")
    for name in names:
        model = create_encoder(name, in_chans=1).eval()
        n = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        with torch.no_grad():
            feats = model.forward_features(x)
        print(f"  {name:<16} {n / 1e6:7.1f} M params  features {tuple(feats.shape)}  pooled ({x.shape[0]}, "
              f"{model.num_features})  ({time.perf_counter() - t0:.1f} s on CPU)")
        del model



def _synthesis(out: Path, n_cases: int, epochs: int, workers: int) -> dict:
    """MRI -> PET synthesis on the simulated cohort: train a tiny generator, then metrics on the test split next to
    the identity and mean-image baselines, clean and with degraded inputs."""
    _step(f"13. MRI -> PET synthesis: {n_cases} simulated MRI/PET cases, preprocessed with mri_pet_demo (4 mm, "
          f"48 x 56 x 48), recipes/demo/synth_mri2pet.yaml, {epochs} epochs")
    table = make_mripet_cohort(out / "synth_mripet_synthesis", n_cases, seed=3, spacing=2.0)
    store = out / "store_mri_pet_demo"
    summary = _preprocess_mripet(store, table, workers)
    print_summary(summary)
    run_dir = _fit("synth_mri2pet.yaml", store, out / "runs" / "synthesis", "--trainer.max_epochs", str(epochs),
                   "--data.init_args.num_workers", str(workers),
                   "--trainer.check_val_every_n_epoch", str(max(1, epochs // 2)))
    psnr = _val_history(run_dir, "val/psnr")
    print(f"validation PSNR per check: {' '.join(f'{v:.2f}' for v in psnr)}")
    eval_dir = out / "eval_synthesis"
    evaluate(run_dir / "checkpoints" / "last.ckpt", store=store, out=eval_dir, progress=False)
    return {"run_dir": run_dir, "eval_dir": eval_dir}


def _preprocess_mripet(store, table, workers: int) -> dict:
    """The synthesis cohort through the mri_pet_demo spec (QC pictures included)."""
    return run_cohort("mri_pet_demo", store, cohort=table, workers=workers, qc=True)
