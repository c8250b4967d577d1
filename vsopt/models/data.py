"""Procedural video clips with descriptions: the training data of the reference model.

A clip is drawn directly in the model's latent space (there is no VAE): a float32 tensor
(C, F, H, W) = (4, frames, height, width), values roughly in [-2, 2] (standard deviation
about 0.5). Each clip shows up to three
textured shapes (circle, square, triangle, cross) over a textured, slowly drifting background.
Every shape moves (left/right/up/down or stays), turns (clockwise, counter-clockwise or not) and
changes size (grows, shrinks or not); shapes are painted back to front, so they occlude each other.

The description of a clip is a fixed-length token sequence (DESCRIPTION_LEN tokens):

    [background]  then per shape, back to front: [colour, shape, motion, turn, size]

padded with <pad> for absent shapes. describe() turns tokens into text. An all-<pad> sequence is
the empty description, used for classifier-free guidance.

Everything is deterministic from a seed: scene parameters are drawn on the CPU from a
torch.Generator, rendering is plain tensor math on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CHANNELS = 4
MAX_SHAPES = 3

BACKGROUNDS = ("stripes", "checker", "waves")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "cross")
MOTIONS = ("still", "left", "right", "up", "down")
TURNS = ("steady", "clockwise", "anticlockwise")
SIZES = ("fixed", "growing", "shrinking")

VOCAB: tuple[str, ...] = ("<pad>",) + BACKGROUNDS + COLOURS + SHAPES + MOTIONS + TURNS + SIZES
TOKEN = {word: i for i, word in enumerate(VOCAB)}
WORDS_PER_SHAPE = 5
DESCRIPTION_LEN = 1 + MAX_SHAPES * WORDS_PER_SHAPE

# Colour of each name in the 4 latent channels (latent_to_rgb maps them back to something that
# looks like the name). Channel 3 is a "brightness" channel the background mostly lacks.
_PALETTE = torch.tensor([
    [0.95, -0.60, -0.60, 0.50],   # red
    [-0.60, 0.90, -0.50, 0.40],   # green
    [-0.60, -0.40, 0.95, 0.40],   # blue
    [0.90, 0.85, -0.70, 0.60],    # yellow
    [0.60, -0.70, 0.80, 0.30],    # purple
    [0.85, 0.85, 0.85, 0.90],     # white
])
# latent (C) -> RGB in [0, 1]: the first three channels are colour, the fourth adds brightness
_TO_RGB = torch.tensor([
    [0.45, 0.0, 0.0, 0.15],
    [0.0, 0.45, 0.0, 0.15],
    [0.0, 0.0, 0.45, 0.15],
]) / 2  # undoes DATA_SCALE

DATA_SCALE = 2.0  # brings the clips' standard deviation to about 0.5 against unit noise

_MOTION_DIR = torch.tensor([[0.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])  # (x, y), y down
_TURN_RATE = torch.tensor([0.0, 1.0, -1.0])  # sign of the angular velocity (clockwise on screen: +)
_SIZE_RATE = torch.tensor([0.0, 0.7, -0.45])  # relative size change over the clip


@dataclass(frozen=True)
class Scenes:
    """Parameters of B scenes (all tensors on the CPU, leading dim B; S = MAX_SHAPES).

    tokens (B, DESCRIPTION_LEN) long; background (B,) index into BACKGROUNDS; bg_colour (B, 2, C)
    the two colours the background pattern blends; bg_freq (B, 2) spatial frequency (x, y);
    bg_phase (B,); bg_drift (B, 2) pattern velocity; present (B, S) bool; colour, shape, motion,
    turn, size (B, S) indices into their word lists; start (B, S, 2) centre at frame 0 in [-1, 1]
    coordinates; speed (B, S); angle0 (B, S); spin (B, S) radians over the clip; scale0 (B, S)
    radius in [-1, 1] units; tex_freq (B, S), tex_phase (B, S) the stripes inside each shape.
    """

    tokens: torch.Tensor
    background: torch.Tensor
    bg_colour: torch.Tensor
    bg_freq: torch.Tensor
    bg_phase: torch.Tensor
    bg_drift: torch.Tensor
    present: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    motion: torch.Tensor
    turn: torch.Tensor
    size: torch.Tensor
    start: torch.Tensor
    speed: torch.Tensor
    angle0: torch.Tensor
    spin: torch.Tensor
    scale0: torch.Tensor
    tex_freq: torch.Tensor
    tex_phase: torch.Tensor

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]


def _uniform(g: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g)


def _choice(g: torch.Generator, shape: tuple[int, ...], n: int) -> torch.Tensor:
    return torch.randint(0, n, shape, generator=g)


def sample_scenes(batch: int, seed: int) -> Scenes:
    """Draw the parameters of `batch` scenes, deterministically from `seed` (CPU generator)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    g = torch.Generator().manual_seed(int(seed))
    B, S = batch, MAX_SHAPES
    n_shapes = 1 + _choice(g, (B,), S)
    present = torch.arange(S)[None, :] < n_shapes[:, None]
    background = _choice(g, (B,), len(BACKGROUNDS))
    bg_colour = _uniform(g, (B, 2, CHANNELS), -0.5, 0.5)
    bg_colour[..., 3] *= 0.3
    bg_freq = _uniform(g, (B, 2), 1.5, 4.0)
    bg_phase = _uniform(g, (B,), 0.0, 2 * math.pi)
    bg_drift = _uniform(g, (B, 2), -0.4, 0.4)
    colour = _choice(g, (B, S), len(COLOURS))
    shape = _choice(g, (B, S), len(SHAPES))
    motion = _choice(g, (B, S), len(MOTIONS))
    turn = _choice(g, (B, S), len(TURNS))
    size = _choice(g, (B, S), len(SIZES))
    speed = _uniform(g, (B, S), 0.6, 1.1)  # distance travelled over the clip, in [-1, 1] units
    # start so that the path is centred on a random point: the shape stays mostly in view
    centre = _uniform(g, (B, S, 2), -0.45, 0.45)
    start = centre - 0.5 * speed[..., None] * _MOTION_DIR[motion]
    angle0 = _uniform(g, (B, S), 0.0, 2 * math.pi)
    spin = _TURN_RATE[turn] * _uniform(g, (B, S), 1.2, 2.4)
    scale0 = _uniform(g, (B, S), 0.26, 0.42)
    tex_freq = _uniform(g, (B, S), 6.0, 12.0)
    tex_phase = _uniform(g, (B, S), 0.0, 2 * math.pi)

    tokens = torch.zeros(B, DESCRIPTION_LEN, dtype=torch.long)
    tokens[:, 0] = TOKEN[BACKGROUNDS[0]] + background
    words = torch.stack([
        TOKEN[COLOURS[0]] + colour, TOKEN[SHAPES[0]] + shape, TOKEN[MOTIONS[0]] + motion,
        TOKEN[TURNS[0]] + turn, TOKEN[SIZES[0]] + size,
    ], dim=-1)  # (B, S, 5)
    words = torch.where(present[..., None], words, torch.zeros_like(words))
    tokens[:, 1:] = words.flatten(1)
    return Scenes(tokens, background, bg_colour, bg_freq, bg_phase, bg_drift, present, colour, shape,
                  motion, turn, size, start, speed, angle0, spin, scale0, tex_freq, tex_phase)


