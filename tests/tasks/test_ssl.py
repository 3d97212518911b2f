"""Self-supervised pretraining: masked-volume reconstruction (CNN + U-Net decoder) and MAE (ViT): the masked
input hides what the loss scores, a few optimiser steps on a fixed smooth volume bring the loss down, bad
encoder/objective combinations fail clearly, masks follow (seed, step, rank) in training and the case ids in
evaluation, and a Lightning run leaves an encoder and a decoder that segmentation fine-tuning loads."""
import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file

from volfm import VolfmError
from volfm.data.datamodules import PretrainDataModule, SegmentationDataModule
from volfm.losses import masked_mse
from volfm.models import create_encoder, load_encoder_weights
from volfm.models.decoders import UNetDecoder
from volfm.models.mae import patchify
from volfm.models.masking import block_mask, mask_generator
from volfm.models.resnet3d import ResNet3d
from volfm.models.weights import DECODER_HEADS, load_decoder_weights, read_encoder_metadata
from volfm.preprocess.spec import load_spec
from volfm.store.build import run_cohort
from volfm.synth.ct import make_ct_cohort
from volfm.tasks import (
    EncoderConfig,
    MAEConfig,
    MAETask,
    MaskedVolumeConfig,
    MaskedVolumeTask,
    PretrainTask,
    SegmentationTask,
)
from volfm.tasks.ssl import mae_loss, masked_volume_loss, random_crops, step_generator

ENC_KW = {"in_chans": 1, "base_channels": 4}
CNN = {"name": "resnet18_3d", "kwargs": ENC_KW}
VIT = {"name": "vit_tiny_3d", "kwargs": {"img_size": [16, 16, 16], "patch_size": 4, "embed_dim": 24, "depth": 2,
                                         "num_heads": 2}}
MASKED = {"block_size": 4, "mask_ratio": 0.5}
MAE = {"decoder_dim": 24, "decoder_depth": 1, "decoder_heads": 2, "norm_pix_loss": False}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a small shared CPU two OpenMP threads that wait on each other at every barrier
    make these tiny convolutions many times slower; the previous setting is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _smooth(size=16):
    """Two smooth volumes (a constant plus a linear ramp), (2, 1, size, size, size)."""
    i, j, k = torch.meshgrid(*[torch.linspace(-1, 1, size)] * 3, indexing="ij")
    return torch.stack([1.0 + 0.5 * i + 0.3 * j - 0.2 * k, 0.8 - 0.4 * i + 0.3 * j + 0.2 * k])[:, None]


def _masked_task(seed=0, **kw):
    torch.manual_seed(seed)
    return MaskedVolumeTask(encoder=CNN, masked={**MASKED, **kw}, seed=seed)


def _mae_task(seed=0, **kw):
    torch.manual_seed(seed)
    return MAETask(encoder=VIT, mae={**MAE, **kw}, seed=seed)


# ------------------------------------------------------------------------------------- masked volume
def test_masked_volume_loss_hides_the_masked_voxels_and_scores_only_them():
    task = _masked_task()
    task.eval()
    cfg = task.masked_cfg
    image = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    seen = []
    original = task.encoder.forward_intermediates

    def spy(x):
        seen.append(x.detach().clone())
        return original(x)

    task.encoder.forward_intermediates = spy
    with torch.no_grad():
        loss, recon, mask = masked_volume_loss(task.encoder, task.decoder, image, cfg, mask_generator(0, 5))
    # the mask is the block mask the same generator draws: exactly half of the 4^3 blocks of each sample
    want = block_mask(2, (16, 16, 16), 4, 0.5, mask_generator(0, 5))
    assert torch.equal(mask, want) and torch.equal(mask.float().flatten(1).mean(1), torch.full((2,), 0.5))
    assert recon.shape == image.shape and torch.isfinite(loss)
    # the encoder saw the fill value where masked and the image elsewhere
    x = seen[0]
    assert torch.all(x[mask] == cfg.fill) and torch.equal(x[~mask], image[~mask])
    # the loss is the MSE over the masked voxels (formula), nothing from the visible ones
    m = mask.float()
    assert torch.allclose(loss, ((recon - image) ** 2 * m).sum() / m.sum(), rtol=1e-5)
    # other values under the mask: the network input (hence the reconstruction) is the same, the loss is not
    changed = torch.where(mask, image + 3.0, image)
    with torch.no_grad():
        loss2, recon2, mask2 = masked_volume_loss(task.encoder, task.decoder, changed, cfg, mask_generator(0, 5))
    assert torch.equal(mask2, mask) and torch.equal(seen[1], x)
    torch.testing.assert_close(recon2, recon)
    assert not torch.allclose(loss2, loss)
    # visible voxels of the target do not enter the loss: scoring recon against a target changed there only
    # (the function's own loss term, recomputed) gives the same number
    target_vis = torch.where(mask, image, image - 7.0)
    assert torch.allclose(masked_mse(recon, target_vis, mask), loss, rtol=1e-6)


