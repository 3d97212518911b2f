"""LightningDataModules over a volfm store: segmentation, pretraining, paired modalities.

Trainer concerns (devices, precision, strategy) stay in the recipe; these modules only decide what
a batch holds. Under DDP each rank reads a disjoint shard of the cases every epoch
(:class:`CaseShardSampler`); recipes set ``trainer.use_distributed_sampler: false`` so Lightning
does not shard a second time.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from volfm import VolfmError
from volfm.data import samplers
from volfm.data.augment import build_augmentation
from volfm.data.dataset import StoreDataset
from volfm.data.samplers import PatchDataset, WholeVolumeSampler


class CaseShardSampler(Sampler[int]):
    """Item indices of a PatchDataset, sharded by case: every epoch the cases are shuffled with
    (seed, epoch) and rank r takes cases r, r + world, ...; all patches of a case stay on one rank.
    Ranks get equal counts (a few cases repeat when the count does not divide)."""

    def __init__(self, num_cases: int, samples_per_volume: int = 1, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0, follow_epoch: bool = True):
        if num_cases < 1:
            raise VolfmError("CaseShardSampler: no cases to sample from")
        if not 0 <= rank < num_replicas:
            raise VolfmError(f"CaseShardSampler: rank {rank} outside world size {num_replicas}")
        self.num_cases, self.spv = int(num_cases), int(samples_per_volume)
        self.num_replicas, self.rank, self.shuffle, self.seed = int(num_replicas), int(rank), shuffle, int(seed)
        self.epoch = 0
        self.follow_epoch = follow_epoch  # False for validation/test: the same patches every epoch
        self.cases_per_rank = math.ceil(self.num_cases / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        if self.follow_epoch:
            self.epoch = int(epoch)

    def cases(self) -> list[int]:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.num_cases) if self.shuffle
                 else np.arange(self.num_cases))
        total = self.cases_per_rank * self.num_replicas
        order = np.concatenate([order, order[: total - len(order)]]) if total > len(order) else order
        return [int(c) for c in order[self.rank::self.num_replicas]]

    def __iter__(self):
        """Yields (epoch, item index): the epoch travels with each index to the worker processes."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 1])
        items = [c * self.spv + s for c in self.cases() for s in range(self.spv)]
        if self.shuffle:
            items = [items[i] for i in rng.permutation(len(items))]
        return iter([(self.epoch, i) for i in items])

    def __len__(self) -> int:
        return self.cases_per_rank * self.spv


