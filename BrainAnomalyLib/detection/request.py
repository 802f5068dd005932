"""What a detection is asked to do, as one typed object. The CLI's arguments, the worker's JSON file and a Slicer
parameter node's plain dict all become a DetectionRequest through `DetectionRequest.from_dict`, the one place that
reads and checks them; the detection options of `detect` and the worker are declared once, in `add_options`."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from ..calibration.findings import DEFAULT_FALSE_FINDINGS, FALSE_FINDINGS_RANGE, check_false_findings
from ..core.errors import BadInputError

CALIBRATIONS = ("adaptive", "cohort")
SKULL_STRIP = ("auto", "deepbet", "none")
FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd"}


@dataclass
class ThresholdSpec:
    """A raw score, a healthy voxel false-positive rate, or a number of false findings per healthy scan (the
    lesion-level operating point), read from the model's calibration (calibration.choose_threshold picks the
    default when none is given); `calibration` says whether the cohort threshold moves to the scan (adaptive)."""

    value: Optional[float] = None
    fpr: Optional[float] = None
    false_findings: Optional[float] = None
    calibration: str = "adaptive"


# Registration methods a request may choose (preprocess.chain): SimpleITK's, or the torch one for the GPU.
REGISTRATIONS = ("affine", "torch")


@dataclass
class PreprocessOptions:
    """Changes to the model's own preprocessing; None keeps the model's."""

    skull_strip: Optional[str] = None
    bias_correction: bool = True
    registration: bool = True
    registration_method: Optional[str] = None  # affine | torch; None keeps the model's

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PreprocessOptions":
        """From the options `add_preprocess_options` declared (detect, the worker, train)."""
        a = vars(args)
        return cls(skull_strip=a.get("skull_strip"), bias_correction=not a.get("no_bias_correction"),
                   registration=not a.get("no_register"), registration_method=a.get("registration"))

    def apply(self, base: dict):
        """`base` (a model's or a training run's preprocessing settings) with these changes."""
        from ..preprocess.chain import PreprocessConfig

        pre = PreprocessConfig.from_dict(base)
        if self.skull_strip:
            pre.skull_strip = self.skull_strip
        if not self.bias_correction:
            pre.bias_correction = False
        if self.registration_method:
            pre.registration = self.registration_method
        if not self.registration:
            pre.registration = "none"
        return pre


@dataclass
class PostprocessOptions:
    """Changes to the model's own post-processing; None keeps the model's."""

    erode_voxels: Optional[int] = None
    median_size: Optional[int] = None
    min_lesion_ml: Optional[float] = None


@dataclass
class DetectionRequest:
    input: Optional[str] = None  # volume file or DICOM folder
    # A fusion model's contrasts of one session instead: modality -> volume file or DICOM folder.
    inputs: Optional[Dict[str, str]] = None
    output: Optional[str] = None  # output folder
    model: Optional[str] = None  # registry id or model folder; None: the shipped default
    modality: Optional[str] = None  # None: the model's
    device: str = "auto"
    preprocessing: PreprocessOptions = field(default_factory=PreprocessOptions)
    threshold: ThresholdSpec = field(default_factory=ThresholdSpec)
    postprocessing: PostprocessOptions = field(default_factory=PostprocessOptions)
    batch_size: Optional[int] = None  # slices per forward pass (learned scorers); halved on out-of-memory
    output_format: str = "nifti"
    fill_nan: bool = False  # set NaN/infinite voxels to the lowest value instead of refusing the scan
    overwrite: bool = False  # replace an earlier result in the output folder (detection/writers.check_output)

    # -- the one constructor --
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DetectionRequest":
        """Build and check a request from a nested dict (`to_dict`'s shape) or a flat one, where the nested parts'
        fields are top-level keys (skull_strip, bias_correction, registration; value, fpr, calibration;
        erode_voxels, median_size, min_lesion_ml). Values may be text (a Slicer parameter node stores text; empty
        text is unset), so each is converted to its field's type here."""
        d = dict(d)
        nested = {"preprocessing": PreprocessOptions, "threshold": ThresholdSpec,
                  "postprocessing": PostprocessOptions}
        parts = {}
        for name, part in nested.items():
            given = d.pop(name, None) or {}
            if not isinstance(given, Mapping):
                raise BadInputError(f"request field {name!r} must be an object")
            given = dict(given)
            for f in fields(part):  # flat keys (CLI arguments, parameter nodes) fill the nested parts too
                if f.name in d and f.name not in given:
                    given[f.name] = d.pop(f.name)
            _check_keys(given, part, name)
            parts[name] = part(**{k: _convert(part, k, v) for k, v in given.items()})
        _check_keys(d, cls, "request")
        req = cls(**{k: _convert(cls, k, v) for k, v in d.items()}, **parts)
        req._check()
        return req

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DetectionRequest":
        """From the options `add_options` declared (and `input`/`output` where the front end has them)."""
        a = vars(args)
        return cls.from_dict({
            "input": a.get("input"), "inputs": a.get("inputs"), "output": a.get("output"), "model": a.get("model"),
            "modality": a.get("modality"), "device": a.get("device") or "auto",
            "preprocessing": asdict(PreprocessOptions.from_args(args)),
            "threshold": {"value": a.get("threshold"), "fpr": a.get("fpr"),
                          "false_findings": a.get("false_findings"),
                          "calibration": a.get("calibration") or "adaptive"},
            "postprocessing": {"erode_voxels": a.get("erode"), "median_size": a.get("median"),
                               "min_lesion_ml": a.get("min_lesion_ml")},
            "batch_size": a.get("batch_size"), "output_format": a.get("format") or "nifti",
            "fill_nan": bool(a.get("fill_nan")), "overwrite": bool(a.get("overwrite"))})

    @classmethod
    def from_json(cls, path) -> "DetectionRequest":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise BadInputError(f"cannot read the request {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise BadInputError(f"the request {path} is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadInputError(f"the request {path} is not a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return asdict(self)

    def input_name(self) -> str:
        """What the result names as its input: the file name, or each contrast's as MODALITY=name."""
        if self.inputs:
            return " ".join(f"{m}={Path(p).name}" for m, p in self.inputs.items())
        return Path(self.input).name if self.input else ""

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def _check(self) -> None:
        if self.inputs is not None:
            if self.input is not None:
                raise BadInputError("give one input volume or several contrasts (MODALITY=path), not both")
            if not isinstance(self.inputs, Mapping) or not self.inputs or not all(
                    isinstance(k, str) and isinstance(v, str) and k and v for k, v in self.inputs.items()):
                raise BadInputError("inputs: expected modality -> volume path, e.g. {\"T1\": \"t1.nii.gz\"}")
        t = self.threshold
        if sum(v is not None for v in (t.value, t.fpr, t.false_findings)) > 1:
            raise BadInputError("give only one of a raw threshold, a healthy FPR and a number of false findings")
        if t.fpr is not None and not 0.0 < t.fpr < 1.0:
            raise BadInputError(f"healthy FPR {t.fpr:g} is outside (0, 1); e.g. 0.01 for 1 %")
        if t.false_findings is not None:
            try:
                check_false_findings(t.false_findings)
            except ValueError as exc:
                raise BadInputError(str(exc)) from None
        if t.calibration not in CALIBRATIONS:
            raise BadInputError(f"unknown calibration {t.calibration!r}; choose from {', '.join(CALIBRATIONS)}")
        if self.preprocessing.registration_method not in (None, *REGISTRATIONS):
            raise BadInputError(f"unknown registration {self.preprocessing.registration_method!r}; choose from "
                                f"{', '.join(REGISTRATIONS)}")
        if self.preprocessing.skull_strip not in (None, *SKULL_STRIP):
            raise BadInputError(f"unknown skull-strip method {self.preprocessing.skull_strip!r}; choose from "
                                f"{', '.join(SKULL_STRIP)}")
        if self.output_format not in FORMATS:
            raise BadInputError(f"unknown output format {self.output_format!r}; choose from {', '.join(FORMATS)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise BadInputError(f"batch size {self.batch_size} is below 1")
        p = self.postprocessing
        for name in ("erode_voxels", "median_size", "min_lesion_ml"):
            if getattr(p, name) is not None and getattr(p, name) < 0:
                raise BadInputError(f"{name} {getattr(p, name)} is negative")

    # -- applied to a model --
    def preprocess_config(self, model_meta: dict):
        return self.preprocessing.apply(model_meta.get("preprocessing", {}))

    def postprocess_config(self, model_meta: dict):
        from .postprocess import PostprocessConfig

        post = PostprocessConfig(**model_meta.get("postprocess", {}))
        for name, value in asdict(self.postprocessing).items():
            if value is not None:
                setattr(post, name, value)
        return post

    def scorer_params(self) -> Optional[dict]:
        return {"batch_size": self.batch_size} if self.batch_size else None


def _check_keys(d: Mapping, cls, where: str) -> None:
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise BadInputError(f"unknown {where} field(s): {', '.join(unknown)}")


_TYPES = {"Optional[str]": str, "str": str, "Optional[float]": float, "Optional[int]": int, "bool": bool}


def _convert(cls, name: str, value):
    declared = str(next(f.type for f in fields(cls) if f.name == name))
    kind = _TYPES.get(declared)
    if value is None or kind is None:
        return value
    if declared.startswith("Optional") and isinstance(value, str) and value.strip() in ("", "None"):
        return None  # a parameter node stores an unset value as empty text
    if isinstance(value, str) and kind is not str:
        value = value.strip()
        if kind is bool:
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
            raise BadInputError(f"{name}: {value!r} is not true or false")
    try:
        if kind is bool:
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise BadInputError(f"{name}: {value!r} is not a valid {kind.__name__}") from None


def add_options(p: argparse.ArgumentParser, output_format: str = "nifti") -> None:
    """The detection options, declared once for `brainanomaly detect` and the worker."""
    p.add_argument("--model", help="model id (see 'brainanomaly models') or model folder; default: the shipped "
                                   "default model")
    p.add_argument("--modality", help="T1, T1CE, T2, FLAIR, ... (default: the model's modality; giving it also "
                                      "overrides the check of the scan's recognised contrast)")
    p.add_argument("--fill-nan", action="store_true", help="set NaN/infinite voxels to the lowest value instead "
                                                           "of refusing the scan")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=float, help="raw anomaly-score threshold")
    g.add_argument("--false-findings", type=float,
                   help="report the findings that healthy scans produce at most this many times per scan "
                        f"(lesion-level operating point, {FALSE_FINDINGS_RANGE[0]:g}-{FALSE_FINDINGS_RANGE[1]:g}; "
                        f"default {DEFAULT_FALSE_FINDINGS:g} for models calibrated for it)")
    g.add_argument("--fpr", type=float, help="instead: every finding above the calibrated healthy voxel "
                                             "false-positive rate, e.g. 0.01")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    add_calibration_option(p)
    add_preprocess_options(p)
    p.add_argument("--erode", type=int, default=None,
                   help="brain-mask erosion in grid voxels (default: the model's, mostly 3; thick slices are eroded "
                        "across them further, by their extent beyond the grid's spacing)")
    p.add_argument("--median", type=int, default=None, help="in-plane median filter size (default 5; 1 = off)")
    p.add_argument("--min-lesion-ml", type=float, default=None, help="smallest reported lesion (default 0.05 mL)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="slices per forward pass for learned scorers (halved automatically on out-of-memory)")
    p.add_argument("--format", default=output_format, choices=sorted(FORMATS),
                   help=f"file format of the output volumes (default {output_format})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier result in the output folder, all of it at once (no file of the earlier "
                        "result stays); without it such a folder is refused (exit 2). A folder holding other files "
                        "is refused even with --overwrite, so no file of yours is deleted")


def add_calibration_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", default="adaptive", choices=list(CALIBRATIONS),
                   help="adaptive (default): the healthy-cohort threshold moved to the scan's own score "
                        "distribution, so its false-positive rate holds on other scanners; cohort: as calibrated")


def add_preprocess_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skull-strip", default=None, choices=list(SKULL_STRIP),
                   help="auto (default) strips unless the scan is already skull-stripped")
    p.add_argument("--no-bias-correction", action="store_true", help="skip N4 bias correction")
    p.add_argument("--no-register", action="store_true", help="the scan is already in the template space")
    p.add_argument("--registration", choices=list(REGISTRATIONS), default=None,
                   help="affine: SimpleITK (the default); torch: the torch affine registration, on the GPU with "
                        "--device cuda (scripts/compare_registration.py measures how close it comes)")