def test_masked_task_step_uses_the_step_generator():
    task = _masked_task(seed=3)
    task.eval()
    image = _smooth()
    batch = {"image": image, "case_id": ["a", "b"]}
    with torch.no_grad():
        loss, logs, _ = task._step(batch, train=True)  # no trainer: global step 0, rank 0
        want, _, _ = masked_volume_loss(task.encoder, task.decoder, image, task.masked_cfg,
                                        step_generator(3, 0, 0, ["a", "b"], True, "masked"))
        ev, ev_logs, _ = task._step(batch, train=False)
        want_ev, _, _ = masked_volume_loss(task.encoder, task.decoder, image, task.masked_cfg,
                                           step_generator(3, 123, 4, ["a", "b"], False, "masked"))
    assert torch.allclose(loss, want) and torch.allclose(logs["masked_loss"], want)
    assert torch.allclose(ev, want_ev) and not torch.allclose(ev, loss)
    assert set(logs) == {"masked_loss", "loss"}


def _train(loss_fn, params, steps, lr, seed):
    opt = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():  # a fixed held-out mask (a step the training never draws)
        before = float(loss_fn(mask_generator(seed, 10**6)))
    for step in range(steps):
        loss = loss_fn(mask_generator(seed, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_fn(mask_generator(seed, 10**6)))
    return before, after


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_volume_reconstruction_loss_drops_on_a_smooth_volume(seed):
    task = _masked_task(seed=seed)
    task.train()
    image = _smooth(16)

    def loss_fn(g):
        return masked_volume_loss(task.encoder, task.decoder, image, task.masked_cfg, g)[0]

    before, after = _train(loss_fn, task.parameters(), steps=30, lr=3e-3, seed=seed)
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mae_reconstruction_loss_drops_on_a_smooth_volume(seed):
    task = _mae_task(seed=seed)
    task.train()
    image = _smooth(16)

    def loss_fn(g):
        return mae_loss(task.encoder, task.mae_decoder, image, task.mae_cfg, g)[0]

    before, after = _train(loss_fn, task.parameters(), steps=25, lr=3e-3, seed=seed)
    assert after < 0.5 * before, (before, after)


def test_mae_task_builds_the_requested_vit_and_scores_masked_patches():
    task = _mae_task()
    enc = task.encoder
    assert (enc.embed_dim, enc.depth, enc.patch_size, enc.img_size) == (24, 2, (4, 4, 4), (16, 16, 16))
    assert task.mae_decoder.decoder_dim == 24 and len(task.mae_decoder.blocks) == 1
    assert task.mae_decoder.num_prefix_tokens == 1 and task.decoder is None
    task.eval()
    image = _smooth()
    with torch.no_grad():
        loss, pred, masked = mae_loss(enc, task.mae_decoder, image, task.mae_cfg, mask_generator(0, 0))
    assert pred.shape == (2, 64, 64) and masked.shape == (2, 64)
    assert torch.equal(masked.sum(1), torch.full((2,), 48))  # 75 % of 64 tokens by default
    target = patchify(image, (4, 4, 4))
    per_token = ((pred - target) ** 2).mean(-1)
    assert torch.allclose(loss, per_token[masked].mean(), rtol=1e-5)
    # without a CLS token the decoder drops no prefix
    no_cls = MAETask(encoder={**VIT, "kwargs": {**VIT["kwargs"], "cls_token": False}}, mae=MAE)
    assert no_cls.mae_decoder.num_prefix_tokens == 0
    with torch.no_grad():
        assert torch.isfinite(mae_loss(no_cls.encoder, no_cls.mae_decoder, image, no_cls.mae_cfg,
                                       mask_generator(0, 0))[0])


def test_masked_decoder_deep_supervision_is_rejected():
    with pytest.raises(VolfmError, match="deep_supervision"):
        MaskedVolumeTask(encoder=CNN, masked={**MASKED, "decoder_kwargs": {"deep_supervision": True}})


# ------------------------------------------------------------------------------------------- errors
def test_encoder_objective_mismatches_raise():
    with pytest.raises(VolfmError, match="ViT encoder"):
        MAETask(encoder=CNN, mae=MAE)
    with pytest.raises(VolfmError, match="CNN encoder"):
        MaskedVolumeTask(encoder=VIT, masked=MASKED)
    with pytest.raises(VolfmError, match="no objective"):
        PretrainTask(encoder=CNN, icd=None)
    with pytest.raises(VolfmError, match="freeze_encoder"):
        MaskedVolumeTask(encoder=CNN, masked=MASKED, freeze_encoder=True)
    with pytest.raises(VolfmError, match="freeze_encoder"):
        MAETask(encoder=VIT, mae=MAE, freeze_encoder=True)
    with pytest.raises(VolfmError, match="weights"):
        MaskedVolumeTask(encoder=CNN, masked={**MASKED, "weight": 0.0})
    with pytest.raises(VolfmError, match="decoder_kwargs"):
        MaskedVolumeTask(encoder=CNN, masked={**MASKED, "decoder_kwargs": {"no_such_option": 1}})
    with pytest.raises(VolfmError, match="unknown key"):
        MaskedVolumeTask(encoder=CNN, masked={"mask_ration": 0.5})


def test_hybrid_groups_coexist():
    task = PretrainTask(encoder=CNN, icd=None, masked=MaskedVolumeConfig(block_size=4), mae=None)
    assert task.use_masked and not task.use_mae and not task.use_icd and task.decoder is not None
    assert MaskedVolumeTask(encoder=CNN).masked_cfg == MaskedVolumeConfig()  # on by default
    assert MAETask(encoder=VIT, mae=MAEConfig(decoder_dim=24)).mae_cfg.decoder_dim == 24


def test_random_crops_size_content_and_errors():
    image = torch.arange(2 * 1 * 10 * 9 * 8, dtype=torch.float32).reshape(2, 1, 10, 9, 8)
    g = torch.Generator().manual_seed(0)
    crops = random_crops(image, (4, 5, 6), g)
    assert crops.shape == (2, 1, 4, 5, 6)
    for b in range(2):
        # the first voxel's value gives the start; the crop is the block of the image there
        start = int(crops[b, 0, 0, 0, 0]) - b * 10 * 9 * 8
        i, rem = divmod(start, 9 * 8)
        j, k = divmod(rem, 8)
        assert i + 4 <= 10 and j + 5 <= 9 and k + 6 <= 8
        assert torch.equal(crops[b], image[b, :, i:i + 4, j:j + 5, k:k + 6])
    # reproducible from the generator
    assert torch.equal(random_crops(image, (4, 5, 6), torch.Generator().manual_seed(0)), crops)
    assert random_crops(image, None, g) is image
    assert random_crops(image, (10, 9, 8), g) is image
    with pytest.raises(VolfmError, match="larger than"):
        random_crops(image, (11, 4, 4), g)
    with pytest.raises(VolfmError, match="larger than"):
        random_crops(image, 9, g)  # 9 > 8 along K


def test_masked_volume_with_crop_size_reconstructs_the_crop():
    task = MaskedVolumeTask(encoder=CNN, masked={**MASKED, "crop_size": [16, 16, 16]})
    task.eval()
    with torch.no_grad():
        loss, recon, mask = masked_volume_loss(task.encoder, task.decoder, torch.rand(2, 1, 24, 20, 16),
                                               task.masked_cfg, mask_generator(0, 0))
    assert recon.shape == (2, 1, 16, 16, 16) and mask.shape == (2, 1, 16, 16, 16) and torch.isfinite(loss)


def test_step_generator_train_by_rank_and_step_eval_by_case_ids():
    def draw(g):
        return torch.rand(8, generator=g)

    ids = ["ct_0001", "ct_0002"]
    base = draw(step_generator(0, 5, 0, ids, True, "masked"))
    assert torch.equal(base, draw(step_generator(0, 5, 0, ["x"], True, "masked")))  # ids do not matter in training
    assert not torch.equal(base, draw(step_generator(0, 6, 0, ids, True, "masked")))
    assert not torch.equal(base, draw(step_generator(0, 5, 1, ids, True, "masked")))
    assert not torch.equal(base, draw(step_generator(1, 5, 0, ids, True, "masked")))
    assert not torch.equal(base, draw(step_generator(0, 5, 0, ids, True, "mae")))
    ev = draw(step_generator(0, 5, 0, ids, False, "masked"))
    assert torch.equal(ev, draw(step_generator(0, 999, 3, ids, False, "masked")))  # step and rank do not matter
    assert not torch.equal(ev, draw(step_generator(0, 5, 0, ["ct_0001", "ct_0003"], False, "masked")))
    assert not torch.equal(ev, draw(step_generator(0, 5, 0, ids[::-1], False, "masked")))
    assert not torch.equal(ev, draw(step_generator(1, 5, 0, ids, False, "masked")))
    assert not torch.equal(ev, base)


# ------------------------------------------------------------------------------------ norm option
@pytest.mark.parametrize("norm", ["group", "instance"])
def test_resnet_group_and_instance_norm_have_no_batch_coupling(norm):
    torch.manual_seed(0)
    enc = ResNet3d(depth=18, base_channels=4, norm=norm).train()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in enc.modules())
    gns = [m for m in enc.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert gns
    if norm == "instance":
        assert all(m.num_groups == m.num_channels for m in gns)
    else:
        assert all(m.num_channels // m.num_groups >= 2 and m.num_groups <= 32 for m in gns)
        assert any(m.num_groups > 1 for m in gns)
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both = enc.forward_intermediates(x)
        one = [enc.forward_intermediates(x[i:i + 1]) for i in range(2)]
    for level, f in enumerate(both):
        torch.testing.assert_close(f, torch.cat([one[0][level], one[1][level]]), rtol=1e-4, atol=1e-5)
    # the registry passes the option through and the task builds on it
    assert create_encoder("resnet18_3d", base_channels=4, norm=norm).norm_kind == norm
    task = MaskedVolumeTask(encoder={"name": "resnet18_3d", "kwargs": {**ENC_KW, "norm": norm}}, masked=MASKED)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in task.encoder.modules())


def test_resnet_batch_norm_couples_batch_items_in_training_and_bad_norm_raises():
    torch.manual_seed(0)
    enc = ResNet3d(depth=18, base_channels=4, norm="batch").train()
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in enc.modules())
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both = enc.forward_intermediates(x)[1]
        one = torch.cat([enc.forward_intermediates(x[i:i + 1])[1] for i in range(2)])
    assert not torch.allclose(both, one, atol=1e-3)
    with pytest.raises(VolfmError, match="norm"):
        ResNet3d(depth=18, base_channels=4, norm="layer")


