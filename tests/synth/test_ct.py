"""Tests of the synthetic CT phantom cohort (volfm.synth.ct)."""
import csv
import re

import numpy as np
import pytest
import simple_icd_10_cm as icd

from volfm.io import read_volume
from volfm.io.affine import axcodes, voxel_to_world, world_to_voxel
from volfm.synth.ct import (
    FINDINGS,
    HISTORY_CODES,
    LABEL_IDS,
    LABELS,
    REPORT_SECTIONS,
    assign_splits,
    make_ct_case,
    make_ct_cohort,
)

SMALL = (64, 64, 32)

# Positive mentions (searched in the IMPRESSION) and negations (searched in the finding's section).
POSITIVE = {
    "hepatomegaly": r"hepatomegaly|enlarged liver|liver is enlarged",
    "splenomegaly": r"splenomegaly|enlarged spleen|spleen is enlarged",
    "fatty_liver": r"steatosis|fatty",
    "renal_cyst": r"renal cyst",
    "kidney_stone": r"nephrolithiasis|renal calcul|kidney stone",
    "gallstone": r"cholelithiasis|gallstone",
    "pleural_effusion": r"pleural effusion",
    "ascites": r"ascites",
    "lung_nodule": r"nodule",
    "atelectasis": r"atelectasis",
    "aortic_aneurysm": r"aneurysm",
}
# Positive mentions in the finding's own section (wording differs from the impression).
IN_SECTION = dict(POSITIVE, hepatomegaly=r"hepatomegaly|enlarged", splenomegaly=r"splenomegaly|enlarged",
                  renal_cyst=r"cyst", kidney_stone=r"nephrolithiasis|calcul|stone")
NEGATIVE = {
    "hepatomegaly": r"normal in size|normal liver size|not enlarged",
    "splenomegaly": r"normal in size|normal spleen size|no splenomegaly",
    "fatty_liver": r"normal (hepatic )?attenuation|no hepatic steatosis",
    "renal_cyst": r"\bno\b[^.]*(cyst|lesion)",
    "kidney_stone": r"\bno\b[^.]*(calculi|nephrolithiasis|stones)",
    "gallstone": r"\b(no|without)\b[^.]*(gallstones|cholelithiasis)",
    "pleural_effusion": r"\bno\b[^.]*pleural effusion",
    "ascites": r"\bno\b[^.]*(ascites|free[^.]*fluid)",
    "lung_nodule": r"\bno\b[^.]*nodule",
    "atelectasis": r"\b(no|without)\b[^.]*atelectasis",
    "aortic_aneurysm": r"normal in caliber|normal caliber|no abdominal aortic aneurysm",
}


def _sections(report: str) -> dict:
    out = {}
    for line in report.splitlines():
        head, _, body = line.partition(":")
        out[head.strip()] = body.strip().lower()
    return out


def _centroid(case, value):
    lab = case["label"].array[0]
    return voxel_to_world(case["label"].affine, np.argwhere(lab == value)).mean(axis=0)


def _pair(name, seed=3):
    """Same case without findings and with only ``name``."""
    return make_ct_case(seed, "t", SMALL, findings=()), make_ct_case(seed, "t", SMALL, findings=[name])


def _arrays(case):
    return case["image"].array[0].astype(np.float64), case["label"].array[0]


def test_codes_are_valid_icd10cm_and_distinct():
    codes = [spec.code for spec in FINDINGS.values()] + list(HISTORY_CODES)
    assert len(set(codes)) == len(codes)
    for code in codes:
        assert icd.is_valid_item(code), code
    assert [FINDINGS[n].code for n in ("hepatomegaly", "gallstone", "aortic_aneurysm")] == ["R16.0", "K80.20", "I71.40"]
    assert LABELS[0] == "background" and LABEL_IDS["liver"] == 1 and len(LABELS) == 10


