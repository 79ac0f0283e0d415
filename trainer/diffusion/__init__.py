"""Latent diffusion maths: the noise schedule, classifier-free guidance, samplers and the EMA of weights."""

from trainer.diffusion.samplers import guided, sample, timesteps
from trainer.diffusion.schedule import NoiseSchedule, cfg_combine

__all__ = ["NoiseSchedule", "cfg_combine", "guided", "sample", "timesteps"]