# ------------------------------------------------------------------------------ end to end (Lightning)
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """8 synthetic CT cases at 32^3 (as tests/tasks/test_pretrain.py and test_segmentation.py)."""
    root = tmp_path_factory.mktemp("ssl")
    table = make_ct_cohort(root / "ct", 8, seed=11, shape=(40, 40, 24), progress=False)
    spec = load_spec("ct_merlin_demo")
    spec.update(spacing=[10.5, 10.5, 15.0], crop={"size": [32, 32, 32], "mode": "center"})
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run_cohort(path, root / "store", cohort=table, progress=False, qc=False)["failed"] == 0
    splits = [r["split"] for r in csv.DictReader(open(table, newline="", encoding="utf-8"))]
    assert splits.count("train") >= 2 and "val" in splits
    return root / "store"


@pytest.fixture(scope="module")
def masked_run(store, tmp_path_factory):
    """Two training steps of a MaskedVolumeTask with a CSVLogger: (task, log dir, checkpoint)."""
    root = tmp_path_factory.mktemp("masked_run")
    torch.manual_seed(0)
    # patch_size as `volfm fit` links it from the data group (the logger merges both groups' hyper-parameters)
    task = MaskedVolumeTask(encoder=CNN, masked=MASKED, seed=0, patch_size=(32, 32, 32))
    dm = PretrainDataModule(str(store), patch_size=[32, 32, 32], num_workers=0, batch_size=2)
    initial = {k: v.detach().clone() for k, v in task.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                         num_sanity_val_steps=0, log_every_n_steps=1, logger=CSVLogger(str(root)),
                         default_root_dir=str(root), enable_checkpointing=True, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(task, datamodule=dm)
    log_dir = Path(trainer.log_dir)
    ckpts = sorted(log_dir.rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    task.initial_state = initial
    return task, log_dir, ckpts[-1]


def test_fit_trains_encoder_and_decoder(masked_run):
    task = masked_run[0]
    now = task.state_dict()
    for prefix in ("encoder.", "decoder."):
        weights = [k for k in now if k.startswith(prefix) and k.endswith("weight")]
        changed = [k for k in weights if not torch.equal(now[k], task.initial_state[k])]
        assert len(changed) > 0.8 * len(weights), (prefix, sorted(set(weights) - set(changed))[:5])


def test_fit_writes_encoder_and_decoder_safetensors(masked_run):
    task, log_dir, ckpt = masked_run
    enc_path, dec_path = log_dir / "encoder.safetensors", log_dir / "decoder.safetensors"
    assert enc_path.is_file() and dec_path.is_file()
    assert read_encoder_metadata(enc_path)["volfm.encoder"] == "resnet18_3d"
    meta = read_encoder_metadata(dec_path)  # (reads any safetensors metadata)
    assert meta["volfm.decoder"] == "unet" and meta["volfm.encoder"] == "resnet18_3d"
    dec = load_file(str(dec_path))
    own = task.decoder.state_dict()
    assert set(dec) == set(own)
    for k, v in own.items():
        torch.testing.assert_close(dec[k], v.cpu(), msg=k)
    state = torch.load(str(ckpt), map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("decoder.") for k in state)
    metrics = list(csv.DictReader(open(log_dir / "metrics.csv", newline="")))
    assert any(r.get("train/masked_loss") for r in metrics) and any(r.get("val/masked_loss") for r in metrics)


def test_checkpoint_loads_encoder_and_rebuilds_the_task(masked_run):
    task, _, ckpt = masked_run
    state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["masked"]["block_size"] == 4
    assert state["hyper_parameters"]["masked"]["mask_ratio"] == 0.5
    fresh = create_encoder("resnet18_3d", **ENC_KW)
    load_encoder_weights(fresh, ckpt)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, state["state_dict"][f"encoder.{k}"], msg=k)
    back = MaskedVolumeTask.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True)
    assert back.masked_cfg == MaskedVolumeConfig(block_size=4, mask_ratio=0.5)
    assert back.use_masked and not back.use_icd and not back.use_contrastive and back.mae_cfg is None
    for k, v in back.decoder.state_dict().items():
        torch.testing.assert_close(v, state["state_dict"][f"decoder.{k}"], msg=k)
    for k, v in back.encoder.state_dict().items():
        torch.testing.assert_close(v, state["state_dict"][f"encoder.{k}"], msg=k)


