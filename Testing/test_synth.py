"""Synthetic anomalies: exact masks, per-contrast appearance, determinism, geometry, cohorts and tissue maps.

Everything runs on the 2 mm template grid (and one 1 mm CLI run), made from the bundled nilearn template.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from BrainAnomalyLib.synth.demo import head_motion, oblique_grid
from BrainAnomalyLib.core.errors import BadInputError, Cancelled
from BrainAnomalyLib.core.io import same_geometry, write_volume
from BrainAnomalyLib.core.manifest import Case, read_manifest, write_manifest
from BrainAnomalyLib.core.progress import CancelToken, Reporter
from BrainAnomalyLib.synth import (ARTEFACT_KINDS, LESION_KINDS, TissueMaps, cohort_key, displacement_image,
                                   fractal_noise, kept_cohort, make_cohort, synthesize, warp)
from BrainAnomalyLib.synth import cohort as cohort_module
from BrainAnomalyLib.core.template import Grid, template_1mm, template_on_grid

GRID = Grid()
_CACHE: dict = {}


@pytest.fixture(scope="module")
def scan() -> sitk.Image:
    return sitk.Cast(template_on_grid(GRID, "T1") * 1000.0, sitk.sitkFloat32)


@pytest.fixture(scope="module")
def tissue() -> TissueMaps:
    return TissueMaps.from_template(GRID)


def make(scan, tissue, kind, modality="T1", seed=0):
    key = (kind, modality, seed)
    if key not in _CACHE:
        _CACHE[key] = synthesize(scan, modality, kind, seed, tissue)
    return _CACHE[key]


def arrays(case):
    return sitk.GetArrayFromImage(case.image), sitk.GetArrayFromImage(case.mask)


def baseline(scan, tissue, case):
    """What the output must equal outside the mask: the input, or for a tumour the input after mass effect."""
    before = sitk.GetArrayFromImage(scan)
    return before if case.displacement is None else warp(before, case.displacement, tissue.geometry)


# ------------------------------------------------------------------------------------------------ noise

def test_fractal_noise_is_seeded_bounded_and_smooth():
    a = fractal_noise((40, 50, 30), np.random.default_rng(3), (6.0, 4.0, 5.0))
    b = fractal_noise((40, 50, 30), np.random.default_rng(3), (6.0, 4.0, 5.0))
    c = fractal_noise((40, 50, 30), np.random.default_rng(4), (6.0, 4.0, 5.0))
    assert a.dtype == np.float32 and a.shape == (40, 50, 30)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0 and np.abs(a).max() == pytest.approx(1.0)
    # Smooth at the requested scale: neighbours are strongly correlated.
    assert np.corrcoef(a[:, :, :-1].ravel(), a[:, :, 1:].ravel())[0, 1] > 0.8
    big = fractal_noise((200, 200, 200), np.random.default_rng(0), 16.0)  # under 1 s on an idle core
    assert big.shape == (200, 200, 200) and big.dtype == np.float32


# ------------------------------------------------------------------------------------------------ lesions

@pytest.mark.parametrize("kind", LESION_KINDS)
def test_lesion_changes_exactly_its_mask(scan, tissue, kind):
    case = make(scan, tissue, kind)
    after, mask = arrays(case)
    before = baseline(scan, tissue, case)
    lesion = mask > 0
    assert mask.dtype == np.uint8 and lesion.sum() > 0
    assert np.array_equal(after[~lesion], before[~lesion])
    assert np.array_equal(after[~tissue.brain], sitk.GetArrayFromImage(scan)[~tissue.brain])
    assert not (lesion & ~tissue.brain).any()
    assert (after[lesion] != before[lesion]).mean() > 0.95
    assert same_geometry(case.image, scan) and same_geometry(case.mask, scan)
    assert case.image.GetPixelID() == sitk.sitkFloat32 and case.mask.GetPixelID() == sitk.sitkUInt8
    rec = case.records[0]
    assert rec["kind"] == kind and rec["seed"] == 0 and rec["volume_ml"] > 0 and len(rec["centre_ras"]) == 3
    assert rec["volume_ml"] == pytest.approx(lesion.sum() * 8 / 1000, abs=1e-3)
    json.dumps(rec)  # records go to synth.json


def test_tumour_mass_effect_is_recorded_in_itk_convention(scan, tissue):
    case = make(scan, tissue, "tumour")
    after, mask = arrays(case)
    u = case.displacement
    assert u.shape == mask.shape + (3,)
    # Resampling through sitk's own displacement transform reproduces the warp outside the lesion.
    moved = sitk.Resample(scan, scan, sitk.DisplacementFieldTransform(displacement_image(case)), sitk.sitkLinear,
                          0.0, sitk.sitkFloat32)
    outside = mask == 0
    assert np.abs(sitk.GetArrayFromImage(moved)[outside] - after[outside]).max() < 1e-2
    rec = case.records[0]
    size = np.sqrt((u.astype(np.float64) ** 2).sum(axis=-1))
    assert rec["displacement_max_mm"] == pytest.approx(size.max(), abs=1e-3) and size.max() > 1.0
    # Zero beyond the support and outside the brain; clearly non-zero in the ring around the tumour.
    geo = tissue.geometry
    seed_lps = np.array([-1, -1, 1]) * np.array(rec["seed_centre_ras"])
    points = geo.points(np.argwhere(np.ones(mask.shape, bool))).reshape(mask.shape + (3,))
    dist = np.linalg.norm(points - seed_lps, axis=-1)
    support = rec["mass_effect"]["support_mm"]
    assert size[dist > support + 1e-3].max() == 0 and size[~tissue.brain].max() == 0
    ring = (dist > 0.3 * support) & (dist < 0.6 * support) & (tissue.depth_mm > 10)
    assert np.median(size[ring]) > 0.5
    # u points towards the centre: tissue there was pushed outwards.
    inward = ((seed_lps - points)[ring] * u[ring]).sum(axis=-1)
    assert (inward >= 0).mean() > 0.99
    assert set(np.unique(mask)) == {0, 1, 2, 4}


# Mean after vs mean before (input, or warped input for the tumour) inside one label, and vs the scan's WM median.
RULES = [("blob-hyper", "T1", 1, "brighter"), ("blob-hypo", "T2", 1, "darker"),
         ("ms", "FLAIR", 1, "above-wm"), ("ms", "T2", 1, "above-wm"), ("ms", "T1", 1, "below-wm"),
         ("tumour", "T1", 1, "darker"), ("tumour", "T1CE", 1, "darker"), ("tumour", "T1CE", 4, "above-wm"),
         ("tumour", "T2", 1, "above-wm"), ("tumour", "FLAIR", 2, "above-wm"), ("tumour", "T1", 2, "below-wm"),
         ("stroke", "T1", 1, "darker"), ("stroke", "FLAIR", 1, "brighter"), ("stroke", "T2", 1, "above-wm")]


@pytest.mark.parametrize("kind,modality,label,relation", RULES)
def test_appearance_follows_the_modality_rules(scan, tissue, kind, modality, label, relation):
    case = make(scan, tissue, kind, modality)
    after, mask = arrays(case)
    before = baseline(scan, tissue, case)
    region = mask == label
    assert region.sum() > 0
    mean_after, mean_before = after[region].mean(), before[region].mean()
    wm = case.records[0]["tissue_stats"]["wm"]
    if relation == "brighter":
        assert mean_after > mean_before
    elif relation == "darker":
        assert mean_after < mean_before
    elif relation == "above-wm":
        assert mean_after > wm and mean_after > mean_before
    else:
        assert mean_after < wm


def test_iso_blob_keeps_the_mean_but_changes_the_texture(scan, tissue):
    case = make(scan, tissue, "blob-iso")
    after, mask = arrays(case)
    before = sitk.GetArrayFromImage(scan)
    lesion = mask > 0
    iqr = case.records[0]["tissue_stats"]["iqr"]
    assert abs(after[lesion].mean() - before[lesion].mean()) < 0.05 * iqr
    assert (after[lesion] - before[lesion]).std() > 0.5 * iqr


def test_same_seed_same_case_other_seed_differs(scan, tissue):
    for kind in ("tumour", "ms", "blob-hyper", "artefact-motion"):
        a, b = synthesize(scan, "FLAIR", kind, 7, tissue), synthesize(scan, "FLAIR", kind, 7, tissue)
        c = synthesize(scan, "FLAIR", kind, 8, tissue)
        (ia, ma), (ib, mb), (ic, _) = arrays(a), arrays(b), arrays(c)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb) and a.records == b.records
        assert not np.array_equal(ia, ic)


def test_ms_lesions_lie_in_periventricular_white_matter(scan, tissue):
    for seed in range(3):
        case = make(scan, tissue, "ms", "FLAIR", seed)
        lesion = arrays(case)[1] > 0
        assert 3 <= case.records[0]["n_lesions"] <= 8
        assert (tissue.wm[lesion] > 0.5).mean() > 0.7
        assert np.median(tissue.ventricle_distance_mm[lesion]) < 15.0
        # Small lesions: none bigger than an 8 mm ball (plus noise), each well under a millilitre.
        labels, n = ndimage.label(lesion)
        assert 1 <= n and np.bincount(labels.ravel())[1:].max() * 8 / 1000 < 0.6


def test_stroke_stays_in_one_hemisphere_and_reaches_the_cortex(scan, tissue):
    case = make(scan, tissue, "stroke", "FLAIR")
    lesion = arrays(case)[1] > 0
    geo = tissue.geometry
    ras_x = -geo.points(np.argwhere(lesion))[:, 0]
    right = case.records[0]["hemisphere"] == "right"
    assert ((ras_x > 0) == right).all()
    assert (tissue.gm[lesion] > 0.5).mean() > 0.1 and (tissue.depth_mm[lesion] < 6).any()


# ------------------------------------------------------------------------------------------------ artefacts

@pytest.mark.parametrize("kind", ARTEFACT_KINDS)
def test_artefacts_have_an_empty_mask_and_change_the_image(scan, tissue, kind):
    case = make(scan, tissue, kind)
    after, mask = arrays(case)
    before = sitk.GetArrayFromImage(scan)
    assert case.is_artefact and not mask.any() and case.records[0]["volume_ml"] == 0
    assert same_geometry(case.image, scan) and same_geometry(case.mask, scan)
    brain = tissue.brain
    assert np.abs(after[brain] - before[brain]).mean() > 0.005 * before[brain].mean()
    if kind == "artefact-ghosting":
        assert after[~brain].max() > 0.05 * before.max()  # the ghost lands outside the head


# ------------------------------------------------------------------------------------------------ geometry

def test_every_kind_keeps_an_oblique_anisotropic_geometry():
    grid = oblique_grid(template_on_grid(GRID, "T1"), (8.0, -5.0, 12.0), (2.2, 2.0, 2.6), (6.0, -5.0, 3.0))
    oblique = sitk.Resample(template_1mm("T1") * 1000.0, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                            sitk.sitkFloat32)
    tissue = TissueMaps.aligned(oblique)
    before = sitk.GetArrayFromImage(oblique)
    for kind in LESION_KINDS + ARTEFACT_KINDS:
        case = synthesize(oblique, "T2", kind, 1, tissue)
        assert same_geometry(case.image, oblique) and same_geometry(case.mask, oblique), kind
        after, mask = arrays(case)
        ref = before if case.displacement is None else warp(before, case.displacement, tissue.geometry)
        if not case.is_artefact:
            assert mask.any() and np.array_equal(after[mask == 0], ref[mask == 0]), kind


def test_bad_requests_are_refused(scan, tissue):
    with pytest.raises(ValueError):
        synthesize(scan, "T1", "meteor", 0, tissue)
    small = sitk.Image([10, 10, 10], sitk.sitkFloat32)
    with pytest.raises(ValueError):
        synthesize(small, "T1", "ms", 0, tissue)


# ------------------------------------------------------------------------------------------------ cohorts

def test_make_cohort_on_the_template_writes_readable_cases(tmp_path):
    seen = []
    csv_path = make_cohort(None, tmp_path, "T1", ["blob-hypo", "tumour", "artefact-ghosting"], per_scan=2, seed=5,
                           reporter=Reporter(lambda step, f: seen.append(f)), template_grid=GRID)
    assert csv_path == tmp_path / "synth.csv"
    lesions = read_manifest(csv_path)
    assert [c.subject for c in lesions] == ["template_blob-hypo_0", "template_blob-hypo_1", "template_tumour_0",
                                            "template_tumour_1"]
    for c in lesions:
        image, mask = sitk.ReadImage(str(c.image)), sitk.ReadImage(str(c.mask))
        assert c.modality == "T1" and same_geometry(image, mask) and image.GetSize() == GRID.size
        assert sitk.GetArrayFromImage(mask).any()
    artefacts = read_manifest(tmp_path / "artefacts.csv")
    assert len(artefacts) == 2 and all(c.mask is None and c.image.is_file() for c in artefacts)
    info = json.loads((tmp_path / "synth.json").read_text(encoding="utf-8"))
    assert len(info["cases"]) == 6 and info["seed"] == 5
    tumour = next(e for e in info["cases"] if e["subject"] == "template_tumour_1")
    assert (tmp_path / tumour["displacement"]).is_file()
    # A recorded seed reproduces its case on its own.
    rec = tumour["records"][0]
    again = synthesize(sitk.Cast(template_on_grid(GRID, "T1") * 1000.0, sitk.sitkFloat32), "T1", "tumour",
                       rec["seed"], TissueMaps.from_template(GRID))
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / tumour["image"])))
    assert np.array_equal(sitk.GetArrayFromImage(again.image), written)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)


def test_make_cohort_honours_cancel(tmp_path):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        make_cohort(None, tmp_path, "T1", ["ms"], reporter=Reporter(cancel=token), template_grid=GRID)
    with pytest.raises(BadInputError):
        make_cohort(None, tmp_path, "T1", ["ms", "nonsense"], template_grid=GRID)
    with pytest.raises(BadInputError):
        make_cohort(None, tmp_path, "FLAIR", ["ms"], template_grid=GRID)  # the template is a T1


def test_cli_synth_on_the_1mm_template(tmp_path, capsys):
    from BrainAnomalyLib.cli import synth as synth_cli

    parser = argparse.ArgumentParser(prog="brainanomaly")
    synth_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["synth", "--template", "--modality", "T1", "--kinds", "blob-hyper", "--per-scan", "1",
                              "--seed", "3", "-o", str(tmp_path), "-q"])
    assert synth_cli.run(args, CancelToken()) == 0
    assert "synth.csv" in capsys.readouterr().out
    (case,) = read_manifest(tmp_path / "synth.csv", "T1")
    image, mask = sitk.ReadImage(str(case.image)), sitk.ReadImage(str(case.mask))
    assert same_geometry(image, template_1mm("T1")) and same_geometry(mask, image)
    assert case.image.name == "template_blob-hyper.nii.gz" and case.mask.name == "template_blob-hyper_mask.nii.gz"
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", "--kinds", "ms", "-o", str(tmp_path)])  # needs --manifest or --template


# ------------------------------------------------------------------------------------------------ tissue maps

@pytest.fixture(scope="module")
def moved_scan():
    """The template on an oblique grid with the head moved by a known rigid transform (scan -> template)."""
    grid = oblique_grid(template_on_grid(GRID, "T1"), (6.0, -4.0, 10.0), (2.0, 2.2, 2.5), (5.0, -6.0, 4.0))
    motion = head_motion((8.0, -6.0, 10.0), (10.0, -8.0, 6.0))
    scan = sitk.Resample(template_1mm("T1") * 1000.0, grid, motion, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return scan, motion


def test_tissue_maps_for_scan_pull_the_template_onto_the_scan(moved_scan, tmp_path):
    scan, motion = moved_scan
    tissue = TissueMaps.for_scan(scan, "T1")
    expected = sitk.GetArrayFromImage(sitk.Resample(template_1mm("WM"), scan, motion, sitk.sitkLinear, 0.0,
                                                    sitk.sitkFloat32))
    brain = tissue.brain
    assert tissue.wm.shape == expected.shape and brain.sum() * np.prod(scan.GetSpacing()) / 1000 > 1000
    assert np.corrcoef(expected[brain], tissue.wm[brain])[0, 1] > 0.95
    # Using the registration itself (template -> scan) instead of its inverse would be far off.
    wrong = sitk.GetArrayFromImage(sitk.Resample(template_1mm("WM"), scan, tissue.template_to_scan,
                                                 sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    assert np.corrcoef(expected[brain], wrong[brain])[0, 1] < 0.6
    inverse = motion.GetInverse()
    for p in [(0.0, 0.0, 0.0), (30.0, -20.0, 40.0), (-40.0, 30.0, -10.0)]:
        assert np.allclose(tissue.template_to_scan.TransformPoint(p), inverse.TransformPoint(p), atol=2.0)

    # The same scan through a manifest: only healthy rows of the asked contrast are used.
    write_volume(scan, tmp_path / "scan.nii.gz")
    write_volume(sitk.Cast(scan > 500, sitk.sitkUInt8), tmp_path / "lesion.nii.gz")
    sitk.WriteImage(sitk.Image([64, 64, 64], sitk.sitkFloat32), str(tmp_path / "blank.nii.gz"))
    write_manifest(tmp_path / "in.csv", [Case("s1", "T1", tmp_path / "scan.nii.gz", None),
                                         Case("s2", "T1", tmp_path / "scan.nii.gz", tmp_path / "lesion.nii.gz"),
                                         Case("s3", "FLAIR", tmp_path / "scan.nii.gz", None),
                                         Case("blank", "T1", tmp_path / "blank.nii.gz", None)])
    out = make_cohort(read_manifest(tmp_path / "in.csv"), tmp_path / "out", "T1", ["ms", "artefact-bias"])
    failures = json.loads((tmp_path / "out" / "synth.json").read_text(encoding="utf-8"))["failures"]
    assert [f["subject"] for f in failures] == ["blank"]  # an unreadable scan is reported, the rest go on
    (row,) = read_manifest(out)
    assert row.subject == "s1_ms" and row.mask is not None
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(row.mask))) > 0
    assert (expected[lesion] > 0.5).mean() > 0.6  # in the scan's real white matter
    assert [c.subject for c in read_manifest(tmp_path / "out" / "artefacts.csv")] == ["s1_artefact-bias"]


def test_kept_cohort_is_built_once_and_named_by_what_makes_it(moved_scan, tmp_path, monkeypatch):
    scan, _ = moved_scan
    path = tmp_path / "scan.nii.gz"
    write_volume(scan, path)
    cases, root = [Case("s1", "T1", path, None)], tmp_path / "kept"
    with pytest.raises(BadInputError):
        kept_cohort(cases, root, "T1", ["ms"], build=False)
    # An interrupted build leaves nothing that a later run would take for a made set.
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        kept_cohort(cases, root, "T1", ["ms"], reporter=Reporter(cancel=token))
    with pytest.raises(BadInputError):
        kept_cohort(cases, root, "T1", ["ms"], build=False)

    folder = kept_cohort(cases, root, "T1", ["ms"])
    (row,) = read_manifest(folder / "synth.csv")
    assert row.image.is_file() and row.mask.is_file() and [p.name for p in root.iterdir()] == [folder.name]
    made = (folder / "synth.csv").stat().st_mtime_ns
    assert kept_cohort(cases, root, "T1", ["ms"]) == folder and (folder / "synth.csv").stat().st_mtime_ns == made

    # Whatever changes the cases changes the folder: seed, kinds, the scans' contents, the preprocessing chain
    # (the lesions are placed through the scan's registration).
    key = cohort_key(cases, "T1", ["ms"])
    assert folder.name.endswith(key)
    assert cohort_key(cases, "T1", ["ms"], seed=1) != key
    assert cohort_key(cases, "T1", ["ms", "stroke"]) != key
    monkeypatch.setattr(cohort_module, "CHAIN_VERSION", cohort_module.CHAIN_VERSION + 1)
    assert cohort_key(cases, "T1", ["ms"]) != key
    monkeypatch.undo()
    assert cohort_key(cases, "T1", ["ms"]) == key
    write_volume(sitk.Cast(scan * 1.01, sitk.sitkFloat32), path)
    assert cohort_key(cases, "T1", ["ms"]) != key
