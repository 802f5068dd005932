"""Training a learned scorer: healthy grid volumes -> axial slices -> the training engine -> (params, tensors)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from ..core.progress import Reporter

# How each method scores by default: the residual's sign carries hypo/hyper (direction per modality); the
# perceptual AE scores in its feature space.
DEFAULT_SCORE = {"dpa": "perceptual"}
# Two-stage nets: the arch key of the network fitted first, on the same slices. Net classes declare it as
# `first_stage_key` and take the trained network with `set_first_stage(first, training slices)`; the dpa, older
# than that protocol, is listed here and takes it with `set_feature_net`.
FIRST_STAGE = {"dpa": "feature_net"}
TRAIN_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "seed", "device", "amp", "patience", "max_minutes",
              "steps_per_epoch", "val_batches", "checkpoint_every_epochs", "log_every")


def collect_slices(volumes: Iterable[Tuple[np.ndarray, np.ndarray]], context: int,
                   min_brain_fraction: float = 0.05) -> Tuple[np.ndarray, np.ndarray]:
    from ..learn.slices import slices_from_volume

    xs, ms = [], []
    for image, mask in volumes:
        x, m, _ = slices_from_volume(image, mask, context=context, min_brain_fraction=min_brain_fraction)
        xs.append(x)
        ms.append(m)
    if not xs:
        raise ValueError("no training volumes")
    return np.concatenate(xs), np.concatenate(ms)


def train_config(options: dict):
    from ..learn.engine import TrainConfig

    kwargs = {k: options[k] for k in TRAIN_KEYS if options.get(k) is not None}
    if options.get("augment") is False:
        from ..learn.augment2d import Augment2DConfig

        kwargs["augment"] = Augment2DConfig(enabled=False)
    return TrainConfig(**kwargs)


def fit_learned(kind: str, samples, params: dict, reporter: Reporter, validation=None,
                options: Optional[dict] = None) -> Tuple[dict, Dict[str, np.ndarray]]:
    """Fit a network of type `kind` on healthy (image, mask) grid volumes; `validation` volumes drive early
    stopping. `options`: training settings (TRAIN_KEYS), context, arch overrides, checkpoint_dir, resume,
    report_dir."""
    import torch

    from ..learn.checkpoint import checkpoint_exists
    from ..learn.engine import CHECKPOINT_SUBDIR, fit_net
    from ..nets import build_net, default_arch

    options = dict(options or {})
    context = int(options.get("context", params.get("context", 0)))
    started = time.perf_counter()
    reporter("collect slices", 0.0)
    train = collect_slices(samples, context)
    if validation is None:
        raise ValueError("learned scorers need validation volumes for early stopping")
    val = collect_slices(validation, context)
    reporter("collect slices", 1.0)
    arch = dict(default_arch(kind, in_channels=1 + 2 * context), **(options.get("arch") or {}))
    config = train_config(options)
    checkpoint_dir = Path(options["checkpoint_dir"]) if options.get("checkpoint_dir") else None
    report_dir = Path(options["report_dir"]) if options.get("report_dir") else None
    resume = bool(options.get("resume"))
    histories = {}

    def _fit(net, part: str, sub: Reporter, cfg=config) -> dict:
        return fit_net(net, train, val, cfg, sub, checkpoint_dir / part if checkpoint_dir else None, resume,
                       report_dir=(report_dir / part) if report_dir else None, write_report=report_dir is not None)

    stage = first_stage_key(kind)
    if stage is not None:
        # E.g. the dpa's perceptual space, the ldm's latent space: a network trained here first, on the same healthy
        # slices, then frozen inside the second.
        first_arch = dict(arch.get(stage) or default_arch(stage, in_channels=1 + 2 * context))
        first_arch.setdefault("in_channels", arch["in_channels"])
        first_arch.setdefault("size", arch["size"])
        first = build_net(first_arch)
        first_config = config
        if resume and checkpoint_dir is not None and checkpoint_exists(checkpoint_dir / "net" / CHECKPOINT_SUBDIR):
            # The second stage was trained on this first stage as it is: training it further would pull the ground
            # from under the second, so a resumed run only reloads it (0 more epochs) and goes on with the second.
            first_config = dataclasses.replace(config, epochs=0)
        histories[stage] = _fit(first, stage, reporter.sub(0.0, 0.4), first_config)
        arch[stage] = first.arch
        net = build_net(arch)
        if hasattr(net, "set_first_stage"):
            net.set_first_stage(first, train[0])
        else:
            net.set_feature_net(first)
        histories["net"] = _fit(net, "net", reporter.sub(0.4, 1.0))
    else:
        net = build_net(arch)
        histories["net"] = _fit(net, "net", reporter)
    state = {f"net.{k}": v.detach().cpu().contiguous().numpy() for k, v in net.state_dict().items()}
    out = dict(params, arch=net.arch, context=context, score=options.get("score") or params.get("score")
               or DEFAULT_SCORE.get(kind, "signed"),
               training={"n_train_slices": int(train[0].shape[0]), "n_val_slices": int(val[0].shape[0]),
                         "config": {k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool))},
                         "history": {k: _summary(h) for k, h in histories.items()},
                         "seconds": round(time.perf_counter() - started, 1),
                         "torch": torch.__version__})
    return out, state


def first_stage_key(kind: str):
    """The arch key of the network a `kind` net is trained on top of (None: trained in one stage)."""
    from ..nets import NETS

    return getattr(NETS.get(kind), "first_stage_key", None) or FIRST_STAGE.get(kind)


def _summary(history: dict) -> dict:
    keep = ("best_epoch", "best_val_loss", "stop_reason", "epochs_run", "total_seconds", "train_loss", "val_loss")
    return {k: history[k] for k in keep if k in history}



def write_resume_checkpoints(kind: str, params: dict, tensors: Dict[str, np.ndarray], checkpoint_dir) -> int:
    """Checkpoints in `checkpoint_dir` (a training's OUTPUT.checkpoints) from which `fit_learned` with resume trains
    a model trained earlier further: for a model whose own checkpoints are gone (a shipped one keeps only its
    weights and its training summary). See learn.engine.write_resume_checkpoint; a two-stage model gets both, and the
    resumed run keeps its first stage as it is and trains the second. Returns the epoch the net resumes after."""
    import torch

    from ..learn.engine import TrainConfig, write_resume_checkpoint
    from ..nets import build_net

    training = params.get("training") or {}
    history = training.get("history") or {}
    if "arch" not in params or "net" not in history:
        raise ValueError(f"the {kind} model has no recorded training history to resume after")
    config = TrainConfig(**{k: v for k, v in (training.get("config") or {}).items()
                            if k in TrainConfig.__dataclass_fields__})
    state = {k[len("net."):]: torch.from_numpy(np.asarray(v, np.float32) if v.dtype.kind == "f" else np.asarray(v))
             for k, v in tensors.items() if k.startswith("net.")}
    net = build_net(params["arch"])
    stage = first_stage_key(kind)
    if stage is not None:
        if stage not in history:
            raise ValueError(f"the {kind} model has no recorded {stage} history to resume after")
        first = build_net(params["arch"][stage])
        prefix = next((name + "." for name, module in net.named_children() if type(module) is type(first)), None)
        if prefix is None:
            raise ValueError(f"the {kind} net holds no {type(first).__name__}")
        first.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        write_resume_checkpoint(first, Path(checkpoint_dir) / stage, history[stage], config)
        if hasattr(net, "set_first_stage"):
            net.set_first_stage(first)  # frozen inside the second net, as training left it
        else:
            net.set_feature_net(first)
    net.load_state_dict(state, strict=True)
    write_resume_checkpoint(net, Path(checkpoint_dir) / "net", history["net"], config)
    return len(history["net"]["train_loss"])