def test_deterministic_for_a_seed():
    a = make_ct_case(11, "c", SMALL)
    b = make_ct_case(11, "c", SMALL)
    np.testing.assert_array_equal(a["image"].array, b["image"].array)
    np.testing.assert_array_equal(a["label"].array, b["label"].array)
    np.testing.assert_array_equal(a["image"].affine, b["image"].affine)
    assert (a["report"], a["icd_codes"], a["findings"], a["sex"], a["age"]) == \
        (b["report"], b["icd_codes"], b["findings"], b["sex"], b["age"])
    c = make_ct_case(np.random.default_rng(4), "c", SMALL)
    d = make_ct_case(np.random.default_rng(4), "c", SMALL)
    np.testing.assert_array_equal(c["image"].array, d["image"].array)
    assert not np.array_equal(a["image"].array, c["image"].array)


def test_volumes_dtypes_and_hu_ranges():
    case = make_ct_case(2, "c", SMALL, findings=())
    img, lab = _arrays(case)
    assert case["image"].array.dtype == np.int16 and case["label"].array.dtype == np.uint8
    assert case["image"].shape == SMALL and np.array_equal(case["image"].affine, case["label"].affine)
    assert set(np.unique(lab)) <= set(LABELS) and len(np.unique(lab)) >= 9
    assert img[lab == 0].min() < -950                       # air
    assert img[(lab == 5) | (lab == 6)].mean() < -650         # lungs
    assert img[lab == 8].mean() > 250                         # bone
    assert 20 < img[lab == 1].mean() < 130                    # liver
    assert case["sex"] in ("M", "F") and 18 <= case["age"] <= 95


def test_default_grid_spacing_and_fov():
    case = make_ct_case(0, "c", orientation="RAS", oblique_deg=0)
    sp = case["image"].spacing
    assert case["image"].shape == (128, 128, 64)
    assert 2.3 <= sp[0] <= 3.0 and 2.3 <= sp[1] <= 3.0 and 3.5 <= sp[2] <= 5.5
    body = case["image"].array[0] > -500
    centre = voxel_to_world(case["image"].affine, (np.array(case["image"].shape) - 1) / 2)
    body_centre = voxel_to_world(case["image"].affine, np.argwhere(body)).mean(axis=0)
    assert np.all(np.abs(centre[:2] - body_centre[:2]) < 30)


def test_icd_codes_map_one_to_one_to_findings():
    seen = set()
    for seed in range(6):
        case = make_ct_case(seed, "c", SMALL)
        codes = case["icd_codes"]
        assert len(codes) == len(set(codes))
        finding_codes = [c for c in codes if c not in HISTORY_CODES]
        assert sorted(finding_codes) == sorted(FINDINGS[n].code for n in case["findings"])
        assert len(codes) - len(finding_codes) <= 2
        assert all(icd.is_valid_item(c) for c in codes)
        seen.update(case["findings"])
    assert len(seen) >= 5  # the default probabilities give a mix of findings


@pytest.mark.parametrize("seed,findings", [(1, None), (2, None), (5, ()), (6, tuple(FINDINGS))])
def test_report_mentions_present_and_negates_absent(seed, findings):
    case = make_ct_case(seed, "c", SMALL, findings=findings)
    report = case["report"]
    sec = _sections(report)
    assert list(sec)[:2] == ["TECHNIQUE", "FINDINGS"] and "IMPRESSION" in sec
    assert all(s in sec for s in REPORT_SECTIONS)
    for name, spec in FINDINGS.items():
        if name in case["findings"]:
            assert re.search(POSITIVE[name], sec["IMPRESSION"]), (name, report)
            assert re.search(IN_SECTION[name], sec[spec.section]), (name, sec[spec.section])
        else:
            assert not re.search(POSITIVE[name], sec["IMPRESSION"]), (name, report)
            assert re.search(NEGATIVE[name], sec[spec.section]), (name, sec[spec.section])
    if not case["findings"]:
        assert "1." in sec["IMPRESSION"] and len(sec["IMPRESSION"]) < 60


def test_report_measurements_match_phantom():
    case = make_ct_case(6, "c", SMALL, findings=tuple(FINDINGS))
    d, text = case["metadata"]["details"], case["report"]
    assert f"{round(d['renal_cyst']['diameter_mm'] / 10, 1)} cm" in text
    assert f"{int(round(d['kidney_stone']['diameter_mm']))} mm" in text
    assert f"{round(d['aortic_aneurysm']['diameter_mm'] / 10, 1)} cm" in text
    assert f"{int(round(d['lung_nodule']['diameter_mm']))} mm" in text
    assert 40 <= d["aortic_aneurysm"]["diameter_mm"] <= 60 and 15 <= d["renal_cyst"]["diameter_mm"] <= 30


