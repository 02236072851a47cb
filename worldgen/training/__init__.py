"""Training: ``worldgen train tokenizer`` (the per-frame VAE) and ``worldgen train dynamics``
(Diffusion Forcing of the block-causal DiT on its latents). What every trainer shares lives
by concern: :mod:`.config` (TrainConfig and its flags), :mod:`.distributed` (device, DDP, per-step
generators), :mod:`.schedule` (LR, EMA, weight decay), :mod:`.state` (resume state), :mod:`.run`
(the run folder and its logs) and :mod:`.loop` (the loop :func:`fit`, a whole run :func:`train`)."""

from worldgen.training.config import TrainConfig
from worldgen.training.dynamics import DynamicsTrainConfig, flow_matching_loss, noise_levels
from worldgen.training.loop import fit
from worldgen.training.tokenizer import TokenizerTrainConfig

__all__ = ["DynamicsTrainConfig", "TokenizerTrainConfig", "TrainConfig", "fit", "flow_matching_loss", "noise_levels"]
