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


# ----------------------------------------------------------------------------- issue 14: more video transformers


def hunyuan_video():
    """diffusers HunyuanVideoTransformer3DModel: a text token refiner (masked text self-attention), one
    dual-stream block and one single-stream block (joint attention over 2x4x4 video + 4 text tokens,
    the text's padding masked)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                                           patch_size=2, patch_size_t=1, guidance_embeds=False, text_embed_dim=16,
                                           pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)).eval()
    x = torch.randn(1, 4, 2, 8, 8)
    text_mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    return model, (x, torch.tensor([500]), torch.randn(1, 4, 16), text_mask, torch.randn(1, 8))


def hunyuan_video15():
    """diffusers HunyuanVideo15Transformer3DModel (HunyuanVideo 1.5), image-to-video: joint attention over
    2x4x4 video tokens then 10 tokens of image and two text encoders, the text's padding masked. Its
    forward branches on the data (`if torch.all(image_embeds == 0)`): torch.export stops there, Dynamo
    breaks the graph."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(in_channels=9, out_channels=4, num_attention_heads=2,
                                             attention_head_dim=16, num_layers=1, num_refiner_layers=1,
                                             mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
                                             text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(4, 6, 6),
                                             task_type="i2v").eval()
    x = torch.randn(1, 9, 2, 4, 4)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    mask2 = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    return model, (x, torch.tensor([500.0]), torch.randn(1, 4, 16), mask, None, torch.randn(1, 3, 8), mask2,
                   torch.randn(1, 3, 8))


def mochi():
    """diffusers MochiTransformer3DModel: joint attention over 2x4x4 video + 4 text tokens, the text cut
    to its unpadded length (3 tokens) by the mask."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=16,
                                    max_sequence_length=4).eval()
    x = torch.randn(1, 4, 2, 8, 8)
    text_mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    return model, (x, torch.randn(1, 4, 16), torch.tensor([500]), text_mask)


def ltx_video():
    """diffusers LTXVideoTransformer3DModel: pre-patchified input (B, F*H*W, C) of a 2x4x4 grid given as
    num_frames/height/width; self-attention, and cross-attention to 4 text tokens."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                       num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                                       num_layers=2, caption_channels=16).eval()
    x = torch.randn(1, 2 * 4 * 4, 8)
    return model, (x, torch.randn(1, 4, 16), torch.tensor([500]), torch.ones(1, 4, dtype=torch.bool), 2, 4, 4)


def allegro():
    """diffusers AllegroTransformer3DModel: self-attention over 2x4x4 video tokens, cross-attention to text."""
    from diffusers import AllegroTransformer3DModel

    torch.manual_seed(0)
    model = AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
                                      in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=32,
                                      sample_height=8, sample_width=8, sample_frames=2, caption_channels=16).eval()
    x = torch.randn(1, 4, 2, 8, 8)
    return model, (x, torch.randn(1, 4, 16), torch.tensor([500]))


def cogvideox15():
    """diffusers CogVideoXTransformer3DModel as in CogVideoX 1.5: temporal patches (patch_size_t 2) and
    rotary embeddings; joint attention over 6 text + 2x4x4 video tokens."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        num_layers=2, sample_width=8, sample_height=8, sample_frames=13,
                                        patch_size=2, patch_size_t=2, text_embed_dim=16, time_embed_dim=8,
                                        max_text_seq_length=6, temporal_compression_ratio=4,
                                        use_rotary_positional_embeddings=True, ofs_embed_dim=8).eval()
    x = torch.randn(1, 4, 4, 8, 8)
    return model, (x, torch.randn(1, 6, 16), torch.tensor([10]), None, torch.tensor([2.0]))


def timesformer():
    """transformers TimesformerModel, divided space-time: per layer a temporal attention (2 frames at
    each of 4x4 positions) and a spatial attention (a cls token + 4x4 patches in each frame)."""
    from transformers import TimesformerConfig, TimesformerModel

    torch.manual_seed(0)
    cfg = TimesformerConfig(image_size=16, patch_size=4, num_channels=3, num_frames=2, hidden_size=32,
                            num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return TimesformerModel(cfg).eval(), (torch.randn(1, 2, 3, 16, 16),)


def vivit():
    """transformers VivitModel: tubelets 2x4x4 of a 4x16x16 clip, a cls token + 2x4x4 tokens."""
    from transformers import VivitConfig, VivitModel

    torch.manual_seed(0)
    cfg = VivitConfig(image_size=16, num_frames=4, tubelet_size=[2, 4, 4], num_channels=3, hidden_size=32,
                      num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return VivitModel(cfg, add_pooling_layer=False).eval(), (torch.randn(1, 4, 3, 16, 16),)


class _SelfAttention(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Branchy(torch.nn.Module):
    """A data-dependent Python branch (as HunyuanVideo 1.5's `if torch.all(image_embeds == 0)`), then
    a Conv3d patch embedding and two video self-attentions over a 2x4x4 grid: torch.export stops at
    the branch, Dynamo breaks the graph there."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv3d(3, 32, (1, 2, 2), stride=(1, 2, 2))
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"attn": _SelfAttention(32, 2)}) for _ in range(2))

    def forward(self, x, image):
        if torch.all(image == 0):  # text-to-video: no image condition
            x = x * 0.5
        h = self.patch(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            h = block["attn"](h)
        return h


def branchy():
    torch.manual_seed(0)
    return _Branchy().eval(), (torch.randn(1, 3, 2, 8, 8), torch.ones(1, 4))
