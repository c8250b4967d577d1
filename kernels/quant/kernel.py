"""Triton kernels that quantize attention inputs (see kernels/quant/reference.py for the math).

_channel_stats_kernel: per (b, h) the column abs-max of V (for V's per-channel FP8 / INT8 scale), in
one read of V: each program reduces ROWS tokens and merges its partial maxima with one atomic per
column. Only the 8-bit P V modes launch it; K needs no statistics pass (below).
_quantize_blocks_kernel: one program per (block of BLOCK tokens, b*h): optionally smooths (K: each
program first averages the SAMPLES rows of reference.smoothing_rows of its (b, h), the same loads
reduced in the same order in every program, so all get the identical vector; block 0 writes it out
as k_mean), takes amax(|x|) over the block, writes the codes and one float32 scale = amax / QMAX
(reference.QMAX). One read of x (plus the sampled rows, shared by a head's programs through L2),
one write of the codes.
_quantize_channels_fp8_kernel: V for FP8 P V: x / scale[d] cast to e4m3 (IS_INT8: rounded to INT8,
scale amax / 127, for the experimental INT8 P V) and written transposed,
(B, H, D, N_pad), because Hopper's FP8 tensor-core op wants its B operand K-major; the padding
columns are written as zeros by the same kernel.
_quantize_kv_kernel: the last two in one pass for the 8-bit P V modes: each program quantizes one
block of K (smoothed, per-block scale) and the same tokens of V (per channel, transposed), so the
launch reads K and V once, side by side, instead of in two launches (the same codes and scales:
both kernels call the same helpers).
REVERSE_HEADS: the programs of K's quantization (and of the fused K V one) take the heads in reverse
order, so the pass ends on head 0, whose codes the attention kernel, which walks the heads in order
(schedule.work_order), reads first (still in L2); in the fused K V launch the channel statistics
pass, which reads V head by head in order, also leaves the last heads of V in L2 (50 MB on an H200)
for its start. The codes are the same in any order.
Q's per-block quantization can also run inside the attention kernel's prologue
(block_sparse/kernel.py QUANT_Q, with quantize_block_codes below): no Q pass at all.
"""
import triton
import triton.language as tl


@triton.jit
def _round_half_away(x):
    return tl.where(x >= 0, tl.floor(x + 0.5), -tl.floor(-x + 0.5))


@triton.jit
def _int8_codes(y):
    """INT8 codes of y (|y| <= 127.5), rounded half away from zero, without conversion instructions.

    floor and float -> int conversions run on Hopper's quarter-rate conversion pipe; the rounding
    above takes two floors and a convert per element, the likely cause (not profiled) of the INT8
    quantization kernels' 2.0-2.3 TB/s against 3.4-3.7 for e4m3 on an H200
    (gpu_check_quant_overhead.py). Here: y + 1.5 *
    2^23 lands in the binade where the float spacing is 1, so its bits are 0x4B400000 + rint(y)
    (round to nearest even: one FADD), and its low byte is rint(y)'s two's complement code; a tie
    (y - rint(y) = +-0.5 exactly) that went toward zero is moved one step away, as the reference
    rounds (same codes as _round_half_away for every y; tests/kernels/test_quant_in_kernel.py)."""
    biased = y + 12582912.0
    d = y - (biased - 12582912.0)          # exact: y - rint(y)
    bits = biased.to(tl.int32, bitcast=True)
    bits = bits + tl.where((d == 0.5) & (y > 0), 1, 0) - tl.where((d == -0.5) & (y < 0), 1, 0)
    return bits.to(tl.int8)


@triton.jit
def _to_fp8(x, ROUND_IN_FP32: tl.constexpr):
    """fp32 -> e4m3. ROUND_IN_FP32 (set only under TRITON_INTERPRET): snap x to the e4m3 grid with
    fp32 math first, because the interpreter's own fp8 cast drops the carry when rounding up to the
    next power of two (125.9 -> 64); the GPU's cvt instruction rounds correctly and skips this."""
    if ROUND_IN_FP32:
        x = x.to(tl.float32)
        mag = tl.abs(x)
        exp = tl.maximum(tl.floor(tl.math.log2(tl.maximum(mag, 1e-30))), -6.0)   # e4m3: min normal 2^-6
        step = tl.math.exp2(exp - 3.0)                                          # 3 mantissa bits
        x = tl.where(x >= 0, 1.0, -1.0) * tl.floor(mag / step + 0.5) * step
    return x.to(tl.float8e4nv)