def _seg_setup(task, store):
    dm = SegmentationDataModule(str(store), patch_size=(16, 16, 16), num_workers=0, batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)


def test_segmentation_starts_from_the_pretrained_encoder_and_decoder(masked_run, store):
    pre, log_dir, _ = masked_run
    torch.manual_seed(123)
    seg = SegmentationTask(encoder=EncoderConfig("resnet18_3d", ENC_KW, str(log_dir / "encoder.safetensors")),
                           decoder={"pretrained": str(log_dir / "decoder.safetensors")}, labels=["spleen"],
                           patch_size=(16, 16, 16))
    _seg_setup(seg, store)
    for k, v in pre.encoder.state_dict().items():
        torch.testing.assert_close(seg.encoder.state_dict()[k], v, msg=k)
    pre_dec, seg_dec = pre.decoder.state_dict(), seg.decoder.state_dict()
    body = [k for k in seg_dec if not k.startswith(DECODER_HEADS)]
    assert body and set(body) == {k for k in pre_dec if not k.startswith(DECODER_HEADS)}
    for k in body:
        torch.testing.assert_close(seg_dec[k], pre_dec[k], msg=k)
    # the output layer is the task's own: two classes (background, spleen) against the one reconstructed channel
    assert seg_dec["head.weight"].shape[0] == 2 and pre_dec["head.weight"].shape[0] == 1
    # (the equality above is not trivial: a decoder built afresh differs from the pretrained one)
    fresh = UNetDecoder(create_encoder("resnet18_3d", **ENC_KW).feature_info, 1, 2).state_dict()
    assert any(not torch.equal(fresh[k], pre_dec[k]) for k in body)


