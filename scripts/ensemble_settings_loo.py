#!/usr/bin/env python
"""Search of the default T1 ensemble's settings (member weights, the power of its rule, the members' knees) on cached
grid maps, with a leave-one-case-out number for brats18_dev.

    python scripts/ensemble_settings_loo.py --cache build/ens-loo \\
        --brats ../shared/data/brats18_dev.csv --selection SEL/synth.csv --selection-healthy SEL_SOURCES.csv \\
        --report REP/synth.csv --report-healthy REP_SOURCES.csv -o ens-loo.json

Each member's raw grid map of every scan is scored once and cached in --cache (the scan preprocessed as detection
does it, through store/cache.py); a setting is then the ensemble's own combination (scorers/ensemble.combine) and the
ensemble's post-processing (median filter, erosion, clipping) of those maps, scored by AUPRC pooled over the brain
voxels of the template grid. Synthetic rows pool each lesion kind's scans with the untouched source scans (the
healthy references, as scripts/benchmark.py counts them).

A setting is eligible when on the SELECTION synthetic set (lesions in calibration-split IXI scans) every lesion kind
is within 0.05 AUPRC of the best single member (mirrored, as in the ensemble); among those the best on brats18_dev is
chosen (eligibility is checked only for the settings a choice reaches, best on brats18_dev first). Leave-one-case-out:
for each glioma the eligible setting best on the other four is applied to it, and the held-out grid maps are pooled.
The REPORT synthetic set (held-out IXI scans, the card's table) is only ever measured, never chosen on: pass it with
`--measure DPA,CAE,NORMATIVE,POWER[,KNEE_DPA,KNEE_CAE,KNEE_NORMATIVE]` to measure the chosen setting, the current one
and the single members on every set.

Three grids: the weights and power (default; 48 settings); with `--knees grid` the members' knees
(scorers/ensemble.py: none, 1, 2 or 3 on the normative member alone, 1 or 2 shared by all three) beside fewer weights
and powers (72 settings); with `--knees current` those 6 knee settings at the ensemble's own weights and power.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.io import read_volume  # noqa: E402
from BrainAnomalyLib.core.manifest import read_manifest  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402
from BrainAnomalyLib.detection.pipeline import Detector  # noqa: E402
from BrainAnomalyLib.detection.postprocess import clip_to_mask, erode_mask, filter_map  # noqa: E402
from BrainAnomalyLib.evaluation.metrics import average_precision  # noqa: E402
from BrainAnomalyLib.scorers.ensemble import fuse, member_parts  # noqa: E402
from BrainAnomalyLib.scorers.reuse import score_once  # noqa: E402
from BrainAnomalyLib.store.cache import cached_preprocessed  # noqa: E402
from BrainAnomalyLib.store.models import resolve_model  # noqa: E402

MARGIN = 0.05  # issue 16: the default within 0.05 AUPRC of the best model on every lesion kind
# The grid searched: dpa and cae weights relative to each other, the normative member's, and the rule's power.
DPA = (1.0, 1.25, 1.5)
NORMATIVE = (0.25, 0.375, 0.5, 0.75)
POWER = (1.0, 1.25, 1.5, 2.0)
# The knee grid: with a knee the normative member's weak, diffuse responses drop out, so it may carry more weight.
KNEE_DPA = (1.0, 1.25)
KNEE_NORMATIVE_WEIGHT = (0.5, 0.75, 1.0)
KNEE_POWER = (1.0, 2.0)
KNEES = ((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.0, 2.0), (0.0, 0.0, 3.0), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0))


def scan_maps(case, detector: Detector, cache: Path, tag: str) -> dict:
    """The ensemble members' raw grid maps of one scan, its brain mask and (for a labelled scan) its grid label."""
    path = cache / f"{tag}_{case.subject}.npz"
    if path.is_file():
        return dict(np.load(path))
    native = read_volume(case.image)
    pre = cached_preprocessed(case.image, native, detector.preprocess_config, detector.grid)
    out = {"mask": pre.mask}
    if case.mask is not None:
        truth = sitk.ReadImage(str(case.mask))
        out["label"] = sitk.GetArrayFromImage(sitk.Resample(truth, pre.grid.reference(), pre.transform,
                                                            sitk.sitkNearestNeighbor, 0)) > 0
    for member, scorer in zip(detector.model.members, detector.scorer.members):
        scorer.acquisition_mm = pre.acquisition_mm
        out[member.name] = score_once(scorer, pre.image, pre.mask, Reporter()).anomaly_map.astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **out)
    print(f"cached {tag} {case.subject}", file=sys.stderr, flush=True)
    return out


