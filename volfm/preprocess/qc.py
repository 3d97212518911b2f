"""QC pictures: three orthogonal slices of a case with its label overlaid.

Every volume picture (the store's ``qc/<id>.png``, ``volfm predict``'s ``<name>_qc.png``) goes through
:func:`display_views`: the array is first reoriented by its affine to the closest RAS axes (nibabel's
``io_orientation``, exact axis permutations/flips, no interpolation; an oblique grid takes its closest axis codes),
then drawn in the radiological display convention whatever the input's voxel order: axial with anterior at the
top and the patient's right on the image's left, coronal with superior at the top and the patient's right on the
left, sagittal with superior at the top and anterior on the left; with the physical aspect ratio of the voxels.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from nibabel import orientations as nor

from volfm.io import affine as geo
from volfm.io.atomic import atomic_path
from volfm.preprocess.spatial import reoriented_grid

__all__ = ["display_orient", "display_views", "render_case_png", "render_patch_batch_png", "save_png"]


def _slice_through(label: np.ndarray | None, shape) -> list[int]:
    """Slice indices through the label's centre of mass, or the volume centre without a label."""
    if label is not None and label.any():
        idx = np.argwhere(label)
        return [int(v) for v in np.round(idx.mean(axis=0))]
    return [s // 2 for s in shape]


def display_orient(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (I, J, K) and its affine with the array axes permuted/flipped to run closest to R, A, S.

    Exact (a view, no interpolation); an oblique affine takes its closest axis codes (nibabel's ``io_orientation``).
    Returns the reoriented array and its affine (the same world positions).
    """
    affine = np.asarray(affine, dtype=np.float64)
    t = nor.ornt_transform(nor.io_orientation(affine), nor.axcodes2ornt(("R", "A", "S")))
    new_affine, _ = reoriented_grid(affine, np.shape(array)[:3], "RAS")
    return nor.apply_orientation(np.asarray(array), t), new_affine


def display_views(image: np.ndarray, affine: np.ndarray, label: np.ndarray | None = None,
                  extra: list[np.ndarray] | None = None) -> dict:
    """The three display slices of ``image`` (I, J, K, on the grid of ``affine``), whatever its voxel order.

    Returns ``{"views": [(name, index), ...], "aspect": [row/column spacing per view], "image": [3 2D arrays],
    "label": [3 2D arrays or None], "extra": [[3 2D arrays] per extra array]}``; every 2D array is in display order:
    row 0 at the top of the picture, column 0 on its left (axial: anterior up, patient right on the left; coronal:
    superior up, right on the left; sagittal: superior up, anterior on the left). ``label`` and ``extra`` lie on
    the same grid as ``image``; the slices go through the label's centre of mass, else the volume centre.
    """
    img, ras = display_orient(image, affine)
    lab = None if label is None else display_orient(label, affine)[0]
    others = [display_orient(e, affine)[0] for e in (extra or [])]
    sp = geo.spacing_from_affine(ras)
    ci, cj, ck = _slice_through(lab, img.shape)

    def cut(a):  # RAS slices -> display order: (R->L columns, A/S up rows), i.e. both axes reversed then transposed
        if a is None:
            return None
        return [np.ascontiguousarray(s[::-1, ::-1].T) for s in (a[:, :, ck], a[:, cj, :], a[ci, :, :])]

    return {"views": [("axial", ck), ("coronal", cj), ("sagittal", ci)],
            "aspect": [sp[1] / sp[0], sp[2] / sp[0], sp[2] / sp[1]],
            "image": cut(img), "label": cut(lab), "extra": [cut(e) for e in others]}


def render_case_png(path, image: np.ndarray, affine: np.ndarray, label: np.ndarray | None = None,
                    title: str = "", vmin: float | None = None, vmax: float | None = None,
                    extra: list[tuple[str, np.ndarray]] | None = None) -> Path:
    """Write a PNG: axial, coronal, sagittal slices of ``image`` (I, J, K), label overlaid, drawn by
    :func:`display_views` (reoriented by ``affine``, radiological convention, any voxel order).

    extra: more (name, array) images on the same grid (e.g. paired modalities), one row each.
    """
    matplotlib.use("Agg")

    extra = list(extra or [])
    v = display_views(image, affine, label, [a for _, a in extra])
    rows = [("", v["image"])] + [(n, e) for (n, _), e in zip(extra, v["extra"])]
    letter = {"axial": "k", "coronal": "j", "sagittal": "i"}
    fig, axes = plt.subplots(len(rows), 3, figsize=(10.5, 3.6 * len(rows)), squeeze=False)
    cmap = matplotlib.colormaps["tab10"]
    for r, (name, slices) in enumerate(rows):
        img = image if r == 0 else extra[r - 1][1]
        lo, hi = (vmin, vmax) if r == 0 and vmin is not None else np.percentile(img, [0.5, 99.5])
        for c, ((vname, idx), sl, aspect) in enumerate(zip(v["views"], slices, v["aspect"])):
            ax = axes[r, c]
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            lab = None if v["label"] is None else v["label"][c]
            if r == 0 and lab is not None and lab.any():
                over = np.ma.masked_where(lab == 0, lab % 10)
                ax.imshow(over, cmap=cmap, vmin=0, vmax=9, alpha=0.3, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name + ' ' if name else ''}{vname} {letter[vname]}={idx}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def render_patch_batch_png(path, images, labels=None, titles=None, cols: int = 4) -> Path:
    """A grid of training patches: the middle axial slice of each (C, I, J, K) patch, label overlaid.

    Patches carry no affine: they are drawn as cut from a store's grid assumed RAS (the orientation of every built-in
    spec), like :func:`display_views`' axial view.
    """
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
