# SPDX-License-Identifier: Apache-2.0
"""The Flow Poke Transformer (Baumann et al., *What If: Understanding Motion Through Sparse Interactions*, ICCV 2025,
arXiv 2510.12777): given one image and a few pokes (a point and the flow it is dragged by), a distribution over the
flow of any query point.

Positions (x, y) and flows are in the model's normalised units, [0, 1]² over the square image (conventions:
``ditflow/fpt/__init__``). The API has the authors' layers: :meth:`FlowPokeTransformer.embed_image` (cache its
result per image), :meth:`~FlowPokeTransformer.forward` (low level), and two predictors that differ in one way:
:meth:`~FlowPokeTransformer.predict_parallel` gives each query a mixture that sees the pokes only (queries are
independent), :meth:`~FlowPokeTransformer.predict_autoregressive` samples the queries in turn, each seeing the
pokes and the samples before it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor, nn

from ..errors import DiTFlowError
from .config import FPTConfig
from .image_encoder import build_dinov2, encode_image
from .layers import AxialRoPE, Block, KVCache, OutputMLP, TokenEmbedding
from .mixture import FlowMixture

#: the authors' note: more pokes than this were not seen in training (it typically still works)
TRAINED_MAX_POKES = 128


def cell_centres(rows: int, cols: int, device=None) -> Tensor:
    """Centres ``[rows·cols, 2]`` (x, y) of a rows × cols grid over [0, 1]², row-major, x fastest."""
    y = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) / rows
    x = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) / cols
    return torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1).reshape(-1, 2)


class FlowPokeTransformer(nn.Module):
    """FPT: DINOv2 image encoder, token embedding, ``depth`` blocks and a Gaussian-mixture head (FPT §3.2)."""

    def __init__(self, config: FPTConfig = FPTConfig(), image_encoder: nn.Module | None = None):
        """``image_encoder``: a ``Dinov2WithRegistersModel`` of ``config.encoder``'s size (default: a random one)."""
        super().__init__()
        self.config = config
        width, image_dim = config.width, config.encoder.hidden_size
        self.image_encoder = image_encoder if image_encoder is not None else build_dinov2(config.encoder)
        self.camera_embedding = nn.Embedding(2, width)  # condition: 0 = camera may move, 1 = static camera
        self.token_embedding = TokenEmbedding(width, image_dim, config.input_mlp_depth, config.flow_prescale)
        self.rope = AxialRoPE(config.head_dim, config.heads)
        self.blocks = nn.ModuleList(
            [Block(width, image_dim, config.head_dim, config.ff_expand) for _ in range(config.depth)]
        )
        self.head = OutputMLP(width, 6 * config.components, config.output_mlp_depth)

    @property
    def device(self) -> torch.device:
        return self.head.out.weight.device

    def embed_image(self, image: Tensor) -> Tensor:
        """Image features ``[b, hidden, g, g]`` of square images ``[b, 3, S, S]`` in [-1, 1]; reuse them for any
        number of predictions on the same image."""
        return encode_image(self.image_encoder, image.to(self.device), self.config.encoder)

    # -- low level ----------------------------------------------------------------------------------------------------

    def _image_kv(self, features: Tensor, cache: KVCache | None) -> list[tuple[Tensor, Tensor]]:
        if cache is not None and cache.image[0] is not None:
            return cache.image
        g = features.shape[-1]
        tokens = rearrange(features, "b d h w -> b (h w) d").to(self.head.out.weight.dtype)
        angles = self.rope(cell_centres(g, g, features.device).expand(features.shape[0], -1, -1))
        kv = [block.image_kv(tokens, angles) for block in self.blocks]
        if cache is not None:
            cache.image = kv
        return kv

    def forward(
        self, pos: Tensor, flow: Tensor, n_queries: int, camera_static: Tensor, features: Tensor,
        cache: KVCache | None = None,
    ) -> FlowMixture:
        """Mixtures of the last ``n_queries`` tokens.

        Args:
            pos, flow: ``[b, l, 2]``: ``l − n_queries`` pokes (position, flow), then the queries (flow ignored).
            camera_static: ``[b]`` bool.
            features: ``[b, hidden, g, g]`` from :meth:`embed_image`.
            cache: pokes already seen (and the image's keys and values); this call's pokes are appended to it.
        """
        x = self.token_embedding(pos, flow, n_queries, features)
        cond = self.camera_embedding(camera_static.long().to(x.device)).to(x.dtype)
        angles = self.rope(pos)
        image_kv = self._image_kv(features, cache)
        for index, block in enumerate(self.blocks):
            x = block(x, cond, angles, n_queries, image_kv[index], cache, index)
        if cache is not None:
            cache.commit(pos.shape[1] - n_queries)
        return FlowMixture.from_head(self.head(x[:, x.shape[1] - n_queries :]), self.config.components)

    # -- predictors ---------------------------------------------------------------------------------------------------

    def _check(self, poke_pos: Tensor, poke_flow: Tensor, query_pos: Tensor, features: Tensor, camera_static):
        b = features.shape[0]
        hidden, g = self.config.encoder.hidden_size, self.config.encoder.feature_grid
        if features.shape[1:] != (hidden, g, g):
            raise DiTFlowError(f"image features of shape {list(features.shape)} do not come from this model's "
                               f"encoder (expected [b, {hidden}, {g}, {g}]); embed the image with the same model.")
        for name, t in (("poke positions", poke_pos), ("poke flows", poke_flow), ("query positions", query_pos)):
            if t.ndim != 3 or t.shape[0] != b or t.shape[2] != 2:
                raise DiTFlowError(f"{name} must be [{b}, n, 2] (batch of the image features, then (x, y)); got "
                                   f"{list(t.shape)}.")
            if not torch.isfinite(t).all():
                raise DiTFlowError(f"{name} contain NaN or infinite values.")
        if poke_pos.shape[1] != poke_flow.shape[1]:
            raise DiTFlowError(f"{poke_pos.shape[1]} poke positions but {poke_flow.shape[1]} poke flows.")
        camera = torch.as_tensor(camera_static, dtype=torch.bool, device=self.device)
        return camera.expand(b) if camera.ndim == 0 else camera

    def _start(self, poke_pos, poke_flow, features, camera, capacity) -> KVCache:
        cache = KVCache(len(self.blocks), capacity)
        if poke_pos.shape[1]:
            self.forward(poke_pos, poke_flow, 0, camera, features, cache)
        return cache

    def predict_parallel(
        self, poke_pos: Tensor, poke_flow: Tensor, query_pos: Tensor, features: Tensor,
        camera_static: bool | Tensor = True, chunk_size: int = 4096,
        callback: Callable[[int, int], None] | None = None,
    ) -> FlowMixture:
        """The flow distribution of each query given the pokes; queries do not see each other.

        Args:
            poke_pos, poke_flow: ``[b, p, 2]`` (p may be 0: motion without pokes).
            query_pos: ``[b, q, 2]``.
            features: ``[b, hidden, g, g]`` from :meth:`embed_image`.
            camera_static: whether the camera is still (bool, or ``[b]``).
            chunk_size: queries per forward pass (memory is linear in it; results do not depend on it).
            callback: called with (queries done, q) after each chunk (progress, cancel).
        Returns:
            mixtures over ``[b, q]``.
        Raises:
            DiTFlowError: mis-shaped or non-finite inputs, features of another model.
        """
        camera = self._check(poke_pos, poke_flow, query_pos, features, camera_static)
        features = features.to(self.device)
        poke_pos, poke_flow, query_pos = (t.to(self.device, torch.float32) for t in (poke_pos, poke_flow, query_pos))
        cache = self._start(poke_pos, poke_flow, features, camera, poke_pos.shape[1])
        parts, q = [], query_pos.shape[1]
        for start in range(0, q, chunk_size):
            chunk = query_pos[:, start : start + chunk_size]
            parts.append(self.forward(chunk, torch.zeros_like(chunk), chunk.shape[1], camera, features, cache))
            if callback is not None:
                callback(min(start + chunk_size, q), q)
        if not parts:
            raise DiTFlowError("no query points were given.")
        return FlowMixture(*(torch.cat([getattr(m, f) for m in parts], dim=1)
                             for f in ("logits", "means", "scale_tril")))

    @torch.no_grad()
    def predict_autoregressive(
        self, poke_pos: Tensor, poke_flow: Tensor, query_pos: Tensor, features: Tensor,
        camera_static: bool | Tensor = True, randomize_order: bool = False,
        generator: torch.Generator | None = None, callback: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """Samples the flows ``[b, q, 2]`` of the queries in sequence; each sample becomes a poke for the next.

        ``randomize_order`` samples in a random order (per batch element, from ``generator``): the model was trained
        on random orders, so a raster order over a dense grid is out of distribution (the authors' advice). Random
        numbers are drawn as the authors' code draws them from the global RNG, so a generator seeded like it
        reproduces their samples. Other arguments as :meth:`predict_parallel`; ``callback`` runs after each query.
        """
        camera = self._check(poke_pos, poke_flow, query_pos, features, camera_static)
        features = features.to(self.device)
        poke_pos, poke_flow, query_pos = (t.to(self.device, torch.float32) for t in (poke_pos, poke_flow, query_pos))
        b, q = query_pos.shape[:2]
        order = None
        if randomize_order:
            order = torch.stack([torch.randperm(q, generator=generator) for _ in range(b)]).to(self.device)
            query_pos = torch.gather(query_pos, 1, order[..., None].expand(b, q, 2))
        cache = self._start(poke_pos, poke_flow, features, camera, poke_pos.shape[1] + q)
        flows = torch.zeros_like(query_pos)
        for i in range(q):
            # tokens: the previous query, now a poke with its sampled flow, then the next query
            first = max(i - 1, 0)
            pos, flow = query_pos[:, first : i + 1], flows[:, first : i + 1]
            flows[:, i] = self.forward(pos, flow, 1, camera, features, cache).sample(generator)[:, 0]
            if callback is not None:
                callback(i + 1, q)
        if order is not None:
            flows = torch.gather(flows, 1, order.argsort(dim=1)[..., None].expand(b, q, 2))
        return flows


__all__ = ["FlowPokeTransformer", "TRAINED_MAX_POKES", "cell_centres"]