@triton.jit
def _load_rows(X, b, h, offs_n, N, stride_xb, stride_xh, stride_xn, HEAD_DIM: tl.constexpr):
    """Rows offs_n of x[b, h] (N, HEAD_DIM) in float32; rows at or past N read as zeros."""
    offs_d = tl.arange(0, HEAD_DIM)
    return tl.load(X + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :],
                   mask=offs_n[:, None] < N, other=0.0).to(tl.float32)


@triton.jit
def _channel_stats_rows(V, VAbsMax, b, h, bh, chunk, N, stride_vb, stride_vh, stride_vn,
                        ROWS: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr, DEFER: tl.constexpr):
    """Tokens [chunk * ROWS, + ROWS) of v[b, h] into the channel abs-maxima.
    DEFER: accumulate whole (TILE, HEAD_DIM) tiles element by element and reduce over rows once,
    after the loop (no cross-warp reduction per tile; the loads of successive tiles need not wait
    for one), instead of reducing each tile as it comes. The same maxima either way."""
    offs_d = tl.arange(0, HEAD_DIM)
    if DEFER:
        v_acc = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
        for start in range(chunk * ROWS, tl.minimum(chunk * ROWS + ROWS, N), TILE):
            offs_n = start + tl.arange(0, TILE)
            v_acc = tl.maximum(v_acc, tl.abs(_load_rows(V, b, h, offs_n, N, stride_vb, stride_vh, stride_vn, HEAD_DIM)))
        v_max = tl.max(v_acc, 0)
    else:
        v_max = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for start in range(chunk * ROWS, tl.minimum(chunk * ROWS + ROWS, N), TILE):
            offs_n = start + tl.arange(0, TILE)
            v = _load_rows(V, b, h, offs_n, N, stride_vb, stride_vh, stride_vn, HEAD_DIM)
            v_max = tl.maximum(v_max, tl.max(tl.abs(v), 0))
    tl.atomic_max(VAbsMax + bh * HEAD_DIM + offs_d, v_max)   # non-negative floats: max is exact


@triton.jit
def _channel_stats_kernel(V, VAbsMax, H, N, stride_vb, stride_vh, stride_vn,
                          ROWS: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr, DEFER: tl.constexpr = False):
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    _channel_stats_rows(V, VAbsMax, bh // H, bh % H, bh, chunk, N, stride_vb, stride_vh, stride_vn,
                        ROWS, TILE, HEAD_DIM, DEFER)


