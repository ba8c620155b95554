"""Heads on bags of frozen tile embeddings (multiple-instance learning): a label per image, slide or patient, never
per tile.

Every head takes features (B, N, D), a batch of bags padded to the longest, and a mask (B, N), True on a bag's
real tiles, and gives class logits (B, C). Padding never changes a bag's output: padded tiles are zeroed before
any layer, take exactly zero attention (their scores are -inf before the softmax), and are left out of a mean or
a max. A bag without a real tile is refused (ValueError): it has no output to give.

    ABMIL     gated attention pooling (Ilse, Tomczak & Welling 2018, "Attention-based deep multiple instance
              learning", eq. 9): a = softmax(w^T (tanh(V h) * sigmoid(U h))), z = sum a h; optional projection
              of the features first (linear, ReLU, dropout), dropout on the attention branch
    MeanPool  the mean of a bag's (projected) tiles, then a linear classifier
    MaxPool   the per-feature max of a bag's (projected) tiles, then a linear classifier
"""

from __future__ import annotations

import torch
from torch import nn


def _check(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mask of a batch of bags (all tiles real where none is given), checked: one row per bag, a real tile in
    every row."""
    if x.ndim != 3:
        raise ValueError(f"bag features of shape {tuple(x.shape)}: expected (bags, tiles, features)")
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} for features of shape {tuple(x.shape)}")
    mask = mask.bool()
    if not bool(mask.any(1).all()):
        raise ValueError("a bag without a real tile (its mask is all False): it has no output; leave it out")
    return mask


def _projection(in_features: int, hidden: int | None, dropout: float) -> tuple[nn.Module, int]:
    if not hidden:
        return nn.Identity(), in_features
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout)), hidden


class GatedAttention(nn.Module):
    """Attention scores of tiles (B, N, L) -> (B, N): w^T (tanh(V h) * sigmoid(U h)) (Ilse et al. 2018, eq. 9)."""

    def __init__(self, in_features: int, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.V, self.U = nn.Linear(in_features, hidden), nn.Linear(in_features, hidden)
        self.dropout = nn.Dropout(dropout)
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(self.dropout(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h)))).squeeze(-1)


class BagHead(nn.Module):
    """What the bag heads share: the optional projection, the classifier, and each tile as a bag of its own."""

    bag_input = True  # the training code feeds these heads (features, mask), not a batch of vectors

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.project, width = _projection(in_features, hidden, dropout)
        self.classifier = nn.Linear(width, num_classes)

    def tiles(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The projected tiles (B, N, L), padded ones zero (whatever the padding holds, NaN included, it reaches
        no output)."""
        keep = mask.unsqueeze(-1)
        return torch.where(keep, self.project(torch.where(keep, x, torch.zeros((), dtype=x.dtype))), 0.0)

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, C) of bags (B, N, D) with mask (B, N)."""
        mask = _check(x, mask)
        return self.classifier(self.pool(self.tiles(x, mask), mask))

    def tile_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits (N, C) of tiles (N, D), each taken as a bag of one: the head's verdict on each tile alone."""
        return self(features.unsqueeze(1))


class ABMIL(BagHead):
    """Gated attention MIL: tiles projected (optional), weighted by attention that sums to one over a bag's real
    tiles, summed, classified."""

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = 128, attention: int = 128,
                 dropout: float = 0.25) -> None:
        super().__init__(in_features, num_classes, hidden, dropout)
        width = self.classifier.in_features
        self.attention = GatedAttention(width, attention, dropout)

    def attention_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention (B, N) of bags (B, N, D): sums to one over each bag's real tiles, exactly 0 on padding."""
        mask = _check(x, mask)
        return self._weights(self.tiles(x, mask), mask)

    def _weights(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.attention(h).masked_fill(~mask, float("-inf")), dim=1)

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bn,bnl->bl", self._weights(h, mask), h)


class MeanPool(BagHead):
    """The mean of a bag's real tiles (projected where hidden is set), then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0) -> None:
        super().__init__(in_features, num_classes, hidden, dropout)

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return h.sum(1) / mask.sum(1, keepdim=True).to(h.dtype)


class MaxPool(BagHead):
    """The per-feature max over a bag's real tiles (projected where hidden is set), then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0) -> None:
        super().__init__(in_features, num_classes, hidden, dropout)

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return h.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(1).values


BAG_HEADS = ("ABMIL", "MeanPool", "MaxPool")


def is_bag_head(model_cfg: object) -> bool:
    """Whether a model config names a head on bags (_target_ histoflow.models.ABMIL, ...mil.MeanPool, ...)."""
    target = str(model_cfg.get("_target_") or "") if hasattr(model_cfg, "get") else ""
    module, _, name = target.rpartition(".")
    return module in ("histoflow.models", "histoflow.models.mil") and name in BAG_HEADS