def test_hepatomegaly_and_splenomegaly_grow_the_organ():
    for name, label, factor in (("hepatomegaly", 1, 1.2), ("splenomegaly", 2, 1.3)):
        base, case = _pair(name)
        _, bl = _arrays(base)
        _, fl = _arrays(case)
        assert (fl == label).sum() > factor * (bl == label).sum(), name
    base, case = _pair("hepatomegaly")
    assert case["metadata"]["details"]["liver_span_cm"] > 1.2 * base["metadata"]["details"]["liver_span_cm"]


def _world_z(case, mask):
    """World z (superior, mm) of the voxel centres in ``mask``."""
    return voxel_to_world(case["label"].affine, np.argwhere(mask))[:, 2]


def _si_axis(case):
    return int(np.argmax(np.abs(case["label"].affine[2, :3])))  # array axis closest to S-I


def _cohort_pairs(n=20):
    """(normal, hepatomegaly + splenomegaly) cases of seeds 0..n-1; every 5th forced oblique (12 deg)."""
    out = []
    for seed in range(n):
        kw = {"orientation": "PIR", "oblique_deg": 12.0} if seed % 5 == 0 else {}
        out.append((make_ct_case(seed, "c", SMALL, findings=(), **kw),
                    make_ct_case(seed, "c", SMALL, findings=("hepatomegaly", "splenomegaly"), **kw)))
    return out


@pytest.fixture(scope="module")
def pairs():
    return _cohort_pairs()


def test_liver_and_spleen_stay_inside_the_volume(pairs):
    for normal, enlarged in pairs:
        for case in (normal, enlarged):
            lab = case["label"].array[0]
            sh = np.array(lab.shape)
            corners = np.array([[i, j, k] for i in (0, sh[0] - 1) for j in (0, sh[1] - 1) for k in (0, sh[2] - 1)])
            vol_z = voxel_to_world(case["label"].affine, corners)[:, 2]
            ax = _si_axis(case)
            for value in (LABEL_IDS["liver"], LABEL_IDS["spleen"]):
                m = np.moveaxis(lab == value, ax, 0)
                assert m.any() and not m[0].any() and not m[-1].any(), (case["findings"], value)
                z = _world_z(case, lab == value)
                assert vol_z.min() < z.min() and z.max() < vol_z.max()


def test_enlarged_organs_separate_from_normal_ones(pairs):
    """Measured from the label (world mm) and as reported: every enlarged organ exceeds every normal one."""
    span = {False: [], True: []}
    for normal, enlarged in pairs:
        for case, big in ((normal, False), (enlarged, True)):
            lab, d = case["label"].array[0], case["metadata"]["details"]
            tol = 4.0 + 2 * case["label"].spacing[_si_axis(case)]  # dome clipping + a voxel at each end
            measured = []
            for value, key in ((LABEL_IDS["liver"], "liver_span_cm"), (LABEL_IDS["spleen"], "spleen_length_cm")):
                z = _world_z(case, lab == value)
                measured.append(z.max() - z.min())
                assert -2.0 < 10 * d[key] - measured[-1] < tol, (key, d[key], measured[-1])
            span[big].append(measured + [d["liver_span_cm"], d["spleen_length_cm"]])
    normal, big = np.array(span[False]), np.array(span[True])
    assert np.all(big[:, :2].min(axis=0) > normal[:, :2].max(axis=0) + 10.0), (normal.max(0), big.min(0))
    assert normal[:, 2].max() <= 16.0 and big[:, 2].min() >= 18.0       # liver span, cm
    assert normal[:, 3].max() <= 11.5 and big[:, 3].min() >= 14.0       # spleen length, cm
    for case in (c for pair in pairs for c in pair):  # any size the report quotes is the drawn one
        d, sec = case["metadata"]["details"], _sections(case["report"])
        for section, key in (("LIVER AND BILIARY", "liver_span_cm"), ("SPLEEN", "spleen_length_cm")):
            assert all(float(x) == d[key] for x in re.findall(r"(\d+(?:\.\d+)?) cm", sec[section]))


