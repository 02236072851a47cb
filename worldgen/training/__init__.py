"""Training: ``worldgen train tokenizer`` (the per-frame VAE) and ``worldgen train dynamics``
(Diffusion Forcing of the block-causal DiT on its latents). :mod:`.common` holds what both
share: run folders, resumable state, EMA, logs, DDP and the loop."""

from worldgen.training.common import TrainConfig, fit
from worldgen.training.dynamics import DynamicsTrainConfig, flow_matching_loss, noise_levels
from worldgen.training.tokenizer import TokenizerTrainConfig

__all__ = ["DynamicsTrainConfig", "TokenizerTrainConfig", "TrainConfig", "fit", "flow_matching_loss", "noise_levels"]