def test_load_decoder_weights_from_the_checkpoint_skips_the_heads(masked_run):
    pre, _, ckpt = masked_run
    info = create_encoder("resnet18_3d", **ENC_KW).feature_info
    torch.manual_seed(7)
    target = UNetDecoder(info, 1, 1)  # the same head shape: it still keeps its own initialisation
    head_before = target.head.weight.detach().clone()
    load_decoder_weights(target, ckpt)
    got, want = target.state_dict(), pre.decoder.state_dict()
    for k in got:
        if not k.startswith(DECODER_HEADS):
            torch.testing.assert_close(got[k], want[k], msg=k)
    assert torch.equal(target.head.weight, head_before) and not torch.equal(target.head.weight, want["head.weight"])


def test_load_decoder_weights_errors(masked_run, tmp_path):
    _, log_dir, ckpt = masked_run
    info = create_encoder("resnet18_3d", **ENC_KW).feature_info
    no_dec = tmp_path / "encoder_only.ckpt"
    torch.save({"state_dict": {"encoder.conv1.weight": torch.zeros(4, 1, 7, 7, 3)}}, no_dec)
    with pytest.raises(VolfmError, match="encoder_only.ckpt holds no decoder weights"):
        load_decoder_weights(UNetDecoder(info, 1, 2), no_dec)
    wide = create_encoder("resnet18_3d", in_chans=1, base_channels=8).feature_info
    for src in (ckpt, log_dir / "decoder.safetensors"):
        with pytest.raises(VolfmError, match="do not fit this decoder"):
            load_decoder_weights(UNetDecoder(wide, 1, 2), src)
    with pytest.raises(VolfmError, match="does not exist"):
        load_decoder_weights(UNetDecoder(info, 1, 2), tmp_path / "missing.safetensors")
