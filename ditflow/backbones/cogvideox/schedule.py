# SPDX-License-Identifier: Apache-2.0
"""CogVideoX's schedulers and CFG rule, as diffusers' CogVideoX pipelines drive them.

``CogVideoXDDIMScheduler`` (2b) or ``CogVideoXDPMScheduler`` (the 5B models; :mod:`.variants`), both from the
checkpoint's ``scheduler_config.json`` with ``timestep_spacing="trailing"`` as the diffusers CogVideoX
documentation recommends. The DPM update needs the previous step's prediction of the clean latents and the
previous timestep, and draws noise from the run's generator; :class:`Schedule` keeps that state for one run.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

from torch import Tensor

from ...errors import DiTFlowError, quote

#: Scheduler classes by the variant's ``scheduler`` field.
SCHEDULERS = {"ddim": "CogVideoXDDIMScheduler", "dpm": "CogVideoXDPMScheduler"}


def build_scheduler(kind: str, scheduler_config: dict, path: str = ""):
    """The sampling scheduler ``kind`` (``ddim``/``dpm``) from ``scheduler/scheduler_config.json``, trailing spacing.

    Raises:
        DiTFlowError: a config diffusers cannot build the scheduler from (a ``beta_schedule`` it lacks, a string or
            negative ``num_train_timesteps``, ...), naming the file and quoting diffusers' complaint.
    """
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[kind])
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    try:
        return cls.from_config(config, timestep_spacing="trailing")
    except Exception as e:  # diffusers raises many types for bad values
        raise DiTFlowError(
            f"{Path(path) / 'scheduler' / 'scheduler_config.json'} cannot configure a {cls.__name__} "
            f"({quote(e)}); re-download scheduler/ from the model's Hugging Face repository."
        ) from None


def dynamic_cfg_scale(scale: float, t: Tensor, num_steps: int) -> float:
    """diffusers' CogVideoX "dynamic CFG" weight at timestep ``t``, kept as is for parity (it mixes t in 0..999 with
    the step count)."""
    return 1 + scale * ((1 - math.cos(math.pi * ((num_steps - t.item()) / num_steps) ** 5.0)) / 2)


class Schedule:
    """One run's timesteps and updates (:class:`~ditflow.backbones.base.Schedule`), as the pipelines' loop steps."""

    def __init__(self, scheduler, num_steps: int, device, generator):
        from diffusers import CogVideoXDPMScheduler

        scheduler.set_timesteps(num_steps, device=device)
        self.scheduler = scheduler
        self.timesteps = scheduler.timesteps
        self.init_noise_sigma = scheduler.init_noise_sigma
        # As diffusers' prepare_extra_step_kwargs with eta = 0: the DPM scheduler draws its noise from `generator`.
        params = inspect.signature(scheduler.step).parameters
        self._kwargs = {k: v for k, v in (("eta", 0.0), ("generator", generator)) if k in params}
        self._dpm = isinstance(scheduler, CogVideoXDPMScheduler)
        self.denoised = None  # the last step's prediction of the clean latents (the DPM update's "old" prediction)

    def scale_model_input(self, latents: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.scale_model_input(latents, t)

    def add_noise(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.add_noise(latents, noise, t.reshape(1))

    def step(self, i: int, prediction: Tensor, latents: Tensor) -> Tensor:
        """The latents after step ``i``; :attr:`denoised` is then that step's prediction of the clean latents."""
        t = self.timesteps[i]
        if not self._dpm:
            latents, self.denoised = self.scheduler.step(prediction, t, latents, **self._kwargs, return_dict=False)[:2]
            return latents
        t_prev = self.timesteps[i - 1] if i > 0 else None
        latents, self.denoised = self.scheduler.step(prediction, self.denoised, t, t_prev, latents, **self._kwargs,
                                                     return_dict=False)
        return latents
