"""SiteCall: one execution of one attention site, as calibration observes it (capture.run_observing
makes them; order_choice, measure and the bench read them). Below capture and order_choice, so
that neither imports the other for it."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SiteCall:
    """One execution of one attention site. q: (B, Hq, N, D); k, v: (B, Hkv, N, D); out: (B, Hq, N, Dv)."""

    site_id: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None
    scale: float
    is_causal: bool
    out: torch.Tensor
    softcap: float = 0.0  # > 0: the site's logit cap, scores -> softcap * tanh(scores / softcap)


__all__ = ["SiteCall"]
