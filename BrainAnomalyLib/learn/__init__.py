"""Training engine for learned anomaly scorers on axial slices: slicing volumes (slices), batch augmentation
(augment2d), pickle-free checkpoints (checkpoint), the training loop with early stopping, time budget, resume and
torchrun data parallelism (engine), and the training report (report).

Modules are imported on use (`from BrainAnomalyLib.learn.engine import fit_net`), so importing the package stays
cheap."""
