"""QC pictures: three orthogonal slices of a stored case with its label overlaid.

Slices are shown in radiological convention for an RAS grid (patient's right on the viewer's
left, anterior and superior up) with the physical aspect ratio of the voxels.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from volfm.io import affine as geo
from volfm.io.atomic import atomic_path


def _slice_through(label: np.ndarray | None, shape) -> list[int]:
    """Slice indices through the label's centre of mass, or the volume centre without a label."""
    if label is not None and label.any():
        idx = np.argwhere(label)
        return [int(v) for v in np.round(idx.mean(axis=0))]
    return [s // 2 for s in shape]


def render_case_png(path, image: np.ndarray, affine: np.ndarray, label: np.ndarray | None = None,
                    title: str = "", vmin: float | None = None, vmax: float | None = None,
                    extra: list[tuple[str, np.ndarray]] | None = None) -> Path:
    """Write a PNG: axial, coronal, sagittal slices of ``image`` (I, J, K), label overlaid.

    extra: more (name, array) images on the same grid (e.g. paired modalities), one row each.
    """
    matplotlib.use("Agg")

    rows = [("", image)] + list(extra or [])
    sp = geo.spacing_from_affine(affine)
    ci, cj, ck = _slice_through(label, image.shape)
    fig, axes = plt.subplots(len(rows), 3, figsize=(10.5, 3.6 * len(rows)), squeeze=False)
    cmap = matplotlib.colormaps["tab10"]
    for r, (name, img) in enumerate(rows):
        lo, hi = (vmin, vmax) if r == 0 and vmin is not None else np.percentile(img, [0.5, 99.5])
        views = [  # (2D image (cols, rows) axes, label slice, row spacing / col spacing, view name)
            (img[:, :, ck], None if label is None else label[:, :, ck], sp[1] / sp[0], f"axial k={ck}"),
            (img[:, cj, :], None if label is None else label[:, cj, :], sp[2] / sp[0], f"coronal j={cj}"),
            (img[ci, :, :], None if label is None else label[ci, :, :], sp[2] / sp[1], f"sagittal i={ci}"),
        ]
        for c, (sl, lab, aspect, vname) in enumerate(views):
            ax = axes[r, c]
            ax.imshow(sl.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            if r == 0 and lab is not None and lab.any():
                over = np.ma.masked_where(lab.T == 0, lab.T % 10)
                ax.imshow(over, cmap=cmap, vmin=0, vmax=9, alpha=0.3, origin="lower", aspect=aspect,
                          interpolation="nearest")
            ax.invert_xaxis()  # radiological: patient's right (high i / high j anterior) on the left
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name + ' ' if name else ''}{vname}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def render_patch_batch_png(path, images, labels=None, titles=None, cols: int = 4) -> Path:
    """A grid of training patches: the middle axial slice of each (C, I, J, K) patch, label overlaid."""
    matplotlib.use("Agg")

    n = len(images)
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    cmap = matplotlib.colormaps["tab10"]
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= n:
            continue
        img = np.asarray(images[i])[0]
        k = img.shape[2] // 2
        ax.imshow(img[:, :, k].T, cmap="gray", origin="lower", interpolation="nearest")
        if labels is not None:
            lab = np.asarray(labels[i])[0][:, :, k].T
            if lab.any():
                ax.imshow(np.ma.masked_where(lab == 0, lab % 10), cmap=cmap, vmin=0, vmax=9, alpha=0.35,
                          origin="lower", interpolation="nearest")
        ax.invert_xaxis()
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    return save_png(fig, path)


def save_png(fig, path) -> Path:
    """Lay out, write atomically as PNG and close a figure."""
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
