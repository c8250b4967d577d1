"""What the backend promises (docs/RELIABILITY.md): it never changes a result on its own, it says
what it left dense and why, and it runs what Dynamo hands it instead of failing into eager."""
from __future__ import annotations

import torch
import torch.nn as nn


class DropoutAttention(nn.Module):
    def __init__(self, p: float = 0.1):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.drop((q @ k.transpose(-1, -2) * 0.3).softmax(-1)) @ v


def test_dynamic_shapes_with_dropout_compile():
    """dynamic=True makes Dynamo pass nn.Dropout's p as a 0-d tensor read with .item(); the
    re-trace used to fail on aten._local_scalar_dense and Dynamo ran the model eagerly."""
    model = DropoutAttention().eval()
    x = torch.randn(2, 5, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vsopt", dynamic=True, fullgraph=True)  # a failure raises
    torch.testing.assert_close(compiled(x), model(x))
    y = torch.randn(3, 7, 8)  # another shape: the same graph (no recompilation needed)
    torch.testing.assert_close(compiled(y), model(y))