def _shape_distance(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance-like field of each shape in its own unit frame (negative inside).

    shape: (B, S, 1, 1, 1) indices; u, v: (B, S, F, H, W) local coordinates (radius 1)."""
    circle = torch.sqrt(u * u + v * v) - 1.0
    square = torch.maximum(u.abs(), v.abs()) - 0.8
    # equilateral triangle: the largest of three edge distances (edge normals 120 degrees apart)
    tri = torch.full_like(u, -math.inf)
    for k in range(3):
        a = math.pi / 2 + 2 * math.pi * k / 3
        tri = torch.maximum(tri, u * math.cos(a) + v * math.sin(a))
    triangle = tri - 0.5
    arm_h = torch.maximum(u.abs() - 0.95, v.abs() - 0.32)
    arm_v = torch.maximum(u.abs() - 0.32, v.abs() - 0.95)
    cross = torch.minimum(arm_h, arm_v)
    fields = torch.stack([circle, square, triangle, cross])  # order of SHAPES
    return torch.gather(fields, 0, shape.expand_as(u)[None]).squeeze(0)


def render(scenes: Scenes, frames: int = 16, height: int = 32, width: int = 32,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw the clips of `scenes`: float32 (B, C, frames, height, width), values about [-2, 2]."""
    if frames < 2 or height < 4 or width < 4:
        raise ValueError(f"clip size must be at least 2 frames of 4x4, got {frames}x{height}x{width}")
    dev = torch.device(device)
    sc = {k: getattr(scenes, k).to(dev) for k in Scenes.__dataclass_fields__}
    B, S = scenes.batch, MAX_SHAPES
    t = torch.linspace(0.0, 1.0, frames, device=dev)  # clip time in [0, 1]
    ys = (torch.arange(height, device=dev) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=dev) + 0.5) / width * 2 - 1
    y, x = ys[:, None], xs[None, :]  # (H, 1), (1, W)

    # background: a pattern in [0, 1] blending two colours, drifting over time
    bx = x[None, None] - sc["bg_drift"][:, 0, None, None, None] * t[None, :, None, None]  # (B, F, 1, W)
    by = y[None, None] - sc["bg_drift"][:, 1, None, None, None] * t[None, :, None, None]  # (B, F, H, 1)
    fx = sc["bg_freq"][:, 0, None, None, None] * math.pi
    fy = sc["bg_freq"][:, 1, None, None, None] * math.pi
    ph = sc["bg_phase"][:, None, None, None]
    stripes = 0.5 + 0.5 * torch.sin(fx * bx + fy * by + ph)
    checker = 0.5 + 0.5 * torch.tanh(4 * torch.sin(fx * bx + ph) * torch.sin(fy * by))
    waves = 0.5 + 0.25 * (torch.sin(fx * bx + 2 * torch.sin(fy * by) + ph) + torch.sin(fy * by - ph))
    kind = sc["background"][:, None, None, None]
    pattern = torch.where(kind == 0, stripes, torch.where(kind == 1, checker, waves))  # (B, F, H, W)
    c0, c1 = sc["bg_colour"][:, 0], sc["bg_colour"][:, 1]  # (B, C)
    video = c0[:, :, None, None, None] + (c1 - c0)[:, :, None, None, None] * pattern[:, None]

    # shapes, back to front: position, angle and scale are functions of clip time
    tt = t[None, None, :]  # (1, 1, F)
    centre = sc["start"][:, :, None, :] + (sc["speed"][..., None] * tt)[..., None] * _MOTION_DIR.to(dev)[sc["motion"]][:, :, None, :]
    angle = sc["angle0"][..., None] + sc["spin"][..., None] * tt  # (B, S, F)
    scale = sc["scale0"][..., None] * (1 + _SIZE_RATE.to(dev)[sc["size"]][..., None] * tt)  # (B, S, F)
    dx = x[None, None, None] - centre[..., 0, None, None]  # (B, S, F, 1, W)
    dy = y[None, None, None] - centre[..., 1, None, None]  # (B, S, F, H, 1)
    cos, sin = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    s = scale[..., None, None]
    u = (cos * dx + sin * dy) / s  # rotate by -angle into the shape's frame, in radius units
    v = (-sin * dx + cos * dy) / s
    dist = _shape_distance(sc["shape"][:, :, None, None, None], u, v) * s  # back to [-1, 1] units
    pixel = 2.0 / min(height, width)
    alpha = (0.5 - dist / pixel).clamp(0.0, 1.0) * sc["present"][:, :, None, None, None]  # (B, S, F, H, W)
    texture = 0.72 + 0.28 * torch.sin(sc["tex_freq"][..., None, None, None] * u + sc["tex_phase"][..., None, None, None])
    colour = _PALETTE.to(dev)[sc["colour"]]  # (B, S, C)
    for i in range(S):
        paint = colour[:, i, :, None, None, None] * texture[:, i, None]  # (B, C, F, H, W)
        a = alpha[:, i, None]
        video = video * (1 - a) + paint * a
    return video * DATA_SCALE