def test_body_fits_the_336_mm_in_plane_crop(pairs):
    for normal, _ in pairs:
        img = normal["image"].array[0]
        affine = normal["image"].affine
        body = voxel_to_world(affine, np.argwhere(img > -500))
        centre = voxel_to_world(affine, (np.array(img.shape) - 1) / 2)  # the centre crop is centred here
        width = body[:, 0].max() - body[:, 0].min()
        assert width < 336.0, width
        assert np.abs(body[:, :2] - centre[:2]).max() < 168.0


def test_fatty_liver_lowers_liver_attenuation_below_spleen():
    for seed in (3, 4):
        base, case = _pair("fatty_liver", seed)
        bi, bl = _arrays(base)
        fi, fl = _arrays(case)
        assert np.array_equal(bl, fl)
        assert bi[bl == 1].mean() - fi[fl == 1].mean() > 30
        assert fi[fl == 1].mean() < fi[fl == 2].mean() - 15


@pytest.mark.parametrize("name,organ", [("renal_cyst", "kidney"), ("kidney_stone", "kidney"),
                                        ("gallstone", "gallbladder"), ("lung_nodule", "lung")])
def test_focal_lesions_sit_in_their_organ(name, organ):
    for seed in (3, 8):
        base, case = _pair(name, seed)
        d = case["metadata"]["details"][name]
        img, lab = _arrays(case)
        i, j, k = np.rint(world_to_voxel(case["image"].affine, d["centre_ras"])).astype(int)
        value = LABEL_IDS[f"{organ}_{d['side']}"] if "side" in d else LABEL_IDS[organ]
        assert lab[i, j, k] == value, (name, seed)
        # voxels whose centre lies in the inner 60% of the lesion sphere (at least the nearest voxel)
        world = voxel_to_world(case["image"].affine, np.indices(img.shape).reshape(3, -1).T)
        dist = np.linalg.norm(world - np.asarray(d["centre_ras"]), axis=1).reshape(img.shape)
        core = dist <= max(0.3 * d["diameter_mm"], dist.min() + 1e-6)
        if name == "renal_cyst":
            assert img[core].mean() < min(60.0, _arrays(base)[0][core].mean() - 10)
        elif name == "kidney_stone":
            assert ((img > 500) & (lab == value)).sum() >= 2 and img[i, j, k] > 500
            assert not ((_arrays(base)[0] > 500) & (_arrays(base)[1] == value)).any()
        elif name == "gallstone":
            assert ((img > 200) & (lab == value)).sum() >= 2 and img[i, j, k] > 200
        else:
            assert img[core].mean() > -300 and _arrays(base)[0][core].mean() < -400


def test_pleural_effusion_replaces_posterior_lung_with_fluid():
    base, case = _pair("pleural_effusion")
    bi, bl = _arrays(base)
    fi, fl = _arrays(case)
    lung_b, lung_f = np.isin(bl, (5, 6)), np.isin(fl, (5, 6))
    assert lung_f.sum() < 0.95 * lung_b.sum()
    fluid = lung_b & (fl == 0)
    assert -250 < np.median(fi[fluid]) < 60
    # dependent: the fluid is posterior to the remaining lung
    post = voxel_to_world(case["image"].affine, np.argwhere(fluid))[:, 1].mean()
    assert post < voxel_to_world(case["image"].affine, np.argwhere(lung_f))[:, 1].mean()


def test_atelectasis_densifies_lung_base():
    base, case = _pair("atelectasis")
    bi, bl = _arrays(base)
    fi, fl = _arrays(case)
    lung = np.isin(bl, (5, 6))
    assert np.array_equal(bl, fl)
    assert fi[lung].mean() > bi[lung].mean() + 10
    assert ((fi > -300) & lung).sum() > 2 * ((bi > -300) & lung).sum() + 20


def test_ascites_adds_fluid_outside_organs():
    base, case = _pair("ascites")
    bi, bl = _arrays(base)
    fi, fl = _arrays(case)
    changed = (np.abs(fi - bi) > 40) & (fl == 0)
    assert changed.sum() > 500
    assert -15 < fi[changed].mean() < 35


