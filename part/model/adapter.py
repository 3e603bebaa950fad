"""The adapter between the speech encoder and the LLM: strided-conv downsampling, a small transformer (or MLP),
a projection to the LLM's width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from part.config import AdapterConfig


class AdapterBlock(nn.Module):
    """Pre-norm transformer block. Every weight is used through an nn.Linear/LayerNorm call, so ZeRO-3's module
    hooks gather it (nn.TransformerEncoderLayer reads its attention output weight directly, which they miss)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """valid: [B, T] the keys every query may read, or a [B, 1, T, T] mask of the keys each query may read."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = valid[:, None, None, :] if valid.dim() == 2 else valid
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.ff(self.norm2(x))


class Adapter(nn.Module):
    """Strided-conv downsampling, then a small transformer (or MLP), projected to the LLM's width."""

    def __init__(self, cfg: AdapterConfig, in_dim: int, out_dim: int):
        super().__init__()
        self.downsample = cfg.downsample
        self.conv = nn.Conv1d(in_dim, cfg.hidden, kernel_size=cfg.downsample, stride=cfg.downsample)
        if cfg.kind == "transformer":
            self.body = nn.ModuleList(AdapterBlock(cfg.hidden, cfg.heads) for _ in range(cfg.layers))
        else:
            self.body = nn.Sequential(
                nn.Linear(cfg.hidden, cfg.hidden * 2), nn.GELU(), nn.Linear(cfg.hidden * 2, cfg.hidden)
            )
        self.norm = nn.LayerNorm(cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, out_dim)

    @torch.no_grad()
    def init_from_embeddings(self, embeddings: torch.Tensor, seed: int = 0) -> None:
        """Sets the output projection so that, for the normalised hidden state it reads, outputs are distributed
        like the rows of `embeddings` ([vocab, out_dim], the LLM's input embeddings): their mean vector as the
        bias, and weights scaled so the spread around it has the embeddings' mean distance from their mean."""
        mean = embeddings.float().mean(0)
        spread = (embeddings.float() - mean).norm(dim=1).mean()
        probe = torch.randn(1024, self.proj.in_features, generator=torch.Generator().manual_seed(seed))
        current = (probe @ self.proj.weight.float().T).norm(dim=1).mean()
        self.proj.weight.mul_(spread / current)
        self.proj.bias.copy_(mean)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        # ceil: a clip's last partial window counts; the result does not depend on the rest of the batch
        return torch.div(lengths + self.downsample - 1, self.downsample, rounding_mode="floor").clamp(min=1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._downsample(x)
        out_lengths = self.output_lengths(lengths)
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < out_lengths[:, None]
        return self._read(x, valid), out_lengths

    def forward_rows(self, x: torch.Tensor, clip_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter over clips packed into rows: x [R, T, width] encoder frames, clip_of [R, T] each frame's
        clip (-1: none). Each clip starts at a multiple of the stride and the frames after it up to the next
        multiple are empty, so its windows, and its frames' attention (within the clip), are what they are
        alone. Returns [R, ceil(T / stride), out] and each output frame's clip."""
        clip_of = F.pad(clip_of, (0, (-clip_of.shape[1]) % self.downsample), value=-1)[:, :: self.downsample]
        same = (clip_of[:, :, None] == clip_of[:, None, :])[:, None]
        return self._read(self._downsample(x), same), clip_of

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        # Pad the time axis up to a multiple of the stride so no frame is dropped silently.
        x = F.pad(x, (0, 0, 0, (-x.shape[1]) % self.downsample))
        return F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)

    def _read(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The body (its attention within `mask`, AdapterBlock's), the norm and the projection."""
        if isinstance(self.body, nn.ModuleList):
            for block in self.body:
                x = block(x, mask)
        else:
            x = self.body(x)
        return self.proj(self.norm(x))
