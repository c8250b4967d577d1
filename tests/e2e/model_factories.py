"""Small real models (library code, tiny configs, random weights, no downloads) with example
inputs, shared by the model tests and usable as `vsopt inspect tests/e2e/model_factories.py:wan`."""
from __future__ import annotations

import torch


def wan():
    """diffusers WanTransformer3DModel: self-attention over a 2x4x4 grid, cross-attention to text."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                  rope_max_seq_len=32).eval()
    x = torch.randn(1, 4, 2, 8, 8)
    return model, (x, torch.tensor([500]), torch.randn(1, 5, 16))


def cogvideox():
    """diffusers CogVideoXTransformer3DModel: joint attention over 6 text + 2x4x4 video tokens."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        num_layers=2, sample_width=8, sample_height=8, sample_frames=5,
                                        patch_size=2, text_embed_dim=16, time_embed_dim=8, max_text_seq_length=6,
                                        temporal_compression_ratio=4).eval()
    x = torch.randn(1, 2, 4, 8, 8)
    return model, (x, torch.randn(1, 6, 16), torch.tensor([10]))


def videomae(attn_implementation: str = "eager"):
    """transformers VideoMAEModel, tubelet 2 and patch 4: 2x4x4 tokens."""
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(0)
    cfg = VideoMAEConfig(image_size=16, patch_size=4, num_channels=3, num_frames=4, tubelet_size=2, hidden_size=16,
                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                         attn_implementation=attn_implementation)
    return VideoMAEModel(cfg).eval(), (torch.randn(1, 4, 3, 16, 16),)


def videomae_sdpa():
    return videomae("sdpa")


def timm_vit(fused_attn: bool = True):
    """timm VisionTransformer, 16x16 image, patch 4: a cls token + 4x4 tokens."""
    import timm

    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2,
                                                              num_heads=2, num_classes=3).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused_attn
    return model, (torch.randn(1, 3, 16, 16),)


def timm_vit_unfused():
    return timm_vit(False)