def test_aortic_aneurysm_enlarges_aorta():
    base, case = _pair("aortic_aneurysm")
    _, bl = _arrays(base)
    _, fl = _arrays(case)
    assert (fl == 7).sum() > 1.3 * (bl == 7).sum()
    # widest aortic cross-section (in world mm^2, along any grid) ~ 40-60 mm diameter
    sp = case["label"].spacing
    axis = int(np.argmax(np.abs(case["label"].affine[2, :3])))  # array axis closest to S-I
    other = [a for a in range(3) if a != axis]
    def widest(lab):
        return 2 * np.sqrt((lab == 7).sum(axis=tuple(other)).max() * sp[other[0]] * sp[other[1]] / np.pi)

    reported = case["metadata"]["details"]["aortic_aneurysm"]["diameter_mm"]
    assert abs(widest(fl) - reported) < 8 and widest(fl) > 1.5 * widest(bl)


@pytest.mark.parametrize("seed", [4, 9])
def test_labels_land_at_the_same_world_place_in_every_orientation(seed):
    cents = []
    for orient, tilt in (("RAS", 0), ("LPS", 0), ("ASL", 0), ("PIR", 7), ("LAS", -9)):
        case = make_ct_case(seed, "c", SMALL, findings=(), orientation=orient, oblique_deg=tilt)
        if tilt == 0:
            assert axcodes(case["image"].affine) == orient
        else:
            assert case["image"].is_oblique
        c = {name: _centroid(case, v) for v, name in LABELS.items() if v}
        # RAS+: +x is the patient's right, +y anterior, +z superior.
        assert c["liver"][0] > c["spleen"][0]
        assert c["kidney_right"][0] > c["kidney_left"][0] and c["lung_right"][0] > c["lung_left"][0]
        assert c["aorta"][1] > c["spine"][1]
        assert min(c["lung_left"][2], c["lung_right"][2]) > max(c["kidney_left"][2], c["kidney_right"][2])
        cents.append(np.array([c[n] for n in ("liver", "spleen", "kidney_left", "kidney_right", "gallbladder")]))
    spread = np.abs(np.array(cents) - cents[0]).max()
    assert spread < 6.0, spread


def test_splits_are_deterministic_and_about_70_15_15():
    s = assign_splits(20, seed=3)
    assert s == assign_splits(20, seed=3)
    assert (s.count("train"), s.count("val"), s.count("test")) == (14, 3, 3)
    assert set(assign_splits(4, seed=0)) == {"train", "val", "test"}


def test_cohort_csv_round_trip(tmp_path):
    csv_path = make_ct_cohort(tmp_path / "ct", 4, seed=7, shape=SMALL, progress=False)
    assert csv_path == tmp_path / "ct" / "cohort.csv"
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert list(rows[0]) == ["case_id", "image", "label", "icd_codes", "report", "findings", "split", "sex", "age"]
    assert (tmp_path / "ct" / "labels.json").exists()
    for row in rows:
        image = read_volume(csv_path.parent / row["image"])
        label = read_volume(csv_path.parent / row["label"], dtype=None)
        assert not row["image"].startswith("/") and row["image"].startswith("images/")
        assert image.shape == SMALL and label.array.dtype == np.uint8
        assert set(np.unique(label.array)) <= set(LABELS)
        np.testing.assert_allclose(image.affine, label.affine, atol=1e-4)
        assert image.array.min() >= -1024 and image.array.max() > 300
        codes = row["icd_codes"].split(";") if row["icd_codes"] else []
        names = row["findings"].split(";") if row["findings"] else []
        assert sorted(c for c in codes if c not in HISTORY_CODES) == sorted(FINDINGS[n].code for n in names)
        assert "\n" in row["report"] and "IMPRESSION:" in row["report"]
        assert row["split"] in ("train", "val", "test") and row["sex"] in ("M", "F") and int(row["age"]) > 0
    # same seed -> same cohort, whatever the number of workers
    again = make_ct_cohort(tmp_path / "ct2", 4, seed=7, shape=SMALL, progress=False, workers=2)
    assert again.read_text() == csv_path.read_text()
    a = read_volume(csv_path.parent / rows[2]["image"]).array
    b = read_volume(again.parent / rows[2]["image"]).array
    np.testing.assert_array_equal(a, b)
