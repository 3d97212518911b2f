"""DataModules run a real Lightning step on small synthetic stores; case sharding is disjoint."""
import lightning.pytorch as pl
import pytest
import torch
import yaml

from volfm.data.datamodules import CaseShardSampler, PairedModalityDataModule, PretrainDataModule, SegmentationDataModule
from volfm.preprocess.spec import load_spec
from volfm.store.build import run_cohort
from volfm.synth.ct import make_ct_cohort
from volfm.synth.mripet import make_mripet_cohort

AUG = [{"name": "RandomFlip", "axes": [0, 1, 2]}, {"name": "RandomGamma", "p": 0.5}]


@pytest.fixture(scope="module")
def ct_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm")
    table = make_ct_cohort(root / "ct", 7, seed=3, shape=(40, 40, 24), progress=False)
    spec = load_spec("ct_seg")
    spec.update(spacing=[6.0, 6.0, 6.0], antialias=False)
    spec["inputs"]["label"]["interpolation"] = "nearest"
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    summary = run_cohort(path, root / "store", cohort=table, progress=False, qc=False)
    assert summary["failed"] == 0
    return root / "store"


@pytest.fixture(scope="module")
def mripet_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    table = make_mripet_cohort(root / "mp", 6, seed=1, spacing=6.0, progress=False)
    spec = load_spec("mri_brain")
    spec["spacing"] = [6.0, 6.0, 6.0]
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run_cohort(path, root / "store", cohort=table, progress=False, qc=False)["failed"] == 0
    return root / "store"


