"""Grid sampler + aggregator for sliding-window inference over whole stored volumes.

Windows of ``patch_size`` are laid on a regular grid over the volume (step
``int(patch * (1 - overlap))`` per axis, the last window flush with the end, exactly as
``monai.inferers.sliding_window_inference`` places them), cut out on the CPU (straight from a
``np.load(mmap_mode="r")`` array: the whole volume is never copied), batched, run through the
model on its device, weighted by an importance map (Gaussian or constant) and accumulated into an
output and a weight buffer; the blend is ``sum(w * pred) / sum(w)``.

Memory: the accumulators hold ``(C_out + 1) * I * J * K`` float32 values. With
``accumulate_on="auto"`` they stay on the model's GPU only while that fits under
``max_device_bytes`` (default: half of the free device memory); otherwise each batch's weighted
outputs are copied to CPU accumulators as they come, so a 512 x 512 x 600 volume never needs the
whole logits volume on the GPU (the GPU then holds one batch of windows at a time).

Differences from MONAI's ``sliding_window_inference`` (same settings otherwise give the same
numbers within float rounding):

* window placement is MONAI's, including an axis shorter than the patch: one window with the
  volume centred in it (``pad_value`` on both sides); ``short_axis="start"`` puts the volume at the
  window's start instead (padding after the end only), which changes results near such axes (the
  Gaussian weights and the model's view of the border differ);
* the importance map is MONAI's (``exp(-d^2 / (2 sigma^2))`` per axis with ``sigma = sigma_scale *
  patch``, peak 1 at the window centre, clamped below at 1e-3); nnU-Net divides by the maximum and
  clamps at the smallest non-zero value instead -- a near-constant factor that cancels in the blend;
* weighted outputs are accumulated with one fused ``addcmul_`` (MONAI multiplies then adds), so
  results agree to about 1 ulp rather than bit for bit.
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from volfm.preprocess.pipeline import to_source_grid
from volfm.utils import parse_triple, progress_bar

__all__ = ["grid_starts", "importance_map", "SlidingWindowInferer", "predict_to_source", "scan_interval"]

MIN_WEIGHT = 1e-3  # MONAI's floor for the importance map (relative to its peak of ~1)


def scan_interval(patch_size, overlap) -> tuple[int, int, int]:
    """Step between window starts per axis: ``max(1, int(patch * (1 - overlap)))`` (as MONAI)."""
    patch = parse_triple(patch_size, "patch_size", integer=True, at_least=1)
    ov = parse_triple(overlap, "overlap")
    for o in ov:
        if not 0.0 <= o < 1.0:
            raise ValueError(f"overlap must be in [0, 1) per axis, got {ov}")
    return tuple(max(1, int(p * (1.0 - o))) for p, o in zip(patch, ov))


def _axis_starts(n: int, p: int, step: int, short: str = "center") -> list[int]:
    if n <= p:  # one window, padded
        return [-((p - n) // 2)] if short == "center" else [0]
    count = math.ceil((n - p) / step) + 1
    return [min(i * step, n - p) for i in range(count)]


def grid_starts(shape, patch_size, overlap=0.5, short_axis: str = "center") -> np.ndarray:
    """Window starts (N, 3) covering every voxel of a volume of spatial ``shape``.

    Starts step by ``int(patch * (1 - overlap))`` per axis; the last window of an axis is flush
    with its end. An axis shorter than the patch gets one window, padded: ``short_axis="center"``
    centres the volume in it (start ``-((patch - n) // 2)``, negative: padding on both sides, as
    MONAI pads), ``"start"`` puts it at 0 (padding after the end only).
    Windows are ordered with the last axis fastest (as MONAI's ``dense_patch_slices``).
    """
    shape = parse_triple(shape, "shape", integer=True, at_least=1)
    patch = parse_triple(patch_size, "patch_size", integer=True, at_least=1)
    step = scan_interval(patch, overlap)
    if short_axis not in ("center", "start"):
        raise ValueError(f"short_axis must be 'center' or 'start', got {short_axis!r}")
    axes = [_axis_starts(n, p, s, short_axis) for n, p, s in zip(shape, patch, step)]
    grids = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.reshape(-1) for g in grids], axis=1).astype(np.int64)


def importance_map(patch_size, mode: str = "gaussian", sigma_scale=0.125, device=None) -> torch.Tensor:
    """Blending weights (float32 tensor of shape ``patch_size``).

    "gaussian": product over axes of ``exp(-d^2 / (2 sigma^2))``, d the distance in voxels from the
    window centre, ``sigma = sigma_scale * patch``; peak 1 at the centre, clamped below at 1e-3 so
    that every voxel of a window counts (computed exactly as MONAI's ``compute_importance_map``).
    "constant": all ones.
    """
    patch = parse_triple(patch_size, "patch_size", integer=True, at_least=1)
    device = torch.device(device or "cpu")
    if mode == "constant":
        return torch.ones(patch, dtype=torch.float32, device=device)
    if mode != "gaussian":
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    scales = parse_triple(sigma_scale, "sigma_scale")
    if not all(s > 0 for s in scales):
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale!r}")
    w = None
    for i, (p, s) in enumerate(zip(patch, scales)):
        x = torch.arange(-(p - 1) / 2.0, (p - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        x = torch.exp(x ** 2 / (-2 * (p * s) ** 2))
        w = x if i == 0 else w.unsqueeze(-1) * x[(None,) * i]
    floor = max(float(w.min()), MIN_WEIGHT)
    return w.clamp_(min=floor)


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            if t.is_floating_point():
                return t.device, t.dtype
        for t in model.buffers():
            if t.is_floating_point():
                return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _free_device_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    return math.inf


class SlidingWindowInferer:
    """Sliding-window inference with Gaussian/constant blending, batched and memory-bounded.

    ``inferer(volume, model) -> torch.Tensor (C_out, I, J, K)`` float32 on ``output_device``.

    volume: (C, I, J, K) numpy array, memmap or tensor. model: callable taking (B, C, *patch) and
    returning (B, C_out, *patch) (same spatial size). device: where the model runs (default: the
    device of its parameters, CPU for a plain function); inputs are cast to the model's dtype;
    ``amp`` runs it under ``torch.autocast`` (True: bfloat16 on CPU, float16 on CUDA; or a dtype).
    accumulate_on: "device" (accumulators on ``device``), "cpu" (stream each batch's weighted
    outputs to CPU accumulators) or "auto" (device while ``(C_out + 1) * voxels * 4`` bytes fit
    under ``max_device_bytes``; default half of the free CUDA memory, unlimited on CPU).
    The model is called as it is (put it in ``eval()`` mode yourself), under ``torch.no_grad()``.
    After a call, ``last_info`` says what was done (windows, batches, where it accumulated, bytes).
    """

    def __init__(self, patch_size, overlap=0.5, mode: str = "gaussian", sigma_scale=0.125, batch_size: int = 4,
                 pad_value: float = 0.0, device=None, accumulate_on: str = "auto", max_device_bytes=None,
                 progress: bool = False, amp=False, output_device="cpu", short_axis: str = "center",
                 memory_format: str = "auto"):
        self.patch_size = parse_triple(patch_size, "patch_size", integer=True, at_least=1)
        self.overlap = overlap
        scan_interval(self.patch_size, overlap)  # validates overlap
        if mode not in ("gaussian", "constant"):
            raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
        self.mode = mode
        self.sigma_scale = sigma_scale
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.pad_value = float(pad_value)
        self.device = None if device is None else torch.device(device)
        if accumulate_on not in ("auto", "device", "cpu"):
            raise ValueError(f"accumulate_on must be 'auto', 'device' or 'cpu', got {accumulate_on!r}")
        self.accumulate_on = accumulate_on
        self.max_device_bytes = max_device_bytes
        self.progress = progress
        self.amp = amp
        self.output_device = torch.device(output_device) if output_device is not None else None
        if short_axis not in ("center", "start"):
            raise ValueError(f"short_axis must be 'center' or 'start', got {short_axis!r}")
        self.short_axis = short_axis
        if memory_format not in ("auto", "preserve", "channels_last_3d"):
            raise ValueError(f"memory_format must be 'auto', 'preserve' or 'channels_last_3d', got {memory_format!r}")
        self.memory_format = memory_format
        self.last_info: dict = {}
        self._weights: dict = {}

    # -- helpers --------------------------------------------------------------------------------
    def _weight(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._weights:
            self._weights[key] = importance_map(self.patch_size, self.mode, self.sigma_scale, device)
        return self._weights[key]

    def _autocast(self, device: torch.device):
        if not self.amp:
            return nullcontext()
        dtype = self.amp if isinstance(self.amp, torch.dtype) else (
            torch.float16 if device.type == "cuda" else torch.bfloat16)
        return torch.autocast(device_type=device.type, dtype=dtype)

    def _decide(self, c_out: int, padded, device: torch.device) -> tuple[str, int]:
        nbytes = (c_out + 1) * int(np.prod(padded)) * 4
        if self.accumulate_on == "cpu":
            return "cpu", nbytes
        if self.accumulate_on == "device":
            return "device", nbytes
        limit = self.max_device_bytes
        if limit is None:
            limit = 0.5 * _free_device_bytes(device)
        return ("device" if nbytes <= limit else "cpu"), nbytes

    def _channels_last(self, model, device: torch.device) -> bool:
        """Run 3D convolutions channels-last? 'auto': for torch modules with Conv3d layers on the CPU,
        where oneDNN's channels-last 3D convolutions are about twice as fast (same numbers)."""
        if self.memory_format == "preserve" or not isinstance(model, torch.nn.Module):
            return False
        if self.memory_format == "channels_last_3d":
            return True
        return device.type == "cpu" and any(isinstance(m, torch.nn.Conv3d) for m in model.modules())

    # -- main -----------------------------------------------------------------------------------
    def __call__(self, volume, model: Callable) -> torch.Tensor:
        """Blend the model's outputs over all windows. With channels-last on, the model's 5D weights are
        converted for the call and put back in their own memory format afterwards."""
        device = self.device if self.device is not None else _model_device_dtype(model)[0]
        if not self._channels_last(model, device):
            return self._infer(volume, model, None)
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.ndim == 5]
        was_cl = {id(t): t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()
                  for t in tensors}
        model.to(memory_format=torch.channels_last_3d)
        try:
            return self._infer(volume, model, torch.channels_last_3d)
        finally:
            with torch.no_grad():  # parameters and buffers back in their own memory format
                for t in (*model.parameters(), *model.buffers()):
                    if t.ndim == 5 and not was_cl.get(id(t), False):
                        t.data = t.data.contiguous()

    @torch.no_grad()
    def _infer(self, volume, model: Callable, memory_format) -> torch.Tensor:
        if isinstance(volume, torch.Tensor):
            src_t, src_np = volume.detach(), None
        else:
            src_t, src_np = None, volume if isinstance(volume, np.ndarray) else np.asarray(volume)
            if src_np.dtype in _TORCH_VIEWABLE and src_np.ndim == 4:
                # a zero-copy tensor view (memmaps included: nothing is read until a window is cut), so
                # windows are cut with torch's multi-threaded copy; it is only ever read
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "non-writable array"
                    src_t = torch.from_numpy(src_np)
        src = src_t if src_t is not None else src_np
        if src.ndim != 4:
            raise ValueError(f"volume must be (C, I, J, K), got shape {tuple(src.shape)}; add a channel axis "
                             "(volume[None]) for a single-channel 3D array")
        n_ch, shape = int(src.shape[0]), tuple(int(s) for s in src.shape[1:])
        patch = self.patch_size
        padded = tuple(max(n, p) for n, p in zip(shape, patch))
        starts = grid_starts(shape, patch, self.overlap, self.short_axis)
        off = np.maximum(-starts.min(0), 0)  # canvas (accumulator) index = volume index + off
        mdev, mdtype = _model_device_dtype(model)
        device = self.device or mdev
        cuda = device.type == "cuda"
        if cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())

        # windows are cut into a staging buffer on the CPU (pinned and double-buffered on CUDA so the
        # next batch is cut while the previous one is copied/computed), unless the tensor is on `device`
        on_device_src = src_t is not None and src_t.device == device
        stage_dev = device if on_device_src else torch.device("cpu")
        if src_t is not None and not on_device_src and src_t.device.type != "cpu":
            src_t = src_t.cpu()
        pin = cuda and stage_dev.type == "cpu"
        n_stage = 2 if pin else 1
        stages = [torch.empty((self.batch_size, n_ch, *patch), dtype=mdtype, device=stage_dev, pin_memory=pin)
                  for _ in range(n_stage)]
        events = [None] * n_stage

        w_dev = self._weight(device)
        acc = wsum = None
        where = None
        # streaming from CUDA: weighted outputs are copied into pinned host buffers (two, alternating)
        # without blocking; a batch is added into the CPU accumulators while the GPU runs the next one
        host_out: list = [None, None]
        pending = None  # (host tensor, event, window starts) not yet added
        n_win = len(starts)
        batches = range(0, n_win, self.batch_size)
        if self.progress:
            batches = progress_bar(batches, desc="sliding window", unit="batch")
        for bi, b0 in enumerate(batches):
            win = starts[b0:b0 + self.batch_size]
            k = bi % n_stage
            if events[k] is not None:
                events[k].synchronize()  # the copy out of this staging buffer has finished
            buf = stages[k][:len(win)]
            for b, s in enumerate(win):
                self._cut(src_t, src_np, s, shape, buf[b])
            if buf.device == device:
                x = buf
            else:
                x = buf.to(device, non_blocking=pin)
                if pin:
                    events[k] = torch.cuda.Event()
                    events[k].record()
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            with self._autocast(device):
                y = model(x)
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"model must return a tensor (B, C_out, *patch), got {type(y).__name__}")
            if y.ndim != 5 or y.shape[0] != len(win) or tuple(y.shape[2:]) != patch:
                raise ValueError(f"model output has shape {tuple(y.shape)} for input {tuple(x.shape)}; the sliding "
                                 f"window needs (B, C_out, {', '.join(map(str, patch))}) -- same spatial size as the "
                                 "input patch (resample a model that changes it inside the model)")
            if y.dtype != torch.float32:
                y = y.float()
            if acc is None:
                c_out = int(y.shape[1])
                where, nbytes = self._decide(c_out, padded, device)
                acc_dev = device if where == "device" else torch.device("cpu")
                acc = torch.zeros((c_out, *padded), dtype=torch.float32, device=acc_dev)
                wsum = torch.zeros((1, *padded), dtype=torch.float32, device=acc_dev)
                w_acc = self._weight(acc_dev)
                for s in starts:  # the weight sum depends on the grid only
                    wsum[(slice(None), *self._slices(s + off))] += w_acc
            if where == "device":
                y = y.to(acc.device)
                for b, s in enumerate(win):
                    acc[(slice(None), *self._slices(s + off))].addcmul_(y[b], w_dev)
            elif not cuda:
                yw = (y * w_dev).to(acc.device)
                self._add(acc, yw, win, off)
            else:
                yw = y * w_dev
                h = host_out[bi % 2]
                if h is None:
                    h = host_out[bi % 2] = torch.empty((self.batch_size, *yw.shape[1:]), dtype=torch.float32,
                                                       pin_memory=True)
                h = h[:len(win)]
                h.copy_(yw, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                if pending is not None:
                    self._flush(acc, pending, off)
                pending = (h, ev, win)
        if pending is not None:
            self._flush(acc, pending, off)
        acc /= wsum
        del wsum
        if padded != shape:
            acc = acc[(slice(None), *(slice(int(o), int(o) + n) for o, n in zip(off, shape)))]
        out_dev = self.output_device
        if out_dev is not None and acc.device != out_dev:
            acc = acc.to(out_dev)
        if not acc.is_contiguous():
            acc = acc.contiguous()
        self.last_info = {"windows": n_win, "batches": math.ceil(n_win / self.batch_size), "device": str(device),
                          "accumulate_on": where, "accumulator_bytes": nbytes, "padded_shape": list(padded),
                          "starts_per_axis": [len(np.unique(starts[:, a])) for a in range(3)],
                          "memory_format": "channels_last_3d" if memory_format is not None else "as given"}
        return acc

    def _add(self, acc: torch.Tensor, yw: torch.Tensor, win, off):
        for b, s in enumerate(win):
            acc[(slice(None), *self._slices(s + off))] += yw[b]

    def _flush(self, acc: torch.Tensor, pending, off):
        h, ev, win = pending
        ev.synchronize()  # its device-to-host copy has landed
        self._add(acc, h, win, off)

    def _slices(self, s) -> tuple[slice, slice, slice]:
        return tuple(slice(int(a), int(a) + p) for a, p in zip(s, self.patch_size))

    def _cut(self, src_t, src_np, s, shape, dst: torch.Tensor):
        """Copy the window at start ``s`` into ``dst`` (C, *patch), ``pad_value`` outside the volume."""
        lo = [max(int(a), 0) for a in s]
        hi = [min(int(a) + p, n) for a, p, n in zip(s, self.patch_size, shape)]
        inner = tuple(slice(l - int(a), h - int(a)) for a, l, h in zip(s, lo, hi))
        full = all(h - l == p for l, h, p in zip(lo, hi, self.patch_size))
        if not full:
            dst.fill_(self.pad_value)
        region = (slice(None), *(slice(l, h) for l, h in zip(lo, hi)))
        target = dst if full else dst[(slice(None), *inner)]
        if src_t is not None:
            target.copy_(src_t[region])
        else:
            block = src_np[region]
            if target.device.type == "cpu" and target.dtype in _NP_OK:
                np.copyto(target.numpy(), block, casting="unsafe")
            else:
                target.copy_(torch.from_numpy(np.ascontiguousarray(block)))


_TORCH_VIEWABLE = {np.dtype(t) for t in (np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64,
                                         np.uint8, np.bool_)}
_NP_OK = {torch.float32, torch.float64, torch.float16, torch.int16, torch.int32, torch.int64, torch.uint8}


def predict_to_source(pred, meta, input_name: str | None = None, order: str = "nearest", fill: float = 0.0):
    """Map a prediction (C, I, J, K) on the stored grid back onto a source image's grid.

    meta: the case's meta.json (dict or path). input_name: which source input's grid (default the
    spec's reference image). order: "nearest" for label maps, "linear" for probabilities/continuous
    outputs ("onehot_linear" also works for label maps). Returns a :class:`volfm.io.Volume`.
    Geometry is :func:`volfm.preprocess.pipeline.to_source_grid`'s.
    """
    if isinstance(meta, (str, Path)):
        meta = json.loads(Path(meta).read_text())
    if isinstance(pred, torch.Tensor):
        pred = pred.detach().cpu().numpy()
    pred = np.asarray(pred)
    if pred.ndim == 3:
        pred = pred[None]
    if pred.ndim != 4:
        raise ValueError(f"prediction must be (C, I, J, K) or (I, J, K), got shape {pred.shape}")
    stored = tuple(meta.get("shape", pred.shape[1:]))
    if tuple(pred.shape[1:]) != tuple(int(s) for s in stored):
        raise ValueError(f"prediction spatial shape {pred.shape[1:]} does not match the stored grid {tuple(stored)} "
                         f"of case {meta.get('case_id', '?')}")
    return to_source_grid(pred, meta, input_name=input_name, order=order, fill=fill)
