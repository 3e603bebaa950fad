"""What an LLM's embedding module outputs for its tokens. Some subclasses of `nn.Embedding` scale their output
(Gemma multiplies by the square root of the width), so the weight rows are not what the LLM reads, and a head tied
to them scores with the unscaled rows."""

from __future__ import annotations

import torch
from torch import nn


def embedding_scale(embeddings: nn.Module) -> float:
    """The factor by which an embedding module multiplies its weight rows (Gemma's scaled embeddings: the square
    root of the width; 1 for a plain `nn.Embedding`), found by calling it on one token, so any subclass that scales
    its output uniformly is read right. 1.0 on the meta device, where there is nothing to read."""
    weight = embeddings.weight
    if weight.device.type == "meta" or weight.numel() == 0:
        return 1.0
    with torch.no_grad():
        row = weight.detach().norm(dim=1).argmax()  # a row that is not the padding's zeros
        out = embeddings(row.view(1)).float()[0]
        base = weight[row].float()
        return float((out @ base) / (base @ base))


def embedding_rows(embeddings: nn.Module, count: int, chunk: int = 16384) -> torch.Tensor:
    """The first `count` rows as the embedding module outputs them (scaled where it scales): what the LLM reads
    for each token. Built in chunks through the module's own call."""
    device = embeddings.weight.device
    with torch.no_grad():
        return torch.cat([embeddings(torch.arange(start, min(start + chunk, count), device=device))
                          for start in range(0, count, chunk)])