class Scans:
    """Grid maps of a set of scans, with what each setting turns them into at the brain voxels (zero outside the
    eroded mask, as detection's post-processing leaves them)."""

    def __init__(self, maps: dict, detector: Detector):
        self.maps = maps
        self.detector = detector
        self.post = detector.postprocess_config
        self.parts: dict = {}  # the members' mirrored, scan-scaled maps: weights and power do not change them

    def heat(self, name: str, params: dict) -> np.ndarray:
        d = self.maps[name]
        mask = d["mask"].astype(bool)
        if name not in self.parts:
            self.parts[name] = member_parts([d[m.name] for m in self.detector.model.members], mask, params,
                                            self.detector.grid)
        fused = fuse(self.parts[name], mask, params)
        return clip_to_mask(filter_map(fused, self.post), erode_mask(mask, self.post))[mask]

    def truth(self, name: str) -> np.ndarray:
        d = self.maps[name]
        return d["label"][d["mask"].astype(bool)] if "label" in d else np.zeros(int(d["mask"].sum()), bool)


def pooled_auprc(scans: Scans, names, params: dict) -> float:
    return average_precision(np.concatenate([scans.heat(n, params) for n in names]),
                             np.concatenate([scans.truth(n) for n in names]))


def settings(base: dict, knees: Optional[str] = None):
    if not knees:
        for dpa, norm, power in itertools.product(DPA, NORMATIVE, POWER):
            yield dict(base, weights=[dpa, 1.0, norm], rule="rms", power=power)
    elif knees == "current":
        for knee in KNEES:
            yield dict(base, weights=list(base["weights"]), power=float(base.get("power") or 2.0), knees=list(knee))
    else:
        for dpa, norm, power, knee in itertools.product(KNEE_DPA, KNEE_NORMATIVE_WEIGHT, KNEE_POWER, KNEES):
            yield dict(base, weights=[dpa, 1.0, norm], rule="rms", power=power, knees=list(knee))


def setting_of(row: dict, base: dict) -> dict:
    return dict(base, weights=row["weights"], power=row["power"], knees=row.get("knees"))


def single(base: dict, i: int) -> dict:
    """One member alone (mirrored as in the ensemble): the rms of one map is its scan-scaled positive part."""
    weights = [0.0] * len(base["members"])
    weights[i] = 1.0
    return dict(base, weights=weights, rule="rms", power=2.0)


def kinds_of(cases) -> dict:
    out: dict = {}
    for c in cases:
        if c.mask is not None:
            out.setdefault(c.subject.rsplit("_", 1)[-1], []).append(c.subject)
    return out


