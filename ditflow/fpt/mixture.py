# SPDX-License-Identifier: Apache-2.0
"""The FPT's output: per query point, a mixture of 2-D Gaussians over its flow (FPT §3.1, Eq. 1), kept in fp64.

Flows are (dx, dy) in the model's normalised units (see ``ditflow/fpt/__init__``). The head's raw output per query
is ``K`` logits, then ``K`` means (dx, dy), then ``K`` lower-triangular Cholesky factors as (L₀₀, L₁₀, L₁₁). The
diagonal goes through squareplus(v) = (v + √(v² + 4))/2, plus 1e-4, so every covariance is positive definite. As
the authors do, the parameters are formed in fp64 whatever the network's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

#: floor added to the Cholesky diagonal
MIN_SCALE = 1e-4


def squareplus(x: Tensor) -> Tensor:
    """A smooth, positive stand-in for ReLU (Barron 2021): (x + √(x² + 4)) / 2."""
    return (x + torch.sqrt(x * x + 4)) / 2


@dataclass
class FlowMixture:
    """``K``-component Gaussian mixtures over the flow of ``[b, q]`` query points (fp64)."""

    logits: Tensor  #: [b, q, K], unnormalised mixture weights
    means: Tensor  #: [b, q, K, 2]
    scale_tril: Tensor  #: [b, q, K, 2, 2], lower-triangular, positive diagonal

    @classmethod
    def from_head(cls, raw: Tensor, components: int) -> FlowMixture:
        """Parameters from the output MLP's ``[b, q, K·6]`` (cast to fp64 first)."""
        x = raw.double()
        k = components
        logits, means, chol = x[..., :k], x[..., k : 3 * k], x[..., 3 * k : 6 * k]
        chol = rearrange(chol, "b q (k t) -> b q k t", t=3)
        l00, l10, l11 = chol.unbind(-1)
        zero = torch.zeros_like(l10)
        tril = torch.stack([squareplus(l00) + MIN_SCALE, zero, l10, squareplus(l11) + MIN_SCALE], dim=-1)
        return cls(logits, rearrange(means, "b q (k d) -> b q k d", d=2), tril.unflatten(-1, (2, 2)))

    @property
    def distribution(self) -> MixtureSameFamily:
        """The same mixture as a ``torch.distributions`` object (batch ``[b, q]``, event ``[2]``)."""
        return MixtureSameFamily(Categorical(logits=self.logits), MultivariateNormal(self.means, scale_tril=self.scale_tril))

    @property
    def weights(self) -> Tensor:
        """Mixture weights ``[b, q, K]``, summing to 1."""
        return self.logits.softmax(-1)

    @property
    def mean(self) -> Tensor:
        """Expected flow ``[b, q, 2]``."""
        return (self.weights[..., None] * self.means).sum(-2)

    def log_prob(self, flow: Tensor) -> Tensor:
        """Log density ``[b, q]`` of flows ``[b, q, 2]`` (per unit² of the normalised flow)."""
        return self.distribution.log_prob(flow.to(self.means))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """One flow ``[b, q, 2]`` per query: a component, then a Gaussian draw from it.

        Random numbers are drawn in the order of ``torch.distributions.MixtureSameFamily.sample`` (one multinomial
        draw per query, then a standard normal for every component), so a generator seeded like the global RNG
        reproduces ``distribution.sample()``. They are drawn on the generator's device (CPU by default), which makes
        a seed give the same flows on every device, up to the network's round-off.
        """
        device = generator.device if generator is not None else torch.device("cpu")
        logits, means, tril = (t.to(device) for t in (self.logits, self.means, self.scale_tril))
        b, q, k, _ = means.shape
        probs = Categorical(logits=logits).probs.reshape(-1, k)
        component = torch.multinomial(probs, 1, True, generator=generator).T.reshape(b, q)
        noise = torch.empty((b, q, k, 2), dtype=means.dtype, device=device).normal_(generator=generator)
        draws = means + (tril @ noise[..., None])[..., 0]
        picked = torch.gather(draws, 2, component[:, :, None, None].expand(b, q, 1, 2))[:, :, 0]
        return picked.to(self.means.device)

    def select(self, index) -> FlowMixture:
        """The mixtures at ``[b, q]``-index ``index`` (e.g. ``(slice(None), slice(3, 5))``), batch axes kept."""
        index = index if isinstance(index, tuple) else (index,)
        return FlowMixture(self.logits[index], self.means[index], self.scale_tril[index])

    def pixel_mass(self, flows: Tensor, cell: float, nodes: int = 24) -> Tensor:
        """Probability that the flow lands in each square cell of side ``cell`` centred at ``flows`` ``[..., 2]``.

        For one query (``b = q = 1``); returns ``flows.shape[:-1]``. Integrated per cell, not sampled at its centre,
        so a component narrower than a cell (the head allows scales down to 1e-4) keeps its mass. With x = μ + L·z
        (z standard normal, L lower-triangular), the mass of a cell is ∫ φ(z₀) [Φ(u(z₀)) − Φ(l(z₀))] dz₀ over the
        cell's z₀-range (clipped to ±8): exact in z₁, Gauss–Legendre with ``nodes`` points in z₀.
        """
        if self.logits.shape[:2] != (1, 1):
            raise ValueError(f"pixel_mass takes a single query's mixture, got batch {tuple(self.logits.shape[:2])}")
        import numpy as np

        x, w = (torch.from_numpy(a).to(self.means) for a in np.polynomial.legendre.leggauss(nodes))
        mu, tril = self.means[0, 0], self.scale_tril[0, 0]  # [K, 2], [K, 2, 2]
        centre = flows.to(self.means)[..., None, :]  # [..., 1, 2] against K components
        half = cell / 2
        lo = ((centre[..., 0] - half - mu[:, 0]) / tril[:, 0, 0]).clamp(-8, 8)
        hi = ((centre[..., 0] + half - mu[:, 0]) / tril[:, 0, 0]).clamp(-8, 8)
        z0 = ((lo + hi) / 2)[..., None] + ((hi - lo) / 2)[..., None] * x  # [..., K, nodes]
        y = centre[..., 1, None] - mu[:, 1, None] - tril[:, 1, 0, None] * z0
        inner = torch.special.ndtr((y + half) / tril[:, 1, 1, None]) - torch.special.ndtr((y - half) / tril[:, 1, 1, None])
        phi = torch.exp(-0.5 * z0 * z0) / math.sqrt(2 * math.pi)
        per_component = (hi - lo) / 2 * (w * phi * inner).sum(-1)  # [..., K]
        return (per_component * self.weights[0, 0]).sum(-1)


__all__ = ["FlowMixture", "MIN_SCALE", "squareplus"]