@triton.jit
def _smoothing_mean(X, b, h, N, stride_xb, stride_xh, stride_xn, HEAD_DIM: tl.constexpr, SAMPLES: tl.constexpr):
    """reference.smoothing_mean of x[b, h]: the float32 mean of rows i * N // SAMPLES, i < SAMPLES
    (all N rows when N <= SAMPLES; the rows past N then load as zeros), (HEAD_DIM,)."""
    i = tl.arange(0, SAMPLES).to(tl.int64)   # int64: i * N stays exact for any N
    rows = tl.where(N > SAMPLES, i * N // SAMPLES, i)
    x = _load_rows(X, b, h, rows, N, stride_xb, stride_xh, stride_xn, HEAD_DIM)
    return tl.sum(x, 0) / tl.sum((rows < N).to(tl.float32), 0)


@triton.jit
def quantize_block_codes(x, group, IS_FP8: tl.constexpr, MIN_AMAX: tl.constexpr, ROUND_IN_FP32: tl.constexpr):
    """(codes of x, scale) for one group: scale = amax(|group|) / QMAX (448 e4m3, 127 INT8), codes
    of x * (1 / scale). group: x itself, or a tensor whose abs-max is the group's (the attention
    kernel's prologue, when its Q tile is a part of the group). The one definition of a block's
    quantization: the quantization kernels and the attention kernel's QUANT_Q share it."""
    amax = tl.maximum(tl.max(tl.max(tl.abs(group), axis=1), axis=0), MIN_AMAX)
    if IS_FP8:
        scale = amax / 448.0
    else:
        scale = amax / 127.0
    return quantize_with_scale(x, scale, IS_FP8, ROUND_IN_FP32), scale


@triton.jit
def quantize_with_scale(x, scale, IS_FP8: tl.constexpr, ROUND_IN_FP32: tl.constexpr):
    """x * (1 / scale) as e4m3 (IS_FP8) or INT8 codes, rounded half away from zero."""
    y = x * (1.0 / scale)
    if IS_FP8:
        codes = _to_fp8(y, ROUND_IN_FP32)
    else:
        codes = _int8_codes(y)
    return codes


@triton.jit
def _quantize_block_rows(X, Mean, Codes, Scale, b, h, bh, blk, N, NUM_BLOCKS,
                         stride_xb, stride_xh, stride_xn,
                         BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, IS_FP8: tl.constexpr, SMOOTH: tl.constexpr,
                         MIN_AMAX: tl.constexpr, ROUND_IN_FP32: tl.constexpr, SAMPLES: tl.constexpr):
    """Block blk of x[b, h]: codes into Codes (B * H, N, D) and its scale. SMOOTH: x minus its
    smoothing mean first, which block 0 also writes to Mean (B * H, D)."""
    offs_n = blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    in_bounds = offs_n[:, None] < N
    x = _load_rows(X, b, h, offs_n, N, stride_xb, stride_xh, stride_xn, HEAD_DIM)
    if SMOOTH:
        mean = _smoothing_mean(X, b, h, N, stride_xb, stride_xh, stride_xn, HEAD_DIM, SAMPLES)
        if blk == 0:
            tl.store(Mean + bh * HEAD_DIM + offs_d, mean)
        x = tl.where(in_bounds, x - mean[None, :], 0.0)
    codes, scale = quantize_block_codes(x, x, IS_FP8, MIN_AMAX, ROUND_IN_FP32)
    tl.store(Codes + bh * N * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :], codes, mask=in_bounds)
    tl.store(Scale + bh * NUM_BLOCKS + blk, scale)


@triton.jit
def _quantize_blocks_kernel(
    X, Mean, Codes, Scale,
    H, N, NUM_BLOCKS,
    stride_xb, stride_xh, stride_xn,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, IS_FP8: tl.constexpr, SMOOTH: tl.constexpr,
    MIN_AMAX: tl.constexpr, ROUND_IN_FP32: tl.constexpr, SAMPLES: tl.constexpr,
):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    if SMOOTH:   # K: heads in reverse (see REVERSE_HEADS in the module docstring)
        bh = tl.num_programs(1) - 1 - bh
    _quantize_block_rows(X, Mean, Codes, Scale, bh // H, bh % H, bh, blk, N, NUM_BLOCKS,
                         stride_xb, stride_xh, stride_xn, BLOCK, HEAD_DIM, IS_FP8, SMOOTH, MIN_AMAX,
                         ROUND_IN_FP32, SAMPLES)


@triton.jit
def _quantize_channel_rows(X, AbsMax, Scale, CodesT, b, h, bh, blk, N, N_PAD,
                           stride_xb, stride_xh, stride_xn,
                           BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MIN_AMAX: tl.constexpr,
                           ROUND_IN_FP32: tl.constexpr, IS_INT8: tl.constexpr):
    """Tokens [blk * BLOCK_N, + BLOCK_N) of v[b, h], per channel, into CodesT[b, h] (D, N_PAD)."""
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    x = _load_rows(X, b, h, offs_n, N, stride_xb, stride_xh, stride_xn, HEAD_DIM)
    if IS_INT8:
        scale = tl.maximum(tl.load(AbsMax + bh * HEAD_DIM + offs_d), MIN_AMAX) / 127.0
    else:
        scale = tl.maximum(tl.load(AbsMax + bh * HEAD_DIM + offs_d), MIN_AMAX) / 448.0
    if blk == 0:
        tl.store(Scale + bh * HEAD_DIM + offs_d, scale)
    if IS_INT8:
        codes = quantize_with_scale(x, scale[None, :], False, ROUND_IN_FP32)
    else:
        codes = quantize_with_scale(x, scale[None, :], True, ROUND_IN_FP32)
    # Transposed store: CodesT[b, h, d, n], the padding columns N <= n < N_PAD too (as zeros: x was
    # loaded as 0 there), so the buffer needs no separate fill. tl.trans first, so that the store
    # runs along n (coalesced); the mask bound N_PAD is a multiple of 16, so the stores stay
    # vectorized (bounded by N they went byte by byte: 660 GB/s instead of 2.9 TB/s on the H100).
    codes_t = tl.trans(codes)
    tl.store(CodesT + bh * HEAD_DIM * N_PAD + offs_d[:, None] * N_PAD + offs_n[None, :], codes_t,
             mask=offs_n[None, :] < N_PAD)


