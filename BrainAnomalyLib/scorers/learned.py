"""Learned scorers: networks trained on healthy axial slices (autoencoder family, denoising AE, deep perceptual AE)
that score a voxel by what they cannot reconstruct.

One class serves every network type; the kinds registered here only name the method in model listings. The
network is rebuilt from `params["arch"]` and its weights come from the model's safetensors (keys "net.*").
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from ..core.progress import Reporter
from .base import ScoreOutput, Scorer, register, scorer_class, signed
from .residual_norm import fit_stats, scan_standardise, standardise

SCORES = ("signed", "l1", "ssim", "perceptual")
DEFAULT_BATCH = 32


def score_parts(score) -> List[str]:
    """The maps a model's `score` names: one of SCORES, or several joined by "+" (e.g. "perceptual+signed"), whose
    standardised maps are averaged. Raises ValueError for unknown or repeated names."""
    parts = str(score).split("+")
    unknown = [p for p in parts if p not in SCORES]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(f"unknown score {score!r}; choose from {', '.join(SCORES)}, or several joined by '+'")
    return parts


def norm_prefix(parts: List[str], part: str) -> str:
    """Tensor prefix of one map's voxel statistics: "norm." for a one-map model (the format before combined scores),
    "norm.<score>." per map of a combined score."""
    return "norm." if len(parts) == 1 else f"norm.{part}."


class LearnedScorer(Scorer):
    needs_tensors = True

    def __init__(self, params: dict, tensors: Dict[str, np.ndarray], device: str = "cpu") -> None:
        super().__init__(params, tensors, device)
        self._net = None
        self.parts = score_parts(self.params.get("score", "signed"))
        # A map already standardised by the scan's own spread needs no second, threshold-side adaptation.
        self.scan_relative = self.params.get("scan_norm", "none") == "robust"

    # -- the network --
    def net(self):
        if self._net is None:
            import torch

            from ..nets import build_net

            net = build_net(self.params["arch"])
            state = {k[len("net."):]: torch.from_numpy(np.array(v)) for k, v in self.tensors.items()
                     if k.startswith("net.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                from ..core.errors import ModelError

                raise ModelError(f"model weights do not fit the {self.params['arch'].get('type')} network "
                                 f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
            # Channels-last on the CPU too: the shipped T1 networks scored a BraTS scan 1.2-1.7 times faster so, with
            # maps that differ from the default layout's in the fourth digit (convolutions sum in another order).
            net = net.eval().to(self.device).to(memory_format=torch.channels_last)
            self._net = net
        return self._net

    def prepare(self) -> None:
        self.net()

    def raw_maps(self, image: np.ndarray, mask: np.ndarray, reporter: Reporter):
        """({score: map}, reconstruction) on the grid: the network's maps of this model's score parts before any
        voxel-wise standardisation or direction (the signed map is observed - reconstructed)."""
        import torch

        from ..learn.slices import slices_to_volume, volume_slices_for_scoring

        net = self.net()
        context = int(self.params.get("context", 0))
        x, m = volume_slices_for_scoring(image, mask, context)
        batch = self.batch_size()
        maps: Dict[str, list] = {p: [] for p in self.parts}
        recons = []
        centre = context  # the centre channel is the slice itself
        reporter("score", 0.0)
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch):
                reporter.check()
                xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch])).to(self.device)
                xb = xb.to(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda")):
                    recon = net.reconstruct(xb)
                    out = net.score_maps(xb, recon, parts=self.parts)
                for part in self.parts:
                    if part not in out:
                        raise ValueError(f"the {self.params['arch'].get('type')} network has no {part!r} score "
                                         f"(it has {', '.join(sorted(out))})")
                    maps[part].append(out[part][:, 0].float().cpu().numpy())
                recons.append(recon[:, centre].float().cpu().numpy())
                reporter("score", min(1.0, (start + batch) / x.shape[0]))
        raws = {p: slices_to_volume(np.concatenate(v), image.shape).astype(np.float32) for p, v in maps.items()}
        return raws, slices_to_volume(np.concatenate(recons), image.shape)

    def batch_size(self) -> int:
        return max(1, int(self.params.get("batch_size") or DEFAULT_BATCH))

    def raw_map(self, image: np.ndarray, mask: np.ndarray, reporter: Reporter):
        """(map, reconstruction) of a one-map model (see raw_maps)."""
        if len(self.parts) != 1:
            raise ValueError(f"score {self.params.get('score')!r} has several maps; use raw_maps")
        raws, recon = self.raw_maps(image, mask, reporter)
        return raws[self.parts[0]], recon

    def _part_norm(self, part: str):
        """(standardisation params, tensor prefix) of one score part."""
        norm = self.params.get("residual_norm")
        if len(self.parts) == 1 or not norm or norm.get("method", "none") == "none":
            return norm, norm_prefix(self.parts, part)
        per_score = norm.get("per_score") or {}
        if part not in per_score:
            from ..core.errors import ModelError

            raise ModelError(f"the model's voxel-wise statistics have no {part!r} map (it has "
                             f"{', '.join(sorted(per_score)) or 'none'}); train or standardise it again")
        return per_score[part], norm_prefix(self.parts, part)

    def score(self, image: np.ndarray, mask: np.ndarray, reporter: Reporter) -> ScoreOutput:
        scan_norm = self.params.get("scan_norm")
        if len(self.parts) > 1 and scan_norm != "robust":
            # Perceptual distances and intensity residuals have different units: only scan-scaled maps add up.
            raise ValueError(f"score {self.params.get('score')!r} combines several maps and needs scan_norm "
                             f"'robust', got {scan_norm!r}")
        raws, recon_volume = self.raw_maps(image, mask, reporter)
        total = None
        for part, raw in raws.items():
            norm, prefix = self._part_norm(part)
            anomaly = standardise(raw, self.tensors, norm, prefix)
            if part == "signed":
                anomaly = signed(anomaly, self.params.get("direction", "two-sided"))
            anomaly = scan_standardise(anomaly, mask, scan_norm)
            total = anomaly if total is None else total + anomaly
        if len(raws) > 1:
            total = total / float(len(raws))
        anomaly = np.where(mask, total, 0.0).astype(np.float32)
        return ScoreOutput(anomaly, reconstruction=np.where(mask, recon_volume, image).astype(np.float32))

    @classmethod
    def fit(cls, samples, params, reporter: Reporter, validation=None, options: Optional[dict] = None):
        from .learned_fit import fit_learned

        return fit_learned(cls.kind, samples, params, reporter, validation, options or {})


def _register(kind: str, doc: str, diffusion: bool = False):
    cls = type(f"{kind.title().replace('_', '')}Scorer", (LearnedScorer,),
               {"kind": kind, "__doc__": doc, "diffusion": diffusion})
    register(cls)
    return cls


AeDenseScorer = _register("ae_dense", "Autoencoder with a dense bottleneck (Baur et al. 2018).")
AeSpatialScorer = _register("ae_spatial", "Autoencoder with a spatial bottleneck (Baur et al. 2018).")
VaeScorer = _register("vae", "Variational autoencoder, residual scoring (Chen et al. 2018).")
CaeScorer = _register("cae", "Constrained autoencoder: latent-consistency loss (Chen et al. 2018).")
AnoVaeGanScorer = _register("anovaegan", "VAE with a patch discriminator (AnoVAEGAN, Baur et al. 2018).")
DaeScorer = _register("dae", "Denoising autoencoder with coarse noise, one-pass residual (Kascenas et al. 2022).")
DpaScorer = _register("dpa", "Deep perceptual autoencoder scored in a self-trained feature space "
                             "(Shvetsova et al. 2020).")
DdpmScorer = _register("ddpm", "Diffusion model, partial noising (Gaussian or simplex) and DDIM denoising, ensembled "
                               "over noise levels (AnoDDPM, Wyatt et al. 2022).", diffusion=True)
PddpmScorer = _register("pddpm", "Patched diffusion model: each patch noised and denoised with clean context, "
                                 "stitched (pDDPM, Behrendt et al. 2023).", diffusion=True)
CddpmScorer = _register("cddpm", "Diffusion model conditioned on an encoding of the input slice (cDDPM, Behrendt et "
                                 "al. 2023).", diffusion=True)
LdmScorer = _register("ldm", "Latent diffusion on VQ-VAE codes: changed latents resampled, decoded, pixel residual "
                             "(Pinaya et al. 2022); the fast diffusion scorer.", diffusion=True)


def fit_residual_norm(kind: str, params: dict, tensors: Dict[str, np.ndarray], volumes, reporter: Reporter,
                      device: str = "cpu", n_volumes: Optional[int] = None):
    """Add voxel-wise healthy statistics of the trained network's map (scorers/residual_norm.py) to a learned
    model: its maps on the healthy (image, mask) grid `volumes` give a per-voxel mean and spread. A combined score
    gets statistics per map (tensors "norm.<score>.mean/std"), from one pass over the scans."""
    scorer = scorer_class_for(kind)(dict(params, residual_norm=None), tensors, device)
    parts = scorer.parts
    # Maps of the second and later parts wait in memory (a few MB per scan) while the first part streams.
    held: Dict[str, list] = {p: [] for p in parts[1:]}

    def maps():
        for i, (image, mask) in enumerate(volumes):
            reporter("healthy residual statistics", i / n_volumes if n_volumes else 0.0)
            raws, _ = scorer.raw_maps(image, mask, Reporter(cancel=reporter.cancel))
            for p in parts[1:]:
                held[p].append((raws[p], mask))
            yield raws[parts[0]], mask
        reporter("healthy residual statistics", 1.0)

    if len(parts) == 1:
        norm_params, norm_tensors = fit_stats(maps())
        return dict(params, residual_norm=norm_params), {**tensors, **norm_tensors}
    per_score, norm_tensors = {}, {}
    per_score[parts[0]], first = fit_stats(maps(), prefix=norm_prefix(parts, parts[0]))
    norm_tensors.update(first)
    for p in parts[1:]:
        per_score[p], more = fit_stats(held.pop(p), prefix=norm_prefix(parts, p))
        norm_tensors.update(more)
    return dict(params, residual_norm={"method": "voxel", "per_score": per_score}), {**tensors, **norm_tensors}


def scorer_class_for(kind: str):
    cls = scorer_class(kind)
    if not issubclass(cls, LearnedScorer):
        raise ValueError(f"{kind!r} is not a learned scorer")
    return cls
