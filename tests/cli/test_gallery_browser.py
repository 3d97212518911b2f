"""The QC gallery as a user sees it: qc/index.html of a store built by volfm preprocess, opened from file:// in
headless Chromium (Debian's ``chromium`` package; skipped where it is absent, failed instead when the environment
sets ``VOLFM_REQUIRE_CHROMIUM=1``, as .ci/run does where it has Chromium).

Checked in the DOM Chromium dumps after running the page's script: failed cases are listed first, with their
errors as text (a cohort path holding HTML tags stays text), every QC picture loaded (the page marks each <img>
``data-loaded`` on load, ``data-error`` on error), a sorted and a filtered view through the URL's hash; on a
250-case manifest, one page of rows at a time (only its cases and <img> elements exist; whether Chromium defers
the lazy ones below the window is its own business, and from file:// it loads them all); and a screenshot is not
blank (the pictures' black backgrounds are painted).
"""
import csv
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from volfm.io import Volume, write_nifti
from volfm.store.build import run_cohort

CHROMIUM = shutil.which("chromium")
REQUIRED = os.environ.get("VOLFM_REQUIRE_CHROMIUM") == "1"
pytestmark = pytest.mark.skipif(CHROMIUM is None and not REQUIRED,
                                reason="headless Chromium (Debian package chromium) not installed")
REPO = Path(__file__).resolve().parents[2]
EVIL_PATH = "bad/<marquee>x</marquee>.nii.gz"
WINDOW = (1280, 2400)


@pytest.fixture(scope="module", autouse=True)
def chromium_present():
    """With VOLFM_REQUIRE_CHROMIUM=1 a missing Chromium fails every test here (CI that installed it must run them)."""
    if CHROMIUM is None:
        pytest.fail("VOLFM_REQUIRE_CHROMIUM=1 but no chromium on PATH: install Debian's chromium "
                    "(apt-get install chromium) or unset VOLFM_REQUIRE_CHROMIUM")