def make_batch(batch: int, seed: int, frames: int = 16, height: int = 32, width: int = 32,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(clips (B, C, frames, height, width) float32, tokens (B, DESCRIPTION_LEN) long), from seed."""
    scenes = sample_scenes(batch, seed)
    return render(scenes, frames, height, width, device), scenes.tokens.to(device)


def tokenize(text: str) -> torch.Tensor:
    """Tokens (DESCRIPTION_LEN,) of a description written as describe() writes it.

    Words outside VOCAB raise ValueError naming them; punctuation and filler words are ignored."""
    filler = {"background", "a", "an", "and", "the", "moving", "on", "with"}
    words = [w for w in text.replace(",", " ").replace(";", " ").split() if w not in filler]
    unknown = [w for w in words if w not in TOKEN]
    if unknown:
        raise ValueError(f"unknown words in description {text!r}: {unknown}; known: {' '.join(VOCAB[1:])}")
    if not words or words[0] not in BACKGROUNDS:
        raise ValueError(f"a description starts with a background ({', '.join(BACKGROUNDS)}), got {text!r}")
    body = words[1:]
    if len(body) % WORDS_PER_SHAPE or len(body) > MAX_SHAPES * WORDS_PER_SHAPE:
        raise ValueError(f"each shape needs {WORDS_PER_SHAPE} words (colour shape motion turn size), "
                         f"at most {MAX_SHAPES} shapes; got {len(body)} words in {text!r}")
    groups = (COLOURS, SHAPES, MOTIONS, TURNS, SIZES)
    for j, w in enumerate(body):
        if w not in groups[j % WORDS_PER_SHAPE]:
            raise ValueError(f"word {j + 2} of {text!r} is {w!r}; expected one of {groups[j % WORDS_PER_SHAPE]}")
    out = torch.zeros(DESCRIPTION_LEN, dtype=torch.long)
    out[: len(words)] = torch.tensor([TOKEN[w] for w in words])
    return out


def describe(tokens: torch.Tensor) -> str:
    """Text of one description (DESCRIPTION_LEN,), e.g. 'stripes background; red square moving
    left, clockwise, growing'."""
    words = [VOCAB[int(i)] for i in tokens.tolist()]
    parts = [f"{words[0]} background"] if words[0] != "<pad>" else ["(empty)"]
    for i in range(MAX_SHAPES):
        w = words[1 + i * WORDS_PER_SHAPE: 1 + (i + 1) * WORDS_PER_SHAPE]
        if w[0] != "<pad>":
            parts.append(f"{w[0]} {w[1]} moving {w[2]}, {w[3]}, {w[4]}")
    return "; ".join(parts)


def latent_to_rgb(video: torch.Tensor) -> torch.Tensor:
    """(C, F, H, W) latent clip -> (F, H, W, 3) uint8 frames for viewing."""
    if video.dim() != 4 or video.shape[0] != CHANNELS:
        raise ValueError(f"expected a ({CHANNELS}, F, H, W) clip, got {tuple(video.shape)}")
    rgb = torch.einsum("rc,cfhw->fhwr", _TO_RGB.to(video.device, torch.float32), video.float()) + 0.5
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