@triton.jit
def _quantize_channels_fp8_kernel(
    X, AbsMax, Scale, CodesT,
    H, N, N_PAD,
    stride_xb, stride_xh, stride_xn,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MIN_AMAX: tl.constexpr, ROUND_IN_FP32: tl.constexpr,
    IS_INT8: tl.constexpr = False,
):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    _quantize_channel_rows(X, AbsMax, Scale, CodesT, bh // H, bh % H, bh, blk, N, N_PAD,
                           stride_xb, stride_xh, stride_xn, BLOCK_N, HEAD_DIM, MIN_AMAX, ROUND_IN_FP32, IS_INT8)


@triton.jit
def _quantize_kv_kernel(
    K, KMean, KCodes, KScale, V, VAbsMax, VScale, VCodesT,
    H, N, NUM_BLOCKS, N_PAD,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, K_FP8: tl.constexpr, V_INT8: tl.constexpr,
    MIN_AMAX: tl.constexpr, ROUND_IN_FP32: tl.constexpr, SAMPLES: tl.constexpr,
):
    """K's block blk (smoothed, per-block scale) and the same tokens of V (per channel): one launch."""
    blk = tl.program_id(0)
    bh = tl.num_programs(1) - 1 - tl.program_id(1)   # heads in reverse (REVERSE_HEADS, module docstring)
    b = bh // H
    h = bh % H
    _quantize_block_rows(K, KMean, KCodes, KScale, b, h, bh, blk, N, NUM_BLOCKS,
                         stride_kb, stride_kh, stride_kn, BLOCK, HEAD_DIM, K_FP8, True, MIN_AMAX, ROUND_IN_FP32,
                         SAMPLES)
    _quantize_channel_rows(V, VAbsMax, VScale, VCodesT, b, h, bh, blk, N, N_PAD,
                           stride_vb, stride_vh, stride_vn, BLOCK, HEAD_DIM, MIN_AMAX, ROUND_IN_FP32, V_INT8)


@triton.jit
def _stats_and_q_kernel(
    V, VAbsMax, Q, QCodes, QScale,
    H, HQ, N, NQ, N_CHUNKS, NQB, N_STATS, N_QPROG,
    stride_vb, stride_vh, stride_vn, stride_qb, stride_qh, stride_qn,
    ROWS: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr, DEFER: tl.constexpr,
    BLOCK_Q: tl.constexpr, Q_FP8: tl.constexpr, MIN_AMAX: tl.constexpr, ROUND_IN_FP32: tl.constexpr,
):
    """V's channel statistics and Q's per-block quantization in one launch (1-D grid of N_STATS +
    N_QPROG programs, the two kinds alternating while both last): the statistics pass is
    latency-bound (2 TB/s on an H200), the Q pass bandwidth-bound, and Q needs nothing the statistics
    give, so the two run side by side instead of one after the other."""
    pid = tl.program_id(0)
    both = tl.minimum(N_STATS, N_QPROG)
    if pid < 2 * both:
        is_stats = pid % 2 == 0
        idx = pid // 2
    else:
        is_stats = N_STATS > N_QPROG
        idx = both + pid - 2 * both
    if is_stats:
        bh = idx // N_CHUNKS
        _channel_stats_rows(V, VAbsMax, bh // H, bh % H, bh, idx % N_CHUNKS, N, stride_vb, stride_vh, stride_vn,
                            ROWS, TILE, HEAD_DIM, DEFER)
    else:
        bhq = idx // NQB
        _quantize_block_rows(Q, QScale, QCodes, QScale, bhq // HQ, bhq % HQ, bhq, idx % NQB, NQ, NQB,
                             stride_qb, stride_qh, stride_qn, BLOCK_Q, HEAD_DIM, Q_FP8, False, MIN_AMAX, ROUND_IN_FP32,
                             0)   # SAMPLES: unused, Q is not smoothed
