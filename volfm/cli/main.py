"""`volfm` command line: synth, preprocess, scan, inspect, demo, evaluate, predict, export, convert, bench, and the
training subcommands fit / validate / test (LightningCLI over recipe YAMLs).

Errors a user can fix (VolfmError) print one line and exit 2; anything else is a bug and shows
its traceback.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from volfm import VolfmError, __version__
from volfm.utils import parse_triple_text

LIGHTNING_COMMANDS = ("fit", "validate", "test")  # handled by LightningCLI (volfm.cli.lightning)

# Each subcommand imports its own module when it runs (the PLC0415 exemptions below): measured on the
# 2-core dev machine, `import volfm.cli.inspect` takes 0.7 s, `volfm.store.build` 3.4 s, while the training
# stack (lightning, transformers, monai, peft: `import volfm.tasks`) takes 12 s, which `volfm inspect FILE` or
# `volfm --help` should not pay.
BENCHMARKS = {"preprocess": "volfm.bench.preprocess", "loader": "volfm.bench.loader",
              "sliding-window": "volfm.bench.sliding_window", "patch-embed": "volfm.bench.patch_embed",
              "label-efficiency": "volfm.bench.label_efficiency", "pretraining": "volfm.bench.pretraining",
              "gpu": "volfm.bench.gpu"}


def _cmd_synth(args) -> int:
    if args.kind == "ct":
        from volfm.synth.ct import make_ct_cohort  # noqa: PLC0415 - deferred, see BENCHMARKS

        shape = parse_triple_text(args.shape, "--shape", integer=True, at_least=8) if args.shape else (128, 128, 64)
        table = make_ct_cohort(args.out, args.cases, seed=args.seed, shape=shape, progress=not args.quiet)
    else:
        from volfm.synth.mripet import make_mripet_cohort  # noqa: PLC0415 - deferred, see BENCHMARKS

        table = make_mripet_cohort(args.out, args.cases, seed=args.seed, spacing=args.spacing or 2.0,
                                   progress=not args.quiet)
    print(f"wrote {args.cases} synthetic {args.kind} cases; cohort table: {table}")
    return 0


def _cmd_preprocess(args) -> int:
    from volfm.store.build import merge_shards, parse_shard, print_summary, run_cohort  # noqa: PLC0415 - deferred, see BENCHMARKS

    if args.convert_store:
        return _convert_store(args)
    if not args.out:
        raise VolfmError("volfm preprocess needs --out STORE (or --convert-store STORE to re-encode a store)")
    if args.merge:
        summary = merge_shards(args.out)
    else:
        if not args.spec:
            raise VolfmError("volfm preprocess needs --spec SPEC (a YAML file or built-in name such as ct_merlin)")
        summary = run_cohort(args.spec, args.out, cohort=args.cohort, input_dir=args.input_dir,
                             workers=args.workers, shard=parse_shard(args.shard), overwrite=args.overwrite,
                             progress=not args.quiet, qc=not args.no_qc, storage=args.storage)
    print_summary(summary)
    return 1 if summary["failed"] else 0


def _convert_store(args) -> int:
    from volfm.store.arrays import convert_store, storage_summary  # noqa: PLC0415 - deferred, see BENCHMARKS

    if not args.storage:
        raise VolfmError("--convert-store needs --storage, e.g. --storage codec=blosc2,dtype=compact")
    others = [f for f, v in (("--spec", args.spec), ("--cohort", args.cohort), ("--input-dir", args.input_dir),
                             ("--out", args.out), ("--merge", args.merge), ("--shard", args.shard),
                             ("--overwrite", args.overwrite)) if v]
    if others:
        raise VolfmError(f"--convert-store re-encodes an existing store and takes only --storage, --workers and "
                         f"--quiet; drop {', '.join(others)}")
    s = convert_store(args.convert_store, args.storage, workers=args.workers, progress=not args.quiet)
    before, after = s["bytes_before"], s["bytes_after"]
    ratio = f" ({after / before:.3g} of before)" if before else ""
    print(f"{s['converted']} converted, {s['skipped']} already {storage_summary(s['storage'])}, {s['failed']} failed "
          f"in {s['elapsed_s']:.1f} s; arrays {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB{ratio}")
    if s.get("recovered"):
        print(f"{s['recovered']} case(s) failed before are converted and ok again")
    if s.get("note"):
        print(s["note"])
    for cid, err in s["failures"]:
        print(f"FAILED {cid}: {err}")
    return 1 if s["failed"] else 0


def _cmd_scan(args) -> int:
    from volfm.io.dicomscan import SERIES_COLUMNS, scan_tree  # noqa: PLC0415 - deferred, see BENCHMARKS
    from volfm.store.cohort import write_table  # noqa: PLC0415 - deferred, see BENCHMARKS
    from volfm.store.selection import (  # noqa: PLC0415 - deferred, see BENCHMARKS
        COHORT_COLUMNS,
        cohort_rows,
        load_rules,
        load_series_table,
        select_series,
    )

    flags = {"per": args.per, "modality": _csv_list(args.modality), "orientation": _csv_list(args.orientation),
             "image_type": args.image_type, "max_slice_thickness": args.max_thickness, "min_slices": args.min_slices,
             "contrast": args.contrast, "prefer_kernels": _csv_list(args.prefer_kernels)}
    if args.from_series:
        given = [f for f, v in (("--out", args.out), ("--hash-uids", args.hash_uids), ("--dates", args.dates)) if v]
        if given:
            raise VolfmError(f"--from-series chooses again from a saved series table (its ids and dates as saved) and "
                             f"writes only --cohort; drop {', '.join(given)}")
        if not args.cohort:
            raise VolfmError("--from-series needs --cohort COHORT.csv to write the chosen series to")
    elif not args.out:
        raise VolfmError("volfm scan needs --out SERIES.csv (or --from-series SERIES.csv --cohort COHORT.csv to choose "
                         "again from a saved table)")
    rules = load_rules(args.rules, flags) if args.cohort else None  # bad rules fail before the (long) walk
    if rules is None and (args.rules or any(v is not None for v in flags.values())):
        raise VolfmError("selection rules (--rules, --per, --modality, ...) need --cohort COHORT.csv to write to")
    if args.from_series:
        if not Path(args.root).is_dir():
            raise VolfmError(f"{args.root}: not a folder; give the root the series table {args.from_series} was "
                             "scanned from (its folder column is relative to it)")
        rows, source = load_series_table(args.from_series), args.from_series
        print(f"{len(rows)} series ({sum(bool(r['usable']) for r in rows)} usable) read from {args.from_series}")
    else:
        rows, problems = scan_tree(args.root, hash_uids=args.hash_uids, dates=args.dates or "full",
                                   progress=sys.stderr.isatty() and not args.quiet)
        for line in problems:
            print(f"volfm scan: warning: {line}", file=sys.stderr)
        write_table(args.out, rows, list(SERIES_COLUMNS))
        usable = sum(bool(r["usable"]) for r in rows)
        print(f"{len(rows)} series ({usable} usable) in {len({r['study_uid'] for r in rows})} studies; "
              f"table: {args.out}")
        source = args.root
    if rules is not None:
        chosen, unmatched = select_series(rows, rules)
        for line in unmatched:
            print(f"volfm scan: warning: {line}", file=sys.stderr)
        if not chosen:
            raise VolfmError(f"{source}: no series passes the selection rules; nothing written to {args.cohort}")
        cohort = cohort_rows(chosen, args.root, rules)
        if args.from_series:
            gone = [r["image"] for r in cohort if not Path(r["image"]).is_dir()]
            if len(gone) == len(cohort):
                raise VolfmError(f"{args.root}: none of the {len(gone)} chosen series folders is under it (e.g. "
                                 f"{gone[0]}); give the root {args.from_series} was scanned from")
            for g in gone:
                print(f"volfm scan: warning: {g}: series folder not found; that case will fail in volfm preprocess",
                      file=sys.stderr)
        write_table(args.cohort, cohort, list(COHORT_COLUMNS))
        print(f"selected {len(chosen)} series (one per {rules['per']}); cohort table: {args.cohort}")
    return 0


def _csv_list(text):
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _cmd_inspect(args) -> int:
    from volfm.cli.inspect import inspect_path, store_gallery  # noqa: PLC0415 - deferred, see BENCHMARKS

    if args.html and args.verify:
        raise VolfmError("volfm inspect: give --html (write a store's QC gallery) or --verify, not both")
    rc = 0
    for p in args.paths:  # one unreadable path does not hide the others
        try:
            print(store_gallery(p, progress=not args.quiet) if args.html else inspect_path(p, verify=args.verify))
        except VolfmError as exc:
            if len(args.paths) == 1:
                raise
            print(f"volfm inspect: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
            rc = 2
    return rc


def _cmd_demo(args) -> int:
    from volfm.cli.demo import run_demo  # noqa: PLC0415 - deferred, see BENCHMARKS

    return run_demo(args.out, cases=args.cases, workers=args.workers, pretrain_cases=args.pretrain_cases,
                    pretrain_epochs=args.pretrain_epochs, synthesis_cases=args.synthesis_cases,
                    synthesis_epochs=args.synthesis_epochs, segment_epochs=args.segment_epochs)


def _cmd_evaluate(args) -> int:
    from volfm.evaluate import evaluate  # noqa: PLC0415 - deferred, see BENCHMARKS

    evaluate(args.ckpt, store=args.store, split=args.split, train_split=args.train_split,
             subgroups=args.subgroups or (), prompts=args.prompts, degradations=args.degrade, out=args.out,
             batch_size=args.batch_size, num_workers=args.workers, device=args.device, progress=not args.quiet)
    return 0


def _cmd_predict(args) -> int:
    from volfm.cli.predict import predict_files  # noqa: PLC0415 - deferred, see BENCHMARKS

    if bool(args.ckpt_path) == bool(args.model):
        raise VolfmError("volfm predict needs exactly one of --model MODEL_DIR (a package from volfm export / volfm "
                         "convert) and --ckpt_path CKPT (a checkpoint from volfm fit)")
    s = predict_files(args.model or args.ckpt_path, args.input, args.out, config=args.config, store=args.store,
                      device=args.device, qc=not args.no_qc, progress=not args.quiet, target=args.target,
                      dicom_seg=not args.no_dicom_seg)
    for r in s["outputs"]:
        extra = "".join(f", {k} {v:.3f}" for k, v in (r.get("metrics") or {}).items())
        if "top_classes" in r:
            extra += ", top: " + "; ".join(f"{c['class']} {c['description'][:30]} {c['probability']:.2f}".replace("  ", " ")
                                           for c in r["top_classes"][:3])
        shape = f" {tuple(r['shape'])}" if "shape" in r else ""
        if r.get("dicom_seg"):
            extra += f"; DICOM SEG {r['dicom_seg']}"
        print(f"{r['input']} -> {r['output']}{shape} ({r['seconds']} s{extra})")
    for name, path in (s.get("tables") or {}).items():
        print(f"{name}: {path}")
    for r in s["failures"]:
        print(f"FAILED {r['input']}: {r['error']}")
    print(f"{len(s['outputs'])} written, {len(s['failures'])} failed; summary: {Path(args.out) / 'predictions.json'}")
    return 1 if s["failures"] else 0


def _cmd_export(args) -> int:
    from volfm.tasks.package import export_checkpoint  # noqa: PLC0415 - deferred, see BENCHMARKS

    out = export_checkpoint(args.ckpt, args.out, store=args.store, name=args.name, overwrite=args.overwrite)
    print(f"model package written to {out} (model.yaml, model.safetensors, README.md); "
          f"run it with volfm predict --model {out} --input ... --out ...")
    return 0


def _cmd_convert(args) -> int:
    from volfm.cli.convert import convert_merlin  # noqa: PLC0415 - deferred, see BENCHMARKS

    r = convert_merlin(args.ckpt, args.out, phenotypes=args.phenotypes, text_model=args.text_model, spec=args.spec,
                       overwrite=args.overwrite)
    heads = ", ".join(h for h, on in (("classifier", True), ("contrastive head", r["contrastive_head"]),
                                      ("text tower", r["text"])) if on)
    print(f"converted {args.ckpt} ({r['layout']} layout): {r['tensors']} encoder tensors -> {r['encoder_name']}, "
          f"{r['classes']} classes; {heads}" + "".join(f"; {n}" for n in r["notes"]))
    print(f"encoder weights: {r['encoder']}; model package: {r['out']} (volfm predict --model {r['out']} ...)")
    return 0


def _cmd_bench(args) -> int:
    import importlib  # noqa: PLC0415 - deferred, see BENCHMARKS

    if args.name not in BENCHMARKS:
        raise VolfmError(f"unknown benchmark {args.name!r}; available: {', '.join(BENCHMARKS)}")
    mod = importlib.import_module(BENCHMARKS[args.name])
    return mod.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="volfm", description="3D CT/MRI/PET foundation-model toolkit")
    p.add_argument("--version", action="version", version=f"volfm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name in LIGHTNING_COMMANDS:  # listed in --help; handled by LightningCLI in main()
        sub.add_parser(name, help=f"{name} a recipe: volfm {name} --config recipes/....yaml (LightningCLI)")

    s = sub.add_parser("synth", help="write a synthetic cohort (NIfTI + cohort.csv)")
    s.add_argument("kind", choices=["ct", "mripet"])
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--cases", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shape", help="CT voxel grid, e.g. 128x128x64")
    s.add_argument("--spacing", type=float, help="MRI/PET voxel size in mm (default 2.0)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_synth)

    s = sub.add_parser("preprocess", help="harmonise a cohort into a store")
    s.add_argument("--spec", help="preprocessing spec YAML (or built-in: ct_merlin, ct_seg, mri_brain, pet)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--cohort", help="cohort table (CSV/TSV) with case_id and input columns")
    g.add_argument("--input-dir", help="folder of images (flat, or imagesTr/labelsTr)")
    s.add_argument("--out", help="store folder")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--storage", help="how arrays are stored, replacing the spec's storage block: e.g. "
                                     "codec=blosc2,dtype=compact[,chunk_patch=96x96x96,clevel=5] (not in the spec hash: "
                                     "a store built with another one is converted, not resampled); when neither this "
                                     "nor the spec sets one, an existing store keeps its own")
    s.add_argument("--convert-store", metavar="STORE", help="re-encode an existing store into --storage without "
                                                            "resampling (resumable; a rerun skips converted cases and "
                                                            "retries failed ones)")
    s.add_argument("--shard", help="i/n: process shard i (0-based) of n; default from SLURM_ARRAY_TASK_ID/COUNT")
    s.add_argument("--overwrite", action="store_true", help="redo every case (and allow a new spec)")
    s.add_argument("--merge", action="store_true", help="join the shard manifests of --out into manifest.csv")
    s.add_argument("--no-qc", action="store_true", help="skip QC PNGs")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_preprocess)

    s = sub.add_parser("scan", help="list the series of a DICOM tree (headers only) and optionally choose one per "
                                    "study as a cohort table for volfm preprocess")
    s.add_argument("root", help="root folder of a DICOM tree (any layout; a DICOMDIR is read when present)")
    s.add_argument("--out", help="series table to write (CSV/TSV), one row per series; folder relative to root")
    s.add_argument("--cohort", help="also choose series by the rules and write this cohort table (case_id, image, "
                                    "image_series_uid, ...)")
    s.add_argument("--from-series", metavar="SERIES_CSV", help="choose again from a series table an earlier "
                                                               "volfm scan --out wrote, without walking root "
                                                               "(needs --cohort; root is the tree it was scanned from)")
    s.add_argument("--rules", help="selection rules YAML (keys: per, modality, orientation, image_type, "
                                   "max_slice_thickness, min_slices, contrast, prefer_kernels); flags replace its keys")
    s.add_argument("--per", choices=["study", "patient", "series"], help="one series per study (default), patient, "
                                                                         "or every passing series")
    s.add_argument("--modality", help="comma-separated modalities, e.g. CT")
    s.add_argument("--orientation", help="comma-separated: axial, coronal, sagittal, oblique")
    s.add_argument("--image-type", choices=["original", "derived", "any"])
    s.add_argument("--max-thickness", type=float, help="largest slice thickness in mm")
    s.add_argument("--min-slices", type=int)
    s.add_argument("--contrast", choices=["yes", "no", "any"])
    s.add_argument("--prefer-kernels", help="comma-separated convolution kernels, best first (after the thinnest)")
    s.add_argument("--hash-uids", action="store_true", help="write PatientID and the UIDs as SHA-256 prefixes "
                                                            "(unsalted: pseudonyms, not anonymisation)")
    s.add_argument("--dates", choices=["full", "year", "none"], help="acquisition_date as YYYYMMDD (full, the "
                                                                      "default), YYYY (year) or left empty (none)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_scan)

    s = sub.add_parser("inspect", help="geometry, spacing, intensity stats and failures of a file or store")
    s.add_argument("paths", nargs="+")
    s.add_argument("--verify", action="store_true", help="check a case's (a store's) array files against the sha256 "
                                                         "recorded when they were written")
    s.add_argument("--html", action="store_true", help="write a store's QC gallery, STORE/qc/index.html (failed cases "
                                                       "first, every case's QC picture, sortable by outlier score), "
                                                       "and print its path")
    s.add_argument("--quiet", action="store_true", help="--html: no progress lines")
    s.set_defaults(fn=_cmd_inspect)

    s = sub.add_parser("demo", help="run the pipeline end to end on an embedded synthetic cohort (CPU)")
    s.add_argument("--out", default="volfm_demo")
    s.add_argument("--cases", type=int, default=8)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--pretrain-cases", type=int, default=240,
                   help="synthetic CT cases for the pretraining steps (0 skips pretraining)")
    s.add_argument("--pretrain-epochs", type=int, default=10,
                   help="epochs of the ICD run (the contrastive run takes 2/3 of them, the masked-volume run 1/3)")
    s.add_argument("--synthesis-cases", type=int, default=24,
                   help="simulated MRI/PET cases for the MRI->PET synthesis step (0 skips it)")
    s.add_argument("--synthesis-epochs", type=int, default=14)
    s.add_argument("--segment-epochs", type=int, default=30,
                   help="epochs of each few-label segmentation run (5 steps of 8 patches each)")
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("evaluate", help="evaluate a checkpoint: pretraining (ICD AUROC, linear probe, retrieval R@k, "
                                        "zero-shot findings, subgroups) or synthesis (MAE/PSNR/SSIM vs baselines, "
                                        "clean and degraded inputs)")
    s.add_argument("--ckpt", required=True, help="a .ckpt written by volfm fit (pretraining or synthesis)")
    s.add_argument("--store", help="store to evaluate on (default: the store the checkpoint was trained on)")
    s.add_argument("--split", default="test", help="split to evaluate (default test)")
    s.add_argument("--train-split", default="train", help="split the linear probe is fitted on (default train)")
    s.add_argument("--subgroups", nargs="*", help="manifest columns to break metrics down by, e.g. sex age:0,50,65,200")
    s.add_argument("--prompts", help="zero-shot prompt set: built-in name (ct_findings) or a YAML path")
    s.add_argument("--degrade", help="synthesis checkpoints: input degradations for robustness, e.g. "
                                     "'noise:0.1,0.3;bias:0.3;slices:0.1,0.3' (the default)")
    s.add_argument("--out", help="folder for eval.json, eval.png and the subgroup CSVs")
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_evaluate)

    s = sub.add_parser("predict", help="run a trained model on raw images: segmentation/synthesis outputs in each "
                                       "image's own grid; pretraining models: features, class probabilities, embeddings")
    s.add_argument("--config", help="the recipe YAML the model was trained with (its data store and patch size)")
    s.add_argument("--model", help="a model package folder (volfm export, volfm convert merlin): needs no store")
    s.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", help="a checkpoint written by volfm fit")
    s.add_argument("--input", required=True, help="an image file (NIfTI/NRRD/MHA), a DICOM folder, or a folder of them")
    s.add_argument("--out", required=True, help="output folder (<name>_seg.nii.gz, for a DICOM series also <name>_seg.dcm, "
                                                "<name>_qc.png, predictions.json)")
    s.add_argument("--store", help="the training store, whose spec.yaml then wins (default: the spec the model "
                                   "recorded; for checkpoints of older volfm versions, from --config or the checkpoint)")
    s.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    s.add_argument("--target", help="synthesis: the measured target image (file) or a folder of them named like the "
                                    "inputs, for metrics and the QC picture")
    s.add_argument("--no-qc", action="store_true", help="skip the QC PNGs")
    s.add_argument("--no-dicom-seg", action="store_true", help="segmentation of a DICOM series: skip the DICOM SEG "
                                                               "(<name>_seg.dcm); the NIfTI is written either way")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_predict)

    s = sub.add_parser("export", help="write a self-contained model package (model.yaml, model.safetensors, model card) "
                                      "from a checkpoint, for volfm predict --model and pretrained:")
    s.add_argument("--ckpt", required=True, help="a checkpoint written by volfm fit")
    s.add_argument("--out", required=True, help="the package folder")
    s.add_argument("--store", help="the training store: only for checkpoints of older volfm versions, which do not "
                                   "record their preprocessing spec")
    s.add_argument("--name", help="the model's name in the card (default: the folder's name)")
    s.add_argument("--overwrite", action="store_true", help="replace a package already in --out")
    s.set_defaults(fn=_cmd_export)

    s = sub.add_parser("convert", help="convert foreign checkpoints into volfm model packages (merlin)")
    s.add_argument("source", choices=["merlin"], help="merlin: Merlin's released .pt (StanfordMIMI/Merlin)")
    s.add_argument("ckpt", help="the checkpoint file (read with torch.load(weights_only=True))")
    s.add_argument("--out", required=True, help="the package folder")
    s.add_argument("--phenotypes", help="Merlin's documentation/phenotypes.csv: names the classifier's outputs")
    s.add_argument("--text-model", help="a local Clinical-Longformer folder (save_pretrained): the text tower is "
                                        "converted too")
    s.add_argument("--spec", default="ct_merlin", help="preprocessing recorded in the package (default ct_merlin, "
                                                       "Merlin's own)")
    s.add_argument("--overwrite", action="store_true", help="replace a package already in --out")
    s.set_defaults(fn=_cmd_convert)

    s = sub.add_parser("bench", help="benchmarks against named peers")
    s.add_argument("name", help=", ".join(BENCHMARKS))
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=_cmd_bench)
    return p




def main(argv=None) -> int:
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                from volfm.cli.lightning import run_lightning  # noqa: PLC0415 - deferred, see BENCHMARKS

                return run_lightning(None if from_sys else argv)
        except VolfmError as exc:
            print(f"volfm {argv[0]}: error: {' '.join(str(exc).split(chr(10)))}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            return int(args.fn(args) or 0)
    except VolfmError as exc:
        one_line = " ".join(str(exc).split("\n"))  # a user error is one line, whatever its source
        print(f"volfm {args.command}: error: {one_line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
