"""The rewrite rules that recognise attention in an ATen graph (used by passes/detect_attention.py
and passes/rewrite_attention.py).

    match.py      AttentionRule (pattern / check / rewrite), AttentionMatch, MatchResult
    sdpa.py       SdpaRule(op_name): F.scaled_dot_product_attention in each ATen spelling
    softmax.py    SoftmaxAttentionRule(): softmax(scale * q @ k^T + mask) @ v with matmuls
    operands.py   a matmul's operands as layout_trace atoms (for the softmax rule)
    score_mask.py the mask on the scores: which fills are exact, what fully masked rows give
    canonical.py  what the softmax rule emits (typed records) and the emitters

DEFAULT_RULES is the order detection tries them in; the first rule whose pattern anchors on a
node decides it.
"""
from .match import AttentionMatch, AttentionRule, MatchResult
from .sdpa import SDPA_OPS, SdpaEmit, SdpaRule
from .softmax import SoftmaxAttentionRule
from .canonical import SoftmaxEmit

DEFAULT_RULES: list[AttentionRule] = [SdpaRule(name) for name in SDPA_OPS] + [SoftmaxAttentionRule()]

__all__ = ["DEFAULT_RULES", "SDPA_OPS", "AttentionMatch", "AttentionRule", "MatchResult", "SdpaEmit", "SdpaRule",
           "SoftmaxAttentionRule", "SoftmaxEmit"]
