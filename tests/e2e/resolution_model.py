"""A small joint text+video attention model and a plan calibrated on it at one clip size, shared by
tests/e2e/test_resolution.py and tests/e2e/test_dynamic_shapes.py.

JointModel: Conv3d patch embedding (1, 2, 2) of a (B, 3, F, 2H, 2W) clip -> video tokens, a
linear of the text (B, T, 8) -> text tokens, cat([video, text]) (grid F x H x W + T text after),
one multi-head SDPA, the video part projected out. Heads 0-2 carry a planted locality: q.k is
minus the squared distance of the tokens in the head's order (ORDERS[h]), in units of the clip
(positions normalized to 0..64, so the structure scales with the resolution, as a real model's
does), a window of a few units wide; so calibrated masks are sparse and resampling them matters. Its attention is split in methods (qkv_of,
out_of) so the reference can run the same model with the site's output replaced by vsopt.core
.semantics.site_output.

calibrated_plan(): at the calibration size, the site's measured block attention mass
(metrics.block_attention_mass, what calibration measures) gives each mask head the fewest blocks
holding 90% of it (patterns.calibrated_block_mask, calibration's own rule), in its token order;
one head runs a pattern (a local window), one a dynamic top-k mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vsopt.core.dynamic import DynamicMethod, DynamicSpec
from vsopt.core.ir import TokenGrid
from vsopt.core.metrics import block_attention_mass
from vsopt.core.orders import TokenOrder, order_permutation
from vsopt.core.patterns import LocalWindow, calibrated_block_mask
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity
from vsopt.core.semantics import site_output

HEADS, D, BLOCK = 4, 8, 16
SITE = "attn"
ORDERS = (TokenOrder.FHW, TokenOrder.HWF, TokenOrder.WFH, TokenOrder.FHW)


class Attention(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def qkv_of(self, x, frames: int, height: int, width: int):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        pos = planted_positions(frames, height, width, N - frames * height * width)  # (3, N)
        c, video = 0.5 / WIDTH ** 2, (pos >= 0).to(q.dtype)
        pos = pos.clamp_min(0)
        zero = torch.zeros_like(pos)
        planted_q = torch.stack([2 * c * pos, video] + [zero] * (D - 2), -1)  # (3, N, D)
        planted_k = torch.stack([pos, -c * pos * pos] + [zero] * (D - 2), -1)
        q = torch.cat([q[:, :3] * 0.1 + planted_q / SCALE, q[:, 3:]], 1)
        k = torch.cat([k[:, :3] * 0.1 + planted_k, k[:, 3:]], 1)
        return q, k, v

    def out_of(self, o):
        B, H, N, Dh = o.shape
        return self.out(o.transpose(1, 2).reshape(B, N, H * Dh))

    def forward(self, x, frames: int, height: int, width: int):
        q, k, v = self.qkv_of(x, frames, height, width)
        return self.out_of(F.scaled_dot_product_attention(q, k, v))


WIDTH, SCALE = 2.0, D ** -0.5


def planted_positions(frames, height, width, text):
    """(3, N): per planted head, each video token's place in that head's order (ORDERS[h])
    scaled to 0..64; -1 for the text tokens after the video."""
    f = torch.arange(frames).view(-1, 1, 1).expand(frames, height, width).reshape(-1)
    h = torch.arange(height).view(1, -1, 1).expand(frames, height, width).reshape(-1)
    w = torch.arange(width).view(1, 1, -1).expand(frames, height, width).reshape(-1)
    n = frames * height * width
    places = [(f * height + h) * width + w, (h * width + w) * frames + f, (w * frames + f) * height + h]
    out = torch.stack(places).float() * (64.0 / n)
    return torch.cat([out, torch.full((3, text), -1.0)], 1)


class JointModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        dim = HEADS * D
        self.patch = torch.nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.text = torch.nn.Linear(8, dim)
        self.attn = Attention(dim)

    def tokens(self, clip, text):
        video = self.patch(clip).flatten(2).transpose(1, 2)
        return torch.cat([video, self.text(text)], 1), video.shape[1]

    def forward(self, clip, text):
        x, nv = self.tokens(clip, text)
        return self.attn(x, clip.shape[2], clip.shape[3] // 2, clip.shape[4] // 2)[:, :nv]


def model() -> JointModel:
    torch.manual_seed(0)
    return JointModel().eval()


def inputs(frames: int, height: int, width: int, text: int, seed: int = 1):
    """A clip of frames x height x width latent tokens (pixels 2x) and `text` text tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, frames, 2 * height, 2 * width, generator=g), torch.randn(1, text, 8, generator=g)


def grid_of(frames: int, height: int, width: int, text: int) -> TokenGrid:
    return TokenGrid(frames, height, width, text_after=text)


def head_plans(m: JointModel, clip, text, grid: TokenGrid) -> tuple[HeadPlan, ...]:
    with torch.no_grad():
        q, k, _ = m.attn.qkv_of(m.tokens(clip, text)[0], grid.frames, grid.height, grid.width)
    heads = []
    for h, order in enumerate(ORDERS[:2]):
        perm = order_permutation(grid, order)
        mass = block_attention_mass(q[:, h:h + 1, perm], k[:, h:h + 1, perm], SCALE, BLOCK, BLOCK)[0, 0]
        heads.append(HeadPlan(Sparsity.MASK, order=order, block_m=BLOCK, block_n=BLOCK,
                              mask=calibrated_block_mask(mass, 0.9)))
    heads.append(HeadPlan(Sparsity.PATTERN, order=ORDERS[2], block_m=BLOCK, block_n=BLOCK, pattern=LocalWindow(0, 1, 1)))
    heads.append(HeadPlan(Sparsity.DYNAMIC, block_m=BLOCK, block_n=BLOCK,
                          dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.5)))
    return tuple(heads)


CALIBRATION = (4, 8, 8, 5)  # frames, height, width, text tokens: 261 tokens


def calibrated_plan() -> Plan:
    m = model()
    grid = grid_of(*CALIBRATION)
    heads = head_plans(m, *inputs(*CALIBRATION), grid)
    return Plan({SITE: SitePlan(SITE, HEADS, grid.num_tokens, grid.num_tokens, grid, heads)})


def reference(m: JointModel, site, heads, clip, text) -> torch.Tensor:
    """The model's output with its attention computed by semantics.site_output under `heads`
    (the plan's meaning at that site: vsopt.core.semantics)."""
    with torch.no_grad():
        x, nv = m.tokens(clip, text)
        q, k, v = m.attn.qkv_of(x, site.grid.frames, site.grid.height, site.grid.width)
        o = site_output(site, heads, q, k, v, SCALE).to(q.dtype)
        return m.attn.out_of(o)[:, :nv]
