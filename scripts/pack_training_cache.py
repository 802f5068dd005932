#!/usr/bin/env python
"""Pack a manifest's training split (standardised grid volumes from the preprocessing cache) into one training pack
for scripts/gpu_train.sh, which trains the networks on a lent GPU host that has neither the scans nor SimpleITK.

    python scripts/pack_training_cache.py [--manifest ../shared/data/ixi_t1_2mm.csv] [--max-train 70] \
        [-o build/gpu/training_pack.npz]

The 70 IXI T1 training scans the shipped models were trained on pack into about 14 MiB (brain voxels in 8 bits;
see store/training_pack.py), small enough to travel to a GPU host beside the project (64 MiB in all). Scans not
yet preprocessed are preprocessed (and cached) first.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.errors import BrainAnomalyError  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402
from BrainAnomalyLib.training.packed import pack_training_split  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, default=ROOT.parent / "shared" / "data" / "ixi_t1_2mm.csv")
    ap.add_argument("--modality", default="T1")
    ap.add_argument("--max-train", type=int, default=70,
                    help="training scans to pack (default 70, as the shipped learned models were trained on)")
    ap.add_argument("--cache-dir", type=Path, help="preprocessing cache (default ~/.cache/brainanomaly)")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "build" / "gpu" / "training_pack.npz")
    args = ap.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    try:
        meta = pack_training_split(args.manifest, args.modality.upper(), args.output, Reporter(),
                                   max_train=args.max_train, cache_dir=args.cache_dir)
    except BrainAnomalyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    parts = meta["parts"]
    size = args.output.stat().st_size / 2 ** 20
    print(f"{args.output}: {len(parts)} scans ({parts.count('fit')} fit, {parts.count('validation')} validation) "
          f"of {meta['training_data']['manifest']}, {size:.1f} MiB"
          + (f"; skipped {meta['training_data']['skipped']}" if meta["training_data"]["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