class TinySeg(pl.LightningModule):
    def __init__(self, in_ch=1, out_ch=10, key="image", target="label"):
        super().__init__()
        self.net = torch.nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.key, self.target, self.seen = key, target, []

    def _step(self, batch):
        x = batch[self.key]
        self.seen.append({k: (v.shape if torch.is_tensor(v) else v) for k, v in batch.items()})
        y = self.net(x)
        if self.target == "label":
            return torch.nn.functional.cross_entropy(y, batch["label"][:, 0].long())
        return torch.nn.functional.l1_loss(y, batch[self.target])

    def training_step(self, batch, _):
        return self._step(batch)

    def validation_step(self, batch, _):
        self.log("val_loss", self._step(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer():
    return pl.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)


def test_segmentation_datamodule_trains(ct_store):
    dm = SegmentationDataModule(str(ct_store), patch_size=(8, 8, 8), batch_size=2, num_workers=0,
                                samples_per_volume=2, augmentation=AUG)
    model = TinySeg()
    _trainer().fit(model, datamodule=dm)
    first = model.seen[0]
    assert first["image"] == (2, 1, 8, 8, 8) and first["label"] == (2, 1, 8, 8, 8)
    assert isinstance(first["case_id"], list) and len(first["case_id"]) == 2


def test_segmentation_datamodule_with_workers(ct_store):
    dm = SegmentationDataModule(str(ct_store), patch_size=(8, 8, 8), batch_size=2, num_workers=2,
                                persistent_workers=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (2, 1, 8, 8, 8)


def test_pretrain_datamodule_gives_whole_volumes_codes_and_reports(ct_store):
    dm = PretrainDataModule(str(ct_store), patch_size=(16, 16, 12), batch_size=2, num_workers=0)
    model = TinySeg(out_ch=1, target="image")
    _trainer().fit(model, datamodule=dm)
    first = model.seen[0]
    assert first["image"] == (2, 1, 16, 16, 12)
    assert all(isinstance(c, list) for c in first["icd_codes"])
    assert all(isinstance(r, str) and "LIVER" in r for r in first["report"])


def test_paired_modality_datamodule(mripet_store):
    dm = PairedModalityDataModule(str(mripet_store), source="mri", target="pet", patch_size=(8, 8, 8),
                                  batch_size=2, num_workers=0, columns=())
    model = TinySeg(in_ch=1, out_ch=1, key="mri", target="pet")
    _trainer().fit(model, datamodule=dm)
    assert model.seen[0]["mri"] == model.seen[0]["pet"] == (2, 1, 8, 8, 8)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_case_shards_are_disjoint_and_cover_every_case(world):
    n, spv = 10, 3
    per_rank = [CaseShardSampler(n, spv, num_replicas=world, rank=r, seed=5) for r in range(world)]
    for epoch in (0, 1):
        shards = []
        for s in per_rank:
            s.set_epoch(epoch)
            pairs = list(iter(s))
            assert all(e == epoch for e, _ in pairs)
            items = [i for _, i in pairs]
            assert len(items) == len(s)
            cases = {i // spv for i in items}
            assert all(sum(1 for i in items if i // spv == c) % spv == 0 for c in cases)  # whole cases only
            shards.append(set(s.cases()))
        covered = set().union(*shards)
        assert covered == set(range(n))
        if world > 1 and n % world == 0:
            assert sum(len(sh) for sh in shards) == n  # disjoint when it divides
    # different epochs shuffle differently
    s = CaseShardSampler(n, 1, seed=5)
    s.set_epoch(0)
    a = s.cases()
    s.set_epoch(1)
    assert a != s.cases() and sorted(a) == sorted(s.cases())


class RecordCases(TinySeg):
    """Writes the case ids each rank trained on (ddp_spawn runs the module in child processes)."""

    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = str(out_dir)

    def training_step(self, batch, i):
        with open(f"{self.out_dir}/rank{self.global_rank}.txt", "a") as f:
            f.write("\n".join(batch["case_id"]) + "\n")
        return super().training_step(batch, i)


def test_ddp_ranks_read_disjoint_cases(ct_store, tmp_path):
    dm = SegmentationDataModule(str(ct_store), patch_size=(8, 8, 8), batch_size=1, num_workers=0,
                                samples_per_volume=1, sampler="uniform")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, limit_val_batches=0)
    trainer.fit(RecordCases(tmp_path), datamodule=dm)
    seen = [set((tmp_path / f"rank{r}.txt").read_text().split()) for r in (0, 1)]
    from volfm.data.dataset import StoreDataset

    train_ids = set(StoreDataset(str(ct_store), split="train", label="label").case_ids)
    assert seen[0] and seen[1]
    assert seen[0] | seen[1] == train_ids
    if len(train_ids) % 2 == 0:
        assert not seen[0] & seen[1]
    else:  # one case repeats to keep the ranks in step
        assert len(seen[0] & seen[1]) <= 1


def test_datamodule_from_recipe_yaml(ct_store, tmp_path):
    """class_path/init_args as a recipe would give it, through LightningCLI."""
    from lightning.pytorch.cli import LightningCLI

    from volfm.data.datamodules import StoreDataModule

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "trainer": {"fast_dev_run": True, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False},
        "data": {"class_path": "volfm.data.datamodules.SegmentationDataModule",
                 "init_args": {"store": str(ct_store), "patch_size": [8, 8, 8], "batch_size": 2, "num_workers": 0,
                               "augmentation": AUG}},
    }))
    cli = LightningCLI(TinySeg, StoreDataModule, subclass_mode_data=True, run=False,
                       args=["--config", str(recipe)], save_config_callback=None)
    assert isinstance(cli.datamodule, SegmentationDataModule)
    assert cli.datamodule.hparams.patch_size == [8, 8, 8]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.model.seen and cli.model.seen[0]["image"] == (2, 1, 8, 8, 8)


def test_persistent_workers_draw_new_patches_every_epoch(ct_store):
    dm = SegmentationDataModule(str(ct_store), patch_size=(8, 8, 8), batch_size=2, num_workers=2,
                                persistent_workers=True, samples_per_volume=1, sampler="uniform", augmentation=AUG)
    dm.setup("fit")
    loader = dm.train_dataloader()
    starts = []
    for epoch in (0, 1, 0):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert all(int(e) == epoch for b in batches for e in b["epoch"])
        starts.append(sorted((c, tuple(s.tolist())) for b in batches for c, s in zip(b["case_id"], b["patch_start"])))
    assert starts[0] != starts[1]  # epoch 1 differs although the workers persisted
    assert starts[0] == starts[2]  # and epoch 0 again reproduces epoch 0 exactly


def test_validation_patches_stay_fixed_across_epochs(ct_store):
    dm = SegmentationDataModule(str(ct_store), patch_size=(8, 8, 8), num_workers=0)
    dm.setup("fit")
    loader = dm.val_dataloader()
    seen = []
    for epoch in (0, 3):
        loader.sampler.set_epoch(epoch)
        seen.append([tuple(b["patch_start"][0].tolist()) for b in loader])
    assert seen[0] == seen[1]


def test_whole_volumes_of_different_shapes_do_not_batch_silently(ct_store):
    from volfm import VolfmError

    dm = PretrainDataModule(str(ct_store), batch_size=3, num_workers=0)  # no patch_size: whole stored volumes
    dm.setup("fit")
    with pytest.raises(VolfmError, match="different shapes"):
        for _ in dm.train_dataloader():
            pass


def test_training_patches_carry_the_voxel_spacing_for_augmentation(ct_store):
    dm = SegmentationDataModule(str(ct_store), patch_size=(8, 8, 8), batch_size=2, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["spacing"][0] == [6.0, 6.0, 6.0]


def test_few_label_subsets_are_nested_and_leave_validation_alone(ct_store):
    from volfm import VolfmError

    def train_ids(**kw):
        dm = SegmentationDataModule(str(ct_store), patch_size=(16, 16, 16), num_workers=0, **kw)
        dm.setup("fit")
        return dm.datasets["train"].dataset.case_ids, dm.datasets["val"].dataset.case_ids

    full, val = train_ids()
    one, val1 = train_ids(num_train_cases=1)
    two, _ = train_ids(num_train_cases=2)
    half, _ = train_ids(train_fraction=0.5)
    assert len(one) == 1 and len(two) == 2 and len(half) == max(1, round(0.5 * len(full)))
    assert set(one) <= set(two) <= set(full) and val1 == val
    with pytest.raises(VolfmError, match="only"):
        train_ids(num_train_cases=len(full) + 1)
    with pytest.raises(VolfmError, match="not both"):
        SegmentationDataModule(str(ct_store), num_train_cases=1, train_fraction=0.5)
