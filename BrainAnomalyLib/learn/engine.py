"""The training engine for learned anomaly scorers: any network that follows the slice-net protocol

    net.training_losses(x, mask) -> {"loss": main objective, optional "d_loss": discriminator objective (on detached
                                     fakes), other scalars for logging}   (a `generator` keyword is passed if taken)
    net.param_groups() -> {"main": [...]} or {"main": [...], "disc": [...]}   (one AdamW per group)
    net.reconstruct(x) -> (B, C, H, W)
    net.arch -> JSON-serialisable dict

is trained on slices x (N, C, H, W) float32 with masks (N, 1, H, W) bool, with on-the-fly augmentation, early
stopping on the validation loss, a time budget, checkpoints (resumable, bit-identical on CPU) and progress through a
Reporter. "main" steps on "loss", "disc" on "d_loss" (another group G on "G_loss"); each group's backward reaches
only that group's parameters.

Run it under `torchrun` and it trains data-parallel with no change to the calling code (see `fit_net`).

Randomness is derived from (seed, epoch, rank[, batch]) at the start of each epoch (batch order, augmentation, the
torch RNG and the net's generator), so a run resumed from a checkpoint continues exactly as if never stopped.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import inspect
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..core.errors import BadInputError, Cancelled
from ..core.progress import Reporter
from .augment2d import Augment2DConfig, Augmenter2D
from .checkpoint import checkpoint_exists, load_checkpoint, load_tensor_set, save_checkpoint
from ..core.subsets import spread_pick

CHECKPOINT_SUBDIR = "checkpoint"
N_EXAMPLES = 6
STOP_REASONS = ("epochs", "early_stopping", "time", "non_finite_loss")
_FINISHED = ("early_stopping", "non_finite_loss")  # a resumed run stays stopped; "epochs"/"time" may go on


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 32  # per process (under torchrun the global batch is batch_size x world size)
    lr: float = 2e-4
    weight_decay: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    group_lr: Dict[str, float] = field(default_factory=dict)  # per parameter group, e.g. {"disc": 1e-4}
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA; nothing on CPU
    patience: Optional[int] = 10  # epochs without a validation improvement before stopping; None: never
    min_delta: float = 0.0  # an improvement must lower the monitored loss by more than this
    monitor: str = "loss"  # the validation loss key early stopping and "best" watch
    max_minutes: Optional[float] = None  # time budget of this call; stops cleanly, keeps the best weights
    steps_per_epoch: Optional[int] = None  # cap on the batches per epoch (a random subset each epoch)
    val_batches: Optional[int] = None  # cap on validation batches per process (a fixed random subset)
    augment: Augment2DConfig = field(default_factory=Augment2DConfig)
    checkpoint_every_epochs: int = 1
    log_every: int = 10  # steps between progress reports (and cancel / time checks)
    grad_clip: Optional[float] = None  # max gradient norm per group
    workers: Optional[int] = None  # processes augmenting batches; None: none on CPU, up to 4 beside a GPU
    channels_last: bool = True  # CUDA only
    find_unused_parameters: Optional[bool] = None  # DDP, single-group nets; None: found from the first batch

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if isinstance(d.get("augment"), dict):
            aug = dict(d["augment"])
            if "gamma" in aug:
                aug["gamma"] = tuple(aug["gamma"])
            d["augment"] = Augment2DConfig(**aug)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def _derive(*keys: int) -> int:
    """A 31-bit seed from integer keys (stable across machines and versions)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0]) & 0x7FFFFFFF


_TRAIN, _VAL, _SHUFFLE, _AUG, _VALORDER = 1, 2, 3, 4, 5


