#!/usr/bin/env python
"""Make a trained learned model resumable: write the checkpoints `brainanomaly train --resume` continues from.

    python scripts/resume_from_model.py Resources/Models/ldm-t1-ixi build/ldm-long.checkpoints
    brainanomaly train --model ldm ... -o build/ldm-long --resume --epochs 200 --max-minutes 90

A shipped model keeps its weights and its training summary but not its checkpoints, so training it further would
otherwise start from scratch. The checkpoints written here hold the model's weights as the best so far at its
recorded validation loss and go on at the epoch after its last one (the optimiser starts afresh: its moments were
not kept). A two-stage model (ldm: vqvae, then the diffusion net; dpa: feature net, then the autoencoder) gets both;
the resumed run keeps the first stage and trains the second. Train with the same manifest, --max-train and arch as
the model was, or the validation losses are not comparable (the net's arch is checked on loading).
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.errors import ModelError  # noqa: E402
from BrainAnomalyLib.scorers.learned_fit import write_resume_checkpoints  # noqa: E402
from BrainAnomalyLib.store.models import load_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="trained learned model folder")
    ap.add_argument("checkpoints", type=Path, help="the OUTPUT.checkpoints folder of the training to resume")
    args = ap.parse_args()
    try:
        model = load_model(args.model)  # checks the weights' sha256 before anything reads them
        epoch = write_resume_checkpoints(model.kind, model.meta["params"], model.tensors, args.checkpoints)
    except (ModelError, ValueError, KeyError) as exc:
        print(f"error: {args.model}: {exc}", file=sys.stderr)
        return 3
    print(f"{args.checkpoints}: resumes {model.name} after epoch {epoch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