def _worker_init(worker_id: int) -> None:
    """Distinct, reproducible numpy/torch seeds per worker (torch seeds each worker from the base seed)."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)


def collate_cases(items: list[dict]) -> dict:
    """Stack tensors of equal shape; keep strings, lists and metadata as lists."""
    out: dict = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], torch.Tensor) and vals[0].ndim == 4 and any(v.shape != vals[0].shape for v in vals):
            ids = [it.get("case_id", "?") for it in items]
            shapes = ", ".join(f"{c} {tuple(v.shape)}" for c, v in zip(ids, vals))
            raise VolfmError(f"batch '{key}' holds volumes of different shapes ({shapes}); give a patch_size "
                             "(e.g. the Merlin 224x224x160) or use batch_size 1")
        # default_collate stacks straight into shared memory inside a worker, which the batch goes through anyway
        # (one copy fewer: whole 224x224x160 volumes, 2 workers, batch 2: 31-37 -> 44-50 volumes/s on 2 cores)
        if isinstance(vals[0], torch.Tensor) and all(v.shape == vals[0].shape for v in vals):
            out[key] = default_collate(vals)
        elif isinstance(vals[0], np.ndarray) and vals[0].dtype != object and all(v.shape == vals[0].shape for v in vals):
            out[key] = default_collate([torch.from_numpy(v) for v in vals])
        else:
            out[key] = vals
    return out


class StoreDataModule(pl.LightningDataModule):
    """Patches (or whole volumes) from a store, for one training objective.

    arrays: image-like arrays to read (e.g. ["image"] or ["mri", "pet"]); label: label array or None.
    sampler: "label_weighted" (nnU-Net foreground oversampling), "uniform" or "whole".
    augmentation: TorchIO transform list (see volfm.data.augment), applied to training patches.
    num_train_cases / train_fraction: few-label runs: train on the first n (or the fraction, at least 1)
    of the training cases in a fixed seeded order, so smaller subsets are nested in larger ones
    (1 case within 2 within 5); validation and test splits are unchanged.
    """

    def __init__(self, store: str, arrays: Sequence[str] = ("image",), label: str | None = "label",
                 patch_size: Sequence[int] | None = (96, 96, 96), sampler: str = "label_weighted",
                 foreground_fraction: float = 1 / 3, classes: Sequence[int] | None = None,
                 samples_per_volume: int = 2, batch_size: int = 2, val_batch_size: int = 1,
                 num_workers: int = 2, pin_memory: bool = True, persistent_workers: bool = True,
                 augmentation: list | dict | None = None, train_split: str = "train", val_split: str = "val",
                 test_split: str = "test", columns: Sequence[str] = ("icd_codes", "report"), seed: int = 0,
                 num_train_cases: int | None = None, train_fraction: float | None = None):
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.save_hyperparameters()
        # under LightningCLI the saved hyperparameters are the subclass's config, which lacks what a subclass
        # fixes itself (e.g. PairedModalityDataModule's arrays): the values this class got are the ones it uses
        self.hparams.update(args)
        if num_train_cases is not None and train_fraction is not None:
            raise VolfmError("give num_train_cases or train_fraction, not both")
        if num_train_cases is not None and int(num_train_cases) < 1:
            raise VolfmError(f"num_train_cases must be at least 1, got {num_train_cases}")
        if train_fraction is not None and not 0 < float(train_fraction) <= 1:
            raise VolfmError(f"train_fraction must be in (0, 1], got {train_fraction}")
        if sampler not in ("label_weighted", "uniform", "whole"):
            raise VolfmError(f"sampler must be label_weighted, uniform or whole, got {sampler!r}")
        if sampler == "label_weighted" and label is None:
            raise VolfmError("sampler label_weighted needs a label array; use sampler: uniform")
        self.datasets: dict = {}

    # -- what tasks may ask of the data (public inputs; tasks never reach into ``datasets``) ---------------
    @property
    def store(self) -> str:
        """The store folder this DataModule reads."""
        return str(self.hparams.store)

    def train_dataset(self) -> StoreDataset:
        """The training split's :class:`StoreDataset` (after ``num_train_cases`` / ``train_fraction``)."""
        if "train" not in self.datasets:
            self.setup("fit")
        return self.datasets["train"].dataset

    def train_rows(self) -> list[dict]:
        """Manifest rows (codes, report, metadata) of the training cases, e.g. to build a code vocabulary."""
        return list(self.train_dataset().rows)

    # -- construction ----------------------------------------------------------------------------
    def _store_dataset(self, split: str):
        h = self.hparams
        ds = StoreDataset(h.store, split=split, arrays=tuple(h.arrays), label=h.label, columns=tuple(h.columns))
        if split == h.train_split and (h.num_train_cases is not None or h.train_fraction is not None):
            n = len(ds)
            k = int(h.num_train_cases) if h.num_train_cases is not None else max(1, round(float(h.train_fraction) * n))
            if k > n:
                raise VolfmError(f"num_train_cases={k} but {h.store} has only {n} ok cases in split '{split}'")
            order = np.random.default_rng([int(h.seed), 0x5E1EC7]).permutation(n)
            ds = ds.select(sorted(order[:k]))
        return ds

    def _sampler(self, train: bool):
        h = self.hparams
        if h.sampler == "whole" or h.patch_size is None:
            return samplers.WholeVolumeSampler(size=h.patch_size)
        if train and h.sampler == "label_weighted":
            return samplers.LabelWeightedPatchSampler(h.patch_size, foreground_fraction=h.foreground_fraction,
                                                      classes=h.classes)
        return samplers.UniformPatchSampler(h.patch_size)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        aug = build_augmentation(h.augmentation, source="datamodule augmentation")
        image_keys = list(h.arrays)
        label_keys = [h.label] if h.label else []

        def transform(case):
            if aug is None:
                return case
            # seeded by (seed, epoch, item): the same augmentation whichever worker draws the item
            seed = int(np.random.SeedSequence([h.seed, int(case.get("epoch", 0)), int(case["index"])])
                       .generate_state(1)[0])
            return aug(case, image_keys=image_keys, label_keys=label_keys, rng_seed=seed)

        if stage in (None, "fit"):
            train = self._store_dataset(h.train_split)
            self.datasets["train"] = PatchDataset(train, self._sampler(True), samples_per_volume=h.samples_per_volume,
                                                  seed=h.seed, transform=transform)
        if stage in (None, "fit", "validate"):
            self.datasets["val"] = PatchDataset(self._store_dataset(h.val_split), self._sampler(False),
                                                samples_per_volume=1, seed=h.seed + 1)
        if stage in (None, "test", "predict"):
            self.datasets["test"] = PatchDataset(self._store_dataset(h.test_split), self._sampler(False),
                                                 samples_per_volume=1, seed=h.seed + 2)

    # -- loaders ---------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        h = self.hparams
        ds = self.datasets[name]
        world, rank = self._world()
        connector = getattr(getattr(self, "trainer", None), "_accelerator_connector", None)
        if world > 1 and getattr(connector, "use_distributed_sampler", False):
            raise VolfmError("volfm DataModules shard cases across ranks themselves; set trainer "
                             "use_distributed_sampler: false in the recipe (else Lightning shards a second time)")
        sampler = CaseShardSampler(ds.num_cases, ds.samples_per_volume, num_replicas=world, rank=rank,
                                   shuffle=shuffle, seed=h.seed, follow_epoch=name == "train")
        workers = int(h.num_workers)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          pin_memory=bool(h.pin_memory) and torch.cuda.is_available(),
                          persistent_workers=bool(h.persistent_workers) and workers > 0,
                          worker_init_fn=_worker_init, collate_fn=collate_cases, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        # Lightning calls sampler.set_epoch(epoch) at every epoch start; the sampler hands the epoch to
        # the dataset with each index, so persistent workers draw new patches every epoch
        return self._loader("train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.val_batch_size, shuffle=False)


class _WholeVolumeEval:
    """Validation and test give whole stored volumes (``whole_volume_eval``), for sliding-window evaluation."""

    whole_volume_eval = True

    def _sampler(self, train: bool):
        if not train and self.whole_volume_eval:
            return WholeVolumeSampler(size=None)
        return super()._sampler(train)


class SegmentationDataModule(_WholeVolumeEval, StoreDataModule):
    """Image + label patches, nnU-Net style foreground oversampling by default. Validation and test give
    whole stored volumes (``whole_volume_eval``) for sliding-window evaluation, one case per batch."""

    def __init__(self, store: str, whole_volume_eval: bool = True, **kwargs):
        super().__init__(store, **kwargs)
        self.whole_volume_eval = bool(whole_volume_eval)


class PretrainDataModule(StoreDataModule):
    """Whole volumes (Merlin: the 224 x 224 x 160 ct_merlin crop) with ICD codes and report text."""

    def __init__(self, store: str, arrays: Sequence[str] = ("image",), label: str | None = None,
                 patch_size: Sequence[int] | None = None, sampler: str = "whole", **kwargs):
        super().__init__(store, arrays=arrays, label=label, patch_size=patch_size, sampler=sampler, **kwargs)


class PairedModalityDataModule(_WholeVolumeEval, StoreDataModule):
    """Co-registered modality pairs (e.g. mri -> pet) cut from the same window; with
    ``whole_volume_eval`` validation and test give whole volumes (sliding-window synthesis)."""

    def __init__(self, store: str, source: str = "mri", target: str = "pet", label: str | None = None,
                 sampler: str = "uniform", whole_volume_eval: bool = False, **kwargs):
        super().__init__(store, arrays=(source, target), label=label, sampler=sampler, **kwargs)
        self.source, self.target = source, target
        self.whole_volume_eval = bool(whole_volume_eval)
