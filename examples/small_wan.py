"""A small diffusers WanTransformer3DModel (random weights) and one denoising step's inputs, shared
by the examples so that they run on a CPU in seconds. Use your own model the same way: any
nn.Module and a tuple of example inputs.

    model, inputs = make(frames=2, size=8)     # latents (1, 4, frames, size, size), timestep, text
"""
from __future__ import annotations

import torch


def make(frames: int = 2, size: int = 8, layers: int = 2, heads: int = 2, head_dim: int = 16, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                  in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                  num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads").eval()
    latents = torch.randn(1, 4, frames, size, size)
    return model, (latents, torch.tensor([500.0]), torch.randn(1, 6, 32))


def window_plan(model, inputs, block: int = 16):
    """A plan for every self-attention site: a 3D local window (one frame, two patches each way)
    in the HWF token order; cross-attention sites stay dense."""
    import vsopt
    from vsopt.core.patterns import LocalWindow
    from vsopt.core.plan import HeadPlan, Plan, Sparsity

    report = vsopt.inspect(model, *inputs)
    head = HeadPlan(Sparsity.PATTERN, order="hwf", pattern=LocalWindow(1, 2, 2), block_m=block, block_n=block)
    return Plan.uniform([s for s in report.sites if s.is_self_attention], head, meta={"made_by": "examples"})


def reference(frames: int = 4, size: int = 16, seed: int = 0,
              description: str = "checker background; red circle moving right, clockwise, growing"):
    """vsopt's shipped reference model (a small diffusers Wan trained on procedural clips; its
    attention has real structure, unlike random weights) with one mid-trajectory step's inputs."""
    from vsopt.models import data
    from vsopt.models.model import load_shipped

    ref = load_shipped()
    cond = ref.encode(data.tokenize(description)[None]).detach().float()
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, data.CHANNELS, frames, size, size), generator=g)
    return ref.transformer.eval(), (latents, torch.tensor([500.0]), cond)
