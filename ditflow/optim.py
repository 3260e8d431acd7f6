# SPDX-License-Identifier: Apache-2.0
"""The optimiser side of a guided step (Alg. 1 inner loop): which optimiser, and dynamic loss scaling for fp16.

A fresh optimiser per guided step with PyTorch's defaults (:class:`~ditflow.config.Optimizer`: Adam, the paper's;
AdamW and SGD, its Table 3c ablation), built by name from ``torch.optim`` at call time.

The optimised tensors (z_t, RoPE tables, the sin-cos table) are fp32, but their gradient flows back through the
model in its own dtype. bf16 has fp32's exponent range; **fp16** (CogVideoX-2b's native dtype) does not: below about
6·10⁻⁸ a gradient flushes to zero and below 6·10⁻⁵ it loses precision. The AMF loss is a mean over up to
F²·S entries (2.3·10⁵ at 49 frames), so its per-element gradients are that small on the real models, and Adam then
steps along the sign of whatever survived. As the authors' script does with ``torch.amp.GradScaler``, the loss is
multiplied by a power of two before the backward and the fp32 gradient divided by it after (exactly); a non-finite
gradient halves the scale and the iteration is recomputed rather than skipped, so every guided step keeps its
K_opt updates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import Optimizer
from .errors import DiTFlowError

#: ``torch.optim`` class of each :class:`~ditflow.config.Optimizer`.
OPTIMIZER_CLASSES = {Optimizer.ADAM: "Adam", Optimizer.ADAMW: "AdamW", Optimizer.SGD: "SGD"}


def make_optimizer(kind: Optimizer | str, param: Tensor, lr: float) -> torch.optim.Optimizer:
    """A fresh ``torch.optim`` optimiser of ``kind`` over ``param`` at learning rate ``lr``, other settings default."""
    return getattr(torch.optim, OPTIMIZER_CLASSES[Optimizer.parse(kind)])([param], lr=lr)

#: First scale (as GradScaler), growth after this many finite iterations in a row, and the largest scale.
INIT_SCALE, GROWTH_INTERVAL, MAX_SCALE = 2.0**16, 5, 2.0**24


class LossScaler:
    """Backward with dynamic loss scaling when ``enabled`` (fp16 models); a plain ``backward`` otherwise.

    One scaler lives for a whole sampling run, so the scale it settles on carries over between guided steps.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.scale = INIT_SCALE if enabled else 1.0
        self._finite_in_a_row = 0

    def backward(self, loss: Tensor, param: Tensor) -> bool:
        """Back-propagates ``loss`` into ``param.grad`` (unscaled, fp32). Returns ``False`` when the scaled
        gradient overflowed: the scale was halved and the caller must recompute the loss and call again.

        Raises:
            DiTFlowError: if the gradient is not finite even at scale 1 (the loss itself is broken).
        """
        if not self.enabled or not torch.isfinite(loss.detach()):
            loss.backward()  # a non-finite loss is not an fp16 range problem: the caller's checks report it
            return True
        (loss * self.scale).backward()
        grad = param.grad
        if bool(torch.isfinite(grad).all()):
            grad.div_(self.scale)  # a power of two: exact in fp32
            self._finite_in_a_row += 1
            if self._finite_in_a_row % GROWTH_INTERVAL == 0:
                self.scale = min(self.scale * 2.0, MAX_SCALE)
            return True
        self._finite_in_a_row = 0
        if self.scale <= 1.0:
            raise DiTFlowError(
                "the guidance gradient is not finite even without loss scaling in fp16; run the model in bf16 or "
                "fp32 (--dtype bf16)."
            )
        self.scale /= 2.0
        param.grad = None
        return False