def synth_rows(scans: Scans, kinds: dict, healthy, params: dict) -> dict:
    return {k: pooled_auprc(scans, names + healthy, params) for k, names in sorted(kinds.items())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ensemble-t1-ixi", help="the ensemble whose members and rule are searched")
    ap.add_argument("--cache", required=True, type=Path, help="folder for the scans' member grid maps")
    ap.add_argument("--brats", required=True, help="manifest of the labelled glioma scans (T1 rows)")
    ap.add_argument("--selection", required=True, help="synth.csv of the synthetic set settings are chosen on")
    ap.add_argument("--selection-healthy", required=True, help="manifest of the selection set's untouched scans")
    ap.add_argument("--report", help="synth.csv of the synthetic set only reported (none: no report rows)")
    ap.add_argument("--report-healthy", help="manifest of the report set's untouched scans")
    ap.add_argument("--maps-only", action="store_true", help="cache the grid maps and stop")
    ap.add_argument("--measure", help="no search: measure the setting DPA,CAE,NORMATIVE,POWER[,KNEE x 3] (weights, "
                                      "power, knees) beside the current one and the single members")
    ap.add_argument("--knees", choices=("grid", "current"),
                    help="search the members' knees instead of the weights and power: beside a few weights and powers "
                         "(grid), or at the ensemble's own weights and power (current)")
    ap.add_argument("--frontier", help="no search: the report set's rows of these lesion kinds (comma-separated) for "
                                       "every setting of the grid with dpa weight 1, no knee or a knee on one member")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    detector = Detector(resolve_model(args.model), device="cpu")
    sets = {"brats": read_manifest(args.brats, "T1"), "sel": read_manifest(args.selection),
            "selh": read_manifest(args.selection_healthy)}
    if args.report:
        sets.update(rep=read_manifest(args.report), reph=read_manifest(args.report_healthy))
    maps = {f"{tag}_{c.subject}": scan_maps(c, detector, args.cache, tag) for tag, cases in sets.items()
            for c in cases}
    if args.maps_only:
        return 0
    scans = Scans(maps, detector)
    base = dict(detector.params)
    members = [m.name for m in detector.model.members]
    brats = [f"brats_{c.subject}" for c in sets["brats"]]
    sel_kinds = {k: [f"sel_{s}" for s in v] for k, v in kinds_of(sets["sel"]).items()}
    rep_kinds = {k: [f"rep_{s}" for s in v] for k, v in kinds_of(sets.get("rep", [])).items()}
    sel_healthy = [f"selh_{c.subject}" for c in sets["selh"]]
    rep_healthy = [f"reph_{c.subject}" for c in sets.get("reph", [])]
    if args.frontier:
        # For information only (the report set is never chosen on): how the grid trades those kinds, setting by setting.
        kinds = {k: rep_kinds[k] for k in args.frontier.split(",")}
        rows = [{"weights": p["weights"], "power": p["power"], "knees": p.get("knees"),
                 "report": synth_rows(scans, kinds, rep_healthy, p)}
                for p in settings(base, args.knees)
                if p["weights"][0] == 1.0 and sum(1 for t in p.get("knees") or () if t) <= 1]
        for row in rows:
            print(json.dumps(row), file=sys.stderr, flush=True)
        if args.output:
            args.output.write_text(json.dumps({"frontier": rows}, indent=1) + "\n")
        return 0

    singles = {m: single(base, i) for i, m in enumerate(members)}
    best_single_sel = {k: max(synth_rows(scans, sel_kinds, sel_healthy, p)[k] for p in singles.values())
                       for k in sel_kinds}
    report = {"members": members, "margin": MARGIN, "singles": {}, "current": {}, "settings": []}
    for m, p in singles.items():
        report["singles"][m] = {"brats": pooled_auprc(scans, brats, p),
                                "selection": synth_rows(scans, sel_kinds, sel_healthy, p),
                                "report": synth_rows(scans, rep_kinds, rep_healthy, p)}
    report["current"] = {"params": {k: base.get(k) for k in ("weights", "rule", "power")},
                         "brats": pooled_auprc(scans, brats, base),
                         "selection": synth_rows(scans, sel_kinds, sel_healthy, base),
                         "report": synth_rows(scans, rep_kinds, rep_healthy, base)}
    print("current", json.dumps(report["current"]), file=sys.stderr, flush=True)
    if args.measure:
        values = [float(v) for v in args.measure.split(",")]
        weights, power, knees = values[:3], values[3], values[4:7] or None
        p = dict(base, weights=weights, power=power, knees=knees)
        report["measured"] = {"weights": weights, "power": power, "knees": knees,
                              "brats": pooled_auprc(scans, brats, p),
                              "selection": synth_rows(scans, sel_kinds, sel_healthy, p),
                              "report": synth_rows(scans, rep_kinds, rep_healthy, p)}
        if args.output:
            args.output.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        return 0
    # brats18_dev for every setting (five scans: cheap); the selection set's 21 scans only for the settings a
    # choice reaches, best on brats18_dev first, each setting checked once.
    rows = []
    for n, p in enumerate(settings(base, args.knees)):
        rows.append({"weights": p["weights"], "power": p["power"], "knees": p.get("knees"),
                     "brats": pooled_auprc(scans, brats, p),
                     "brats_without": {b: pooled_auprc(scans, [x for x in brats if x != b], p) for b in brats}})
        print(n, json.dumps({k: rows[-1][k] for k in ("weights", "power", "knees", "brats")}), file=sys.stderr,
              flush=True)

    def eligible(row) -> bool:
        if "eligible" not in row:
            row["selection"] = synth_rows(scans, sel_kinds, sel_healthy, setting_of(row, base))
            row["eligible"] = all(row["selection"][k] >= best_single_sel[k] - MARGIN for k in sel_kinds)
            print("checked", json.dumps({k: row[k] for k in ("weights", "power", "knees", "eligible", "selection")}),
                  file=sys.stderr, flush=True)
        return row["eligible"]

    def best(key) -> dict:
        return next((r for r in sorted(rows, key=key, reverse=True) if eligible(r)), None)

    report["settings"] = rows
    chosen = best(lambda r: r["brats"])
    if chosen is not None:
        report["chosen"] = {"weights": chosen["weights"], "power": chosen["power"], "knees": chosen["knees"],
                            "brats_in_sample": chosen["brats"], "selection": chosen["selection"],
                            "report": synth_rows(scans, rep_kinds, rep_healthy, setting_of(chosen, base))}
        heat, truth, folds = [], [], {}
        for b in brats:
            pick = best(lambda r: r["brats_without"][b])
            folds[b] = {"weights": pick["weights"], "power": pick["power"], "knees": pick["knees"]}
            heat.append(scans.heat(b, setting_of(pick, base)))
            truth.append(scans.truth(b))
        report["loo"] = {"folds": folds, "pooled_auprc": average_precision(np.concatenate(heat),
                                                                           np.concatenate(truth))}
    if args.output:
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report.get(k) for k in ("current", "chosen", "loo")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
