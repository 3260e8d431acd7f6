# SPDX-License-Identifier: Apache-2.0
"""CogVideoX (2b, 5b, 5b-I2V, 1.5-5B, 1.5-5B-I2V) as a DiTFlow backbone.

:mod:`.variants` (which model a config is, its defaults), :mod:`.loading` (folders and hub ids → :class:`.model.CogVideoX`),
:mod:`.model` (the :class:`~ditflow.backbones.base.Backbone` methods), :mod:`.layout` (sizes, 1.5's frame padding),
:mod:`.positions` (RoPE tables, the owned 2b sin-cos table), :mod:`.attention` (the processor), :mod:`.forward`
(truncated and full passes with each variant's conditioning), :mod:`.vae` (video and start-image latents),
:mod:`.schedule` (schedulers, the CFG rule). Every pipeline fact is checked against diffusers 0.42's CogVideoX pipelines.
"""