def loss_key(group: str) -> str:
    return {"main": "loss", "disc": "d_loss"}.get(group, f"{group}_loss")


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ------------------------------------------------------------------------------------------------ distribution
class _Dist:
    """Single process, or one rank of a torchrun job (WORLD_SIZE > 1): process group, device, collectives."""

    def __init__(self, device_name: str) -> None:
        from ..core.device import resolve_device

        import torch.distributed as dist

        self.dist = dist
        self.created = False
        env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        initialised = dist.is_available() and dist.is_initialized()
        self.enabled = dist.is_available() and (env_world > 1 or (initialised and dist.get_world_size() > 1))
        if env_world > 1 and not dist.is_available():
            raise BadInputError("launched with WORLD_SIZE > 1 but this torch has no torch.distributed")
        device = resolve_device(device_name)
        if self.enabled:
            if device.startswith("cuda"):
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
                torch.cuda.set_device(torch.device(device))
            if not dist.is_initialized():
                # Left up for later calls (a second fit_net in the same job: re-creating a group from torchrun's
                # store after destroying one hangs) and taken down when the process exits.
                dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
                atexit.register(_destroy_process_group)
                self.created = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.comm_device = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
        else:
            self.rank, self.world = 0, 1
            self.comm_device = torch.device("cpu")
        self.device = torch.device(device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def max_flags(self, flags: List[float]) -> List[float]:
        if not self.enabled:
            return flags
        t = torch.tensor(flags, dtype=torch.float64, device=self.comm_device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return t.cpu().tolist()

    def sum(self, values: List[float]) -> List[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        self.dist.all_reduce(t)
        return t.cpu().tolist()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value, on every rank."""
        if not self.enabled:
            return value
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.comm_device)
        self.dist.broadcast(t, 0)
        return int(t.item())

    def average_grads(self, params: List[torch.nn.Parameter]) -> None:
        """Mean of each parameter's gradient over the ranks (a missing gradient counts as zero)."""
        if not self.enabled or not params:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: Dict[torch.dtype, List[torch.nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = _flatten_dense_tensors([p.grad for p in group])
            if flat.device != self.comm_device:
                flat = flat.to(self.comm_device)
            self.dist.all_reduce(flat)
            flat /= self.world
            for p, g in zip(group, _unflatten_dense_tensors(flat, [p.grad for p in group])):
                p.grad.copy_(g)

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        if not self.enabled:
            return
        for b in module.buffers():
            if b.device != self.comm_device:
                t = b.detach().to(self.comm_device)
                self.dist.broadcast(t, 0)
                b.data.copy_(t)
            else:
                self.dist.broadcast(b.data, 0)

    def barrier(self) -> None:
        if self.enabled:
            self.dist.barrier()



def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _LossModule(torch.nn.Module):
    """Lets DistributedDataParallel see the training call: forward is net.training_losses."""

    def __init__(self, net: torch.nn.Module, takes_generator: bool) -> None:
        super().__init__()
        self.net = net
        self.takes_generator = takes_generator

    def forward(self, x, mask, generator=None):
        if self.takes_generator:
            return self.net.training_losses(x, mask, generator=generator)
        return self.net.training_losses(x, mask)


# ------------------------------------------------------------------------------------------------ batches
class _Batches(torch.utils.data.Dataset):
    """Augmented batches keyed by (epoch, batch number, slice indices); the augmentation depends on the key only,
    so batches come out the same whichever worker process makes them."""

    def __init__(self, x: np.ndarray, mask: np.ndarray, augment: Augment2DConfig, seed: int, rank: int) -> None:
        self.x, self.mask = x, mask
        self.augmenter = Augmenter2D(augment, seed) if augment.enabled else None
        self.seed, self.rank = seed, rank

    def __len__(self) -> int:
        return int(self.x.shape[0])  # batches are keyed by the sampler, not by position

    def __getitem__(self, key):
        epoch, number, idx = key
        xb = self.x[idx]
        mb = self.mask[idx]
        if self.augmenter is not None:
            self.augmenter.reseed(self.seed, _AUG, epoch, self.rank, number)
            xb, mb = self.augmenter(xb, mb)
        return torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)), torch.from_numpy(np.ascontiguousarray(mb))


class _Keys(torch.utils.data.Sampler):
    def __init__(self) -> None:
        self.keys: list = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def _as_arrays(data, what: str) -> Tuple[np.ndarray, np.ndarray]:
    if data is None:
        return None
    if hasattr(data, "arrays"):
        data = data.arrays()
    x, m = data
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    m = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
    if x.ndim != 4:
        raise BadInputError(f"{what} slices must be (N, C, H, W), got {x.shape}")
    if m.shape != (x.shape[0], 1) + x.shape[2:]:
        raise BadInputError(f"{what} masks must be (N, 1, H, W) = {(x.shape[0], 1) + x.shape[2:]}, got {m.shape}")
    return x.astype(np.float32, copy=False), m.astype(bool, copy=False)


def _scalars(losses: dict) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in losses.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = v.detach().float().reshape(())
        elif isinstance(v, (int, float)):
            out[k] = torch.tensor(float(v))
    return out


def _optimisers(groups: Dict[str, List[torch.nn.Parameter]], c: TrainConfig) -> Dict[str, torch.optim.Optimizer]:
    return {name: torch.optim.AdamW(params, lr=float(c.group_lr.get(name, c.lr)), betas=tuple(c.betas),
                                    weight_decay=c.weight_decay)
            for name, params in groups.items()}


def write_resume_checkpoint(net: torch.nn.Module, checkpoint_dir, history: dict,
                            config: Optional[TrainConfig] = None) -> Path:
    """A checkpoint in `checkpoint_dir/checkpoint/` from which `fit_net(..., resume=True)` trains `net`'s present
    weights further: for a model trained before, whose checkpoints are gone (a shipped model keeps only its
    weights). `history` is the summary the model recorded (train_loss, val_loss, best_epoch, best_val_loss,
    total_seconds): the run goes on at the epoch after it, keeps the weights as the best so far at that validation
    loss, and its per-epoch seeds continue from there. The optimisers start fresh (their moments were not kept),
    as a restarted AdamW does; the RNG state saved is this process's (the engine re-derives it every epoch)."""
    c = config or TrainConfig()
    groups = {name: [p for p in params if p.requires_grad] for name, params in net.param_groups().items()}
    train_loss, val_loss = list(history.get("train_loss") or []), list(history.get("val_loss") or [])
    epochs = len(train_loss)
    if epochs == 0:
        raise BadInputError("the recorded history has no epochs to resume after")
    seconds = float(history.get("total_seconds") or 0.0) / epochs
    records = [{"epoch": i + 1, "train_loss": train_loss[i], "val_loss": val_loss[i] if i < len(val_loss) else None,
                "train": {"loss": train_loss[i]},
                "val": None if i >= len(val_loss) else {"loss": val_loss[i]},
                "steps": None, "partial": False, "seconds": round(seconds, 3), "lr": {}} for i in range(epochs)]
    best_val = history.get("best_val_loss")
    state = {"epoch": epochs, "global_step": 0, "history": records,
             "best_val": None if best_val is None else float(best_val),
             "best_epoch": history.get("best_epoch"), "bad_epochs": 0, "stop_reason": "time", "world_size": 1,
             "config": c.to_dict()}
    weights = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
    path = Path(checkpoint_dir) / CHECKPOINT_SUBDIR
    return save_checkpoint(path, net, _optimisers(groups, c), state, {"best": weights})


# ------------------------------------------------------------------------------------------------ the trainer
class _Trainer:
    def __init__(self, net, train, val, config: TrainConfig, reporter: Reporter, checkpoint_dir, resume: bool,
                 report_dir, write_report: bool = True) -> None:
        self.net, self.config, self.reporter = net, config, reporter
        self.resume = resume
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.report_dir = Path(report_dir) if report_dir else self.checkpoint_dir
        self.write_report = write_report
        self.train_x, self.train_m = _as_arrays(train, "training")
        if self.train_x.shape[0] == 0:
            raise BadInputError("no training slices")
        v = _as_arrays(val, "validation")
        self.val_x, self.val_m = v if v is not None and v[0].shape[0] > 0 else (None, None)
        if config.epochs < 0 or config.batch_size < 1 or config.log_every < 1 or config.checkpoint_every_epochs < 1:
            raise BadInputError("epochs must be >= 0; batch_size, log_every, checkpoint_every_epochs >= 1")
        self.dist = _Dist(config.device)
        self.device = self.dist.device
        self.cuda = self.device.type == "cuda"

    # -- set-up
    def _setup(self) -> None:
        c, net = self.config, self.net
        net.to(self.device)
        if self.cuda and c.channels_last:
            net.to(memory_format=torch.channels_last)
        groups = net.param_groups()
        if "main" not in groups:
            raise BadInputError("net.param_groups() must have a 'main' group")
        seen = set()
        self.groups: Dict[str, List[torch.nn.Parameter]] = {}
        for name, params in groups.items():
            params = [p for p in params if p.requires_grad]
            if not params:
                raise BadInputError(f"parameter group {name!r} has no trainable parameters")
            if "/" in name:
                raise BadInputError(f"parameter group name {name!r} must not contain '/'")
            if seen & {id(p) for p in params}:
                raise BadInputError(f"parameter group {name!r} shares parameters with another group")
            seen |= {id(p) for p in params}
            self.groups[name] = params
        self.optimisers = _optimisers(self.groups, c)
        self.multi = len(self.groups) > 1
        takes_generator = "generator" in inspect.signature(net.training_losses).parameters
        self.generator = torch.Generator(device=self.device) if takes_generator else None
        self.loss_module = _LossModule(net, takes_generator)
        self.model = self.loss_module
        self.batches = _Batches(self.train_x, self.train_m, c.augment, c.seed, self.dist.rank)
        self.keys = _Keys()
        self.loader = None
        workers = c.workers
        if workers is None:
            workers = min(4, max((os.cpu_count() or 1) // max(self.dist.world, 1) - 1, 0)) if self.cuda else 0
        if workers > 0 and c.augment.enabled:
            self.loader = torch.utils.data.DataLoader(self.batches, batch_size=None, sampler=self.keys,
                                                      num_workers=workers, persistent_workers=True,
                                                      pin_memory=self.cuda, worker_init_fn=_worker_init,
                                                      generator=torch.Generator())  # not the global RNG
        if self.val_x is not None:
            order = np.random.default_rng(_derive(c.seed, _VALORDER)).permutation(self.val_x.shape[0])
            if c.val_batches is not None:
                order = order[: c.val_batches * c.batch_size * self.dist.world]
            self.val_idx = np.sort(order[self.dist.rank::self.dist.world])
        if self.dist.enabled:
            self._wrap_ddp()

    def _wrap_ddp(self) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        unused = self.config.find_unused_parameters
        if not self.multi and unused is None:
            unused = self._has_unused_parameters()
        # Buffers (BatchNorm statistics) are broadcast from rank 0 at each epoch's end rather than each forward.
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
            buffers = {"forward_sync_buffers": False}  # torch >= 2.12 (broadcast_buffers is deprecated)
        else:
            buffers = {"broadcast_buffers": False}
        self.model = DDP(self.loss_module, device_ids=[self.device.index] if self.cuda else None,
                         find_unused_parameters=bool(unused) and not self.multi, **buffers)

    def _has_unused_parameters(self) -> bool:
        """Whether "loss" leaves some trainable parameter out (then DDP must look for unused ones each step): walk
        the autograd graph of one forward; buffers are put back afterwards."""
        buffers = {k: b.detach().clone() for k, b in self.net.named_buffers()}
        self.net.train()
        key = (0, 0, np.arange(min(self.config.batch_size, self.train_x.shape[0])))
        xb, mb = self.batches[key]
        with self._autocast():
            losses = self.loss_module(xb.to(self.device), mb.to(self.device), self._gen(0))
        seen, stack, used = set(), [losses["loss"].grad_fn], set()
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if hasattr(fn, "variable"):
                used.add(id(fn.variable))
            stack.extend(nxt for nxt, _ in fn.next_functions)
        with torch.no_grad():
            for k, b in self.net.named_buffers():
                b.copy_(buffers[k])
        local = any(id(p) not in used for p in self.net.parameters() if p.requires_grad)  # what DDP watches
        return bool(self.dist.max_flags([1.0 if local else 0.0])[0])

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda and self.config.amp)

    def _gen(self, seed: Optional[int]):
        if self.generator is not None and seed is not None:
            self.generator.manual_seed(seed)
        return self.generator

    # -- state
    def _fresh_state(self) -> dict:
        return {"epoch": 0, "global_step": 0, "history": [], "best_val": None, "best_epoch": None,
                "bad_epochs": 0, "stop_reason": None, "world_size": self.dist.world}

    def _best_weights(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}

    def _checkpoint_path(self) -> Optional[Path]:
        return self.checkpoint_dir / CHECKPOINT_SUBDIR if self.checkpoint_dir else None

    def _save(self) -> None:
        path = self._checkpoint_path()
        if path is None or not self.dist.main:
            return
        state = dict(self.state, config=self.config.to_dict())
        sets = {"best": self.best} if self.best is not None else None
        save_checkpoint(path, self.net, self.optimisers, state, sets)
        from .report import write_history_json

        write_history_json(self.report_dir, self._result(running=True))

    def _load(self) -> bool:
        path = self._checkpoint_path()
        if not (self.resume and path is not None and checkpoint_exists(path)):
            return False
        saved = load_checkpoint(path, self.net, self.optimisers, restore_rng=True)
        self.state = {k: saved[k] for k in self._fresh_state() if k in saved}
        try:
            self.best = {k: v for k, v in load_tensor_set(path, "best").items()}
        except Exception:  # no best set yet (ModelError)
            self.best = None
        self.resumed_from = int(self.state["epoch"])
        return True

    # -- training
    def _epoch_keys(self, epoch: int) -> list:
        c, n, world, rank = self.config, self.train_x.shape[0], self.dist.world, self.dist.rank
        g = torch.Generator().manual_seed(_derive(c.seed, _SHUFFLE, epoch))
        perm = torch.randperm(n, generator=g).numpy()
        if world > 1:  # every rank gets the same number of slices (wrapping round, as DistributedSampler does)
            total = int(math.ceil(n / world)) * world
            perm = np.resize(perm, total)[rank::world]
        full = len(perm) // c.batch_size
        chunks = [perm[i * c.batch_size:(i + 1) * c.batch_size] for i in range(full)] if full else [perm]
        if c.steps_per_epoch is not None:
            chunks = chunks[: max(1, int(c.steps_per_epoch))]
        return [(epoch, i, idx) for i, idx in enumerate(chunks)]

    def _iterate(self, keys):
        if self.loader is None:
            for key in keys:
                yield self.batches[key]
        else:
            self.keys.keys = keys
            yield from self.loader

    def _step(self, xb: torch.Tensor, mb: torch.Tensor) -> Dict[str, torch.Tensor]:
        c = self.config
        for opt in self.optimisers.values():
            opt.zero_grad(set_to_none=True)
        sync = self.model.no_sync() if (self.dist.enabled and self.multi) else contextlib.nullcontext()
        with sync:
            with self._autocast():
                losses = self.model(xb, mb, self.generator)
            if "loss" not in losses:
                raise BadInputError("net.training_losses must return a 'loss'")
            if not self.multi:
                losses["loss"].backward()  # DDP (if any) averages the gradients
                active = ["main"]
            else:
                active = [g for g in self.groups if isinstance(losses.get(loss_key(g)), torch.Tensor)
                          and losses[loss_key(g)].requires_grad]
                for i, g in enumerate(active):  # each objective reaches its own group's parameters only
                    losses[loss_key(g)].backward(inputs=self.groups[g], retain_graph=i < len(active) - 1)
        for g in active:
            if self.multi:
                self.dist.average_grads(self.groups[g])
            if c.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.groups[g], c.grad_clip)
            self.optimisers[g].step()
        return _scalars(losses)

    def _seconds(self) -> float:
        return time.perf_counter() - self.started

    def _over_budget(self) -> bool:
        return self.config.max_minutes is not None and self._seconds() > 60.0 * self.config.max_minutes

    def _progress(self, epoch: int, step: int, n_steps: int, loss: float) -> bool:
        """Report progress (rank 0) and poll cancellation (every rank); True if any rank was cancelled."""
        c = self.config
        fraction = (epoch + step / max(n_steps, 1)) / max(c.epochs, 1)
        done = fraction - self.start_fraction
        eta = self._seconds() / done * (1.0 - fraction) if done > 0 else float("nan")
        best = self.state["best_val"]
        text = (f"train epoch {epoch + 1}/{c.epochs} step {step}/{n_steps} loss {loss:.4g}"
                + (f" best val {best:.4g}" if best is not None else "") + f" ETA {_fmt_time(eta)}")
        try:
            if self.dist.main:
                self.reporter(text, fraction)
            else:
                self.reporter.check()
            return False
        except Cancelled:
            if not self.dist.enabled:
                raise
            return True

    def _announce(self, text: str, fraction: float) -> None:
        """Progress without a cancellation check under torchrun (a rank leaving alone would hang the others;
        cancellation is polled at the synchronised log steps)."""
        if not self.dist.enabled:
            self.reporter(text, fraction)
        elif self.dist.main:
            r = self.reporter
            r.progress(text, r.lo + (r.hi - r.lo) * min(max(fraction, 0.0), 1.0))

    def _train_epoch(self, epoch: int) -> Tuple[Dict[str, float], int, bool, Optional[str]]:
        c = self.config
        torch.manual_seed(_derive(c.seed, _TRAIN, epoch, self.dist.rank))
        self._gen(_derive(c.seed, _TRAIN, epoch, self.dist.rank, 1))
        self.net.train()
        keys = self._epoch_keys(epoch)
        sums: Dict[str, torch.Tensor] = {}
        steps, stop = 0, None
        for xb, mb in self._iterate(keys):
            xb = xb.to(self.device, non_blocking=True)
            mb = mb.to(self.device, non_blocking=True)
            if self.cuda and c.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            for k, v in self._step(xb, mb).items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            steps += 1
            self.state["global_step"] += 1
            if steps % c.log_every == 0 or steps == len(keys) or steps == 1:
                loss = float(sums["loss"]) / steps
                cancelled = self._progress(epoch, steps, len(keys), loss)
                flags = self.dist.max_flags([float(cancelled), float(self._over_budget()),
                                             float(not math.isfinite(loss))])
                if flags[0]:
                    raise Cancelled("cancelled by user")
                if flags[2]:
                    stop = "non_finite_loss"
                elif flags[1] and steps < len(keys):
                    stop = "time"
                if stop:
                    break
        names = sorted(sums)
        totals = self.dist.sum([float(sums[k]) for k in names] + [float(steps)])
        means = {k: totals[i] / max(totals[-1], 1.0) for i, k in enumerate(names)}
        return means, steps, steps < len(keys), stop

    def _validate(self) -> Optional[Dict[str, float]]:
        if self.val_x is None:
            return None
        c = self.config
        torch.manual_seed(_derive(c.seed, _VAL, self.dist.rank))  # the same draws every epoch
        self._gen(_derive(c.seed, _VAL, self.dist.rank, 1))
        self.net.eval()
        sums: Dict[str, float] = {}
        count = 0
        with torch.no_grad():
            for start in range(0, len(self.val_idx), c.batch_size):
                idx = self.val_idx[start:start + c.batch_size]
                xb = torch.from_numpy(self.val_x[idx]).to(self.device)
                mb = torch.from_numpy(self.val_m[idx]).to(self.device)
                if self.cuda and c.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    losses = self.loss_module(xb, mb, self.generator)
                for k, v in _scalars(losses).items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
                count += len(idx)
        self.net.train()
        names = sorted(self.loss_names | set(sums))
        totals = self.dist.sum([sums.get(k, 0.0) for k in names] + [float(count)])
        n = totals[-1]
        return {k: totals[i] / n for i, k in enumerate(names)} if n > 0 else None

    def _result(self, running: bool = False) -> dict:
        s = self.state
        history = s["history"]
        return {"history": history,
                "train_loss": [e["train_loss"] for e in history],
                "val_loss": [e["val_loss"] for e in history],
                "best_epoch": s["best_epoch"], "best_val_loss": s["best_val"],
                "monitor": self.config.monitor,
                "stop_reason": None if running else s["stop_reason"],
                "epochs_run": len(history),
                "steps": s["global_step"],
                "total_seconds": round(sum(e["seconds"] for e in history), 3),
                "run_seconds": round(self._seconds(), 3),
                "resumed_from_epoch": self.resumed_from,
                "world_size": self.dist.world, "device": str(self.device),
                "arch": getattr(self.net, "arch", None), "config": self.config.to_dict()}

    def run(self) -> dict:
        c = self.config
        self.started = time.perf_counter()
        self.resumed_from = None
        self._setup()
        self.state, self.best = self._fresh_state(), None
        self._load()
        s = self.state
        if s["stop_reason"] in _FINISHED or (s["stop_reason"] is not None and s["epoch"] >= c.epochs):
            return self._finish()
        s["stop_reason"] = None
        self.start_fraction = s["epoch"] / max(c.epochs, 1)
        self.loss_names = set()
        for epoch in range(s["epoch"], c.epochs):
            t0 = time.perf_counter()
            train, steps, partial, stop = self._train_epoch(epoch)
            self.loss_names |= set(train)
            self.dist.broadcast_buffers(self.net)  # BatchNorm statistics as rank 0 has them, on every rank
            if self.val_x is not None:
                self._announce(f"validate epoch {epoch + 1}/{c.epochs}", (epoch + 1) / max(c.epochs, 1))
            val = self._validate()
            if val is not None and c.monitor not in val:
                raise BadInputError(f"validation losses have no {c.monitor!r} to monitor (they have "
                                    f"{', '.join(sorted(val))})")
            monitored = (val or {}).get(c.monitor)
            record = {"epoch": epoch + 1, "train_loss": train.get("loss"),
                      "val_loss": None if val is None else val.get("loss"),
                      "train": train, "val": val, "steps": steps, "partial": partial,
                      "seconds": round(time.perf_counter() - t0, 3),
                      "lr": {g: opt.param_groups[0]["lr"] for g, opt in self.optimisers.items()}}
            s["history"].append(record)
            s["epoch"] = epoch + 1
            if val is None:  # nothing to select on: the latest weights are the best there are
                if stop != "non_finite_loss":
                    self.best, s["best_epoch"] = self._best_weights(), epoch + 1
            elif monitored is not None and math.isfinite(monitored) and (
                    s["best_val"] is None or monitored < s["best_val"] - c.min_delta):
                s["best_val"], s["best_epoch"], s["bad_epochs"] = float(monitored), epoch + 1, 0
                self.best = self._best_weights()
            else:
                s["bad_epochs"] += 1
            if stop is None and c.patience is not None and val is not None and s["bad_epochs"] >= c.patience:
                stop = "early_stopping"
            if stop is None and self._over_budget():
                stop = "time"
            if stop is None and epoch + 1 >= c.epochs:
                stop = "epochs"
            # Every rank takes rank 0's decision (the clocks of the processes differ).
            code = self.dist.broadcast_int(STOP_REASONS.index(stop) + 1 if stop else 0)
            stop = STOP_REASONS[code - 1] if code else None
            stopping = stop is not None
            s["stop_reason"] = stop
            if stopping or (epoch + 1) % c.checkpoint_every_epochs == 0:
                self._save()
            if stopping:
                break
        if s["stop_reason"] is None:  # epochs == 0, or the loop ended before any epoch
            s["stop_reason"] = "epochs"
            self._save()
        return self._finish()

    def _finish(self) -> dict:
        if self.best is not None:
            self.net.load_state_dict(self.best)
        result = self._result()
        if self.dist.main and self.report_dir is not None and self.write_report:
            from .report import write_training_report

            examples = None
            if self.val_x is not None:
                pick = spread_pick(self.val_x.shape[0], N_EXAMPLES)
                examples = {"net": self.net, "x": self.val_x[pick], "mask": self.val_m[pick]}
            write_training_report(self.report_dir, result, examples)
        self.dist.barrier()
        return result


def fit_net(net: torch.nn.Module, train, val, config: Optional[TrainConfig] = None, reporter: Optional[Reporter] = None,
            checkpoint_dir=None, resume: bool = False, report_dir=None, write_report: bool = True) -> dict:
    """Train `net` in place on `train` = (x (N, C, H, W) float32, mask (N, 1, H, W) bool) (or a SliceSet), select
    and early-stop on `val` (same form, or None), and leave the best validation weights in `net`.

    With `checkpoint_dir`: the resumable checkpoint goes to `checkpoint_dir/checkpoint/` (every
    `checkpoint_every_epochs` epochs and when stopping; the best weights are its tensor set "best"), and
    `training.json`, `loss_curves.png`, `reconstructions.png` to `report_dir` (default `checkpoint_dir`; the
    pictures only at the end, and not at all with write_report=False).
    With `resume` and a checkpoint there, training goes on from its last epoch (a run that ended by early stopping
    just returns). Cancelled (from the reporter) propagates; the last checkpoint written stays intact.

    Under torchrun (WORLD_SIZE > 1) each process calls this the same way: the process group is set up if it is not
    (gloo on CPU, nccl on CUDA), training batches are split between the ranks, validation losses are averaged over
    them, rank 0 alone writes checkpoints and reports, and all stop together.

    Returns {"history": [per epoch: epoch, train_loss, val_loss, train {key: mean}, val {key: mean}, steps,
    partial, seconds, lr], "train_loss": [...], "val_loss": [...], "best_epoch", "best_val_loss", "stop_reason"
    (epochs | early_stopping | time | non_finite_loss), "epochs_run", "steps", "total_seconds" (summed over epochs,
    across resumes), "run_seconds" (this call), "resumed_from_epoch", "world_size", "device", "arch", "config"}.
    """
    trainer = _Trainer(net, train, val, copy.deepcopy(config) if config else TrainConfig(), reporter or Reporter(),
                       checkpoint_dir, resume, report_dir, write_report)
    return trainer.run()
