"""The cohort format every command reads: CSV with subject,modality,image,mask (paths relative to the CSV)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .errors import BadInputError

COLUMNS = ("subject", "modality", "image", "mask")


@dataclass(frozen=True)
class Case:
    subject: str
    modality: str
    image: Path
    mask: Optional[Path]

    @property
    def key(self) -> str:
        return f"{self.subject}_{self.modality}"


def read_manifest(path, modality: Optional[str] = None, skipped: Optional[List[Case]] = None) -> List[Case]:
    """Read a manifest; with `modality`, keep only those rows (case-insensitive), and add the others to `skipped`
    when it is given, so the caller can say what it left out (`skipped_rows`)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"manifest not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("subject", "modality", "image") if c not in (reader.fieldnames or [])]
        if missing:
            raise BadInputError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
        cases = []
        for line, row in enumerate(reader, start=2):
            if not (row.get("image") or "").strip():
                raise BadInputError(f"{path}:{line}: empty image path")
            mask = (row.get("mask") or "").strip()
            cases.append(Case(subject=row["subject"].strip(), modality=normalise_modality(row["modality"]),
                              image=(path.parent / row["image"].strip()).resolve(),
                              mask=(path.parent / mask).resolve() if mask else None))
    if modality is not None:
        if skipped is not None:
            skipped.extend(c for c in cases if c.modality != normalise_modality(modality))
        cases = [c for c in cases if c.modality == normalise_modality(modality)]
    if not cases:
        raise BadInputError(f"{path}: no rows" + (f" with modality {modality}" if modality else ""))
    return cases


def skipped_rows(skipped: List[Case], total: int, why: str) -> str:
    """One line for rows a run leaves out, e.g. "skipped 1 of 4 rows: modality FLAIR, this model is for T1"."""
    counts = {}
    for c in skipped:
        counts[c.modality] = counts.get(c.modality, 0) + 1
    if len(counts) == 1:
        return f"skipped {len(skipped)} of {total} rows: modality {skipped[0].modality}, {why}"
    kinds = ", ".join(f"{m} ({n})" for m, n in sorted(counts.items()))
    return f"skipped {len(skipped)} of {total} rows: modality {kinds}; {why}"


def write_manifest(path, cases: List[Case]) -> None:
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for c in cases:
            rel = lambda p: "" if p is None else _relative(p, path.parent)  # noqa: E731
            writer.writerow([c.subject, c.modality, rel(c.image), rel(c.mask)])


def _relative(p: Path, base: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(Path(p).resolve())


def normalise_modality(name: str) -> str:
    m = name.strip().upper().replace("-", "").replace("_", "")
    return {"T1W": "T1", "T1C": "T1CE", "T1GD": "T1CE", "T2W": "T2", "T2FLAIR": "FLAIR"}.get(m, m)


def group_by_subject(cases: List[Case], modalities, skipped: Optional[List[Case]] = None) -> dict:
    """The rows of `modalities` per subject (subject -> cases, in manifest order), for models that take several
    contrasts of one subject together; rows of other contrasts go to `skipped` when it is given. A subject with
    two rows of one contrast is refused."""
    wanted = {normalise_modality(m) for m in modalities}
    out: dict = {}
    for c in cases:
        if c.modality not in wanted:
            if skipped is not None:
                skipped.append(c)
            continue
        if any(o.modality == c.modality for o in out.get(c.subject, [])):
            raise BadInputError(f"more than one {c.modality} row for subject {c.subject}")
        out.setdefault(c.subject, []).append(c)
    if not out:
        raise BadInputError(f"no rows of {', '.join(sorted(wanted))}")
    return out