def make_ct(seed, shape=(40, 40, 16), sp=(2.6, 2.6, 5.2)):
    rng = np.random.default_rng(seed)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r = (((ii - shape[0] / 2) * sp[0]) / 30) ** 2 + (((jj - shape[1] / 2) * sp[1]) / 25) ** 2 \
        + (((kk - shape[2] / 2) * sp[2]) / 30) ** 2
    img = np.where(r < 1, 40.0 + 30 * seed, -1000.0) + rng.normal(0, 10, shape)
    aff = np.diag([*sp, 1.0])
    return Volume(img[None].astype(np.float32), aff), Volume((r < 0.3).astype(np.uint8)[None], aff)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    spec = yaml.safe_load((REPO / "preprocessing" / "ct_merlin.yaml").read_text())
    spec.update(spacing=[3.0, 3.0, 6.0], crop={"size": [32, 32, 16], "mode": "center"})
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    rows = []
    for i, age in enumerate([61, 35, 70, 48]):
        img, lab = make_ct(i)
        write_nifti(img, root / f"ct{i}.nii.gz", dtype=np.int16)
        write_nifti(lab, root / f"ct{i}_label.nii.gz")
        rows.append({"case_id": f"ct{i}", "image": f"ct{i}.nii.gz", "label": f"ct{i}_label.nii.gz",
                     "split": "train" if i % 2 else "val", "age": str(age)})
    (root / "trunc.nii.gz").write_bytes((root / "ct0.nii.gz").read_bytes()[:300])
    rows += [{"case_id": "zz_trunc", "image": "trunc.nii.gz", "label": "", "split": "test", "age": "1"},
             {"case_id": "aa_missing", "image": EVIL_PATH, "label": "", "split": "test", "age": "99"}]
    with open(root / "cohort.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = run_cohort(root / "spec.yaml", root / "store", cohort=root / "cohort.csv", workers=1, progress=False)
    return Path(summary["gallery"])


def chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--run-all-compositor-stages-before-draw",  # else a screenshot may hold tiles not painted yet
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
           "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


class Dom(HTMLParser):
    """The cases (data-case, data-status) in order, every <img>'s attributes, the text of the error blocks and
    whether any <marquee> element exists."""

    def __init__(self, text: str):
        super().__init__()
        self.cases, self.imgs, self.errors, self.marquee, self.ready = [], [], [], False, False
        self._in_error = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.ready = a.get("data-ready") == "1"
        if tag == "article":
            self.cases.append((a.get("data-case"), a.get("data-status")))
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "pre" and "error" in (a.get("class") or ""):
            self._in_error = True
            self.errors.append("")
        elif tag == "marquee":
            self.marquee = True

    def handle_endtag(self, tag):
        if tag == "pre":
            self._in_error = False

    def handle_data(self, data):
        if self._in_error:
            self.errors[-1] += data


def dump(tmp_path, page: Path, fragment: str = "") -> Dom:
    res = chromium(tmp_path, "--dump-dom", page.as_uri() + fragment)
    dom = Dom(res.stdout)
    assert dom.ready, f"the page's script did not run: {res.stderr[-2000:]}"
    return dom


def test_failed_cases_first_and_every_picture_loads(page, tmp_path):
    dom = dump(tmp_path, page)
    assert dom.cases[:2] == [("aa_missing", "failed"), ("zz_trunc", "failed")]
    assert sorted(dom.cases[2:]) == [(f"ct{i}", "ok") for i in range(4)]
    assert len(dom.imgs) == 4
    assert all(i.get("data-loaded") == "1" and "data-error" not in i for i in dom.imgs), dom.imgs
    assert all(i.get("loading") == "lazy" for i in dom.imgs)
    assert {i["src"] for i in dom.imgs} == {f"ct{i}.png" for i in range(4)}
    # the error names the cohort's path as text, tags and all; no element is made of it
    assert any(EVIL_PATH in e and "file not found" in e for e in dom.errors), dom.errors
    assert not dom.marquee


def test_sorted_and_filtered_views(page, tmp_path):
    dom = dump(tmp_path, page, "#sort=age&dir=asc")
    assert [c for c, _ in dom.cases] == ["aa_missing", "zz_trunc", "ct1", "ct3", "ct0", "ct2"]  # failed still first
    dom = dump(tmp_path, page, "#status=ok&split=train")
    assert sorted(dom.cases) == [("ct1", "ok"), ("ct3", "ok")]


@pytest.fixture(scope="module")
def big_page(tmp_path_factory) -> Path:
    """The gallery of a 250-case manifest (no case folders: no statistics, so the order is by case id), each case
    with a QC picture (one small PNG, linked 250 times)."""
    import matplotlib.image as mpimg

    from volfm.store.gallery import write_gallery

    root = tmp_path_factory.mktemp("big") / "store"
    (root / "qc").mkdir(parents=True)
    (root / "spec.yaml").write_text(yaml.safe_dump({"spec": {"name": "fake"}, "spec_hash": "0"}))
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "status", "error", "shape", "spacing", "elapsed_s", "warnings", "split"])
        for i in range(250):
            w.writerow([f"c{i:03d}", "ok", "", "32x32x16", "3x3x6", "0.5", "", "train"])
    mpimg.imsave(root / "qc" / "c000.png", np.zeros((40, 120)), cmap="gray")
    for i in range(1, 250):
        os.link(root / "qc" / "c000.png", root / "qc" / f"c{i:03d}.png")
    return write_gallery(root)


def test_one_page_of_cases_and_pictures_at_a_time(big_page, tmp_path):
    dom = dump(tmp_path, big_page)  # 100 per page by default
    assert [c for c, _ in dom.cases] == [f"c{i:03d}" for i in range(100)]
    assert [i["src"] for i in dom.imgs] == [f"c{i:03d}.png" for i in range(100)]  # no <img> of another page
    assert all(i.get("loading") == "lazy" and "data-error" not in i for i in dom.imgs)
    dom = dump(tmp_path, big_page, "#page=3&size=100")
    assert [c for c, _ in dom.cases] == [f"c{i:03d}" for i in range(200, 250)]
    assert [i["src"] for i in dom.imgs] == [f"c{i:03d}.png" for i in range(200, 250)]
    dom = dump(tmp_path, big_page, "#size=50&page=2")
    assert [i["src"] for i in dom.imgs] == [f"c{i:03d}.png" for i in range(50, 100)]


def test_screenshot_is_not_blank(page, tmp_path):
    import matplotlib.image as mpimg

    shot = tmp_path / "gallery.png"
    res = chromium(tmp_path, f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    im = mpimg.imread(shot)[..., :3]
    assert im.shape[:2] == (WINDOW[1], WINDOW[0])
    lum = im.mean(axis=2)
    assert lum.std() > 0.1
    assert (lum < 0.05).mean() > 0.02  # the QC pictures' black backgrounds
    assert (np.abs(im[..., 0] - im[..., 2]) > 0.2).mean() > 1e-3  # colour: label overlay, failed cases in red
