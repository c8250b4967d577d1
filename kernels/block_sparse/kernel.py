"""Triton block-sparse flash-attention forward (see reference.py for the math and the table).

One program computes BLOCK_M query rows of one (b, h) against the key blocks its table row lists,
with the online softmax of FlashAttention in base 2 (exp2, scale pre-multiplied by log2(e)):
    m_new = max(m, rowmax(s));  p = exp2(s - m_new);  l = l * exp2(m - m_new) + rowsum(p)
    acc = acc * exp2(m - m_new) + p @ v;               out = acc / l
Programs are launched in the order of RowOrder (head by head, each head's heaviest rows first; see
schedule.work_order), so the long rows start early, the short ones fill the tail, and the programs
running together share one head's K/V in L2.

QUANT (constexpr): 0 bf16/fp16 Q K V; 1 INT8 Q K (smoothed K, per-block scales), 16-bit P V;
2 FP8 Q K, FP8 P V; 3 INT8 Q K, FP8 P V; 4 INT8 Q K, INT8 P V (see PV_INT8). In the 8-bit P V modes V comes transposed (B, H, D, N_pad)
with a per-channel scale, and each tile's P is scaled by its own row max before the e4m3 cast
(SageAttention2's per-block P scale): p~ = exp2(s - tmax) * 448, so the tile's largest value is
e4m3's largest and P uses the whole range even where the tile lies far below the running max.
Its product with V lands in a fresh fp32 tile that is rescaled and added to the accumulator
(two-level accumulation: the FP8 tensor-core op accumulates only within one tile):
    acc = acc * exp2(m - m_new) + (p~ @ v) * exp2(tmax - m_new) / 448
    l   = l   * exp2(m - m_new) + rowsum(p~) * exp2(tmax - m_new) / 448
reference.py rounds P the same way, per row and key block of the table (the kernel's groups are
its tiles: the same when the tile's BLOCK_N is the table's, as in the interpreter tests).

SOFTCAP (constexpr): logit soft-capping, scores -> cap * tanh(scores / cap) before the softmax
(Gemma-style). Applied to the scaled, dequantized scores in log2 units (cap_log2 = cap * log2 e,
because cap * tanh(s / cap) * log2 e = cap_log2 * tanh(s log2 e / cap_log2)), before the row max
and before the key mask (a masked key stays -inf, not -cap). ROW_BIAS (a cap on quantized Q K):
K smoothing dropped q . c (c = quant/reference.smoothing_mean(K)), a per-row constant the softmax ignores but tanh does not, so it is
added back (QkBias, (B, H, NQ) float32, from the unquantized q) before the cap.

PV_INT8 (QUANT 4, the plan mode int8_int8; or the flag with an FP8 P V mode, the launcher's
experimental option for FP8 Q K): P V in INT8 instead of e4m3: p~ = round(exp2(s - tmax) * 127), V in INT8 codes per channel (same transposed layout),
the tile's product in int32, then as above with 127 for 448. More accurate than e4m3 for P and V
(uniform steps: ~1% rms for Gaussian V against e4m3's ~2.7%; docs/KERNELS.md "P V formats").

FAST_CVT (constexpr, default on): the integer <-> float conversions of the INT8 products by the
float-bias trick instead of cvt instructions, which run at a quarter of the FP32 rate on Hopper
(16 per clock per SM): an int32 n with |n| < 2^22 is the float bits(n + 0x4B400000) - 1.5 * 2^23
(one integer add, one float add), and a P value p in [0, 127] becomes its INT8 code as the low
byte of bits(p + 1.5 * 2^23) (one float add: round to nearest even; the reference rounds half away
from zero, which differs only on exact ties). Every INT8 product fits: |q . k| and |p . v| are at
most 127 * 127 * HEAD_DIM (or BLOCK_N) < 2^22 for HEAD_DIM <= 128 and BLOCK_N <= 256. (Compiled, the
integer add folds into the wgmma's initial accumulator: the tensor core starts from 0x4B400000.) Off: the cvt path, kept to
time one against the other (tests/kernels/gpu_check.py --parts speed).

QUANT_Q (constexpr, quantized modes): Q arrives in 16 bits and the prologue quantizes it, with the
quantization kernels' own helper (quant/kernel.py quantize_block_codes): the group is the table's
query block (TABLE_BLOCK_M rows; a program whose tile is smaller reads the block's other rows for
the amax only), scale = amax / QMAX, so the codes and the scale are those quantize_blocks writes.
It saves the separate Q pass (read Q, write its codes, read them back here).

USE_TMA (constexpr): K and V tiles are loaded through tensor descriptors (Hopper's TMA engine, one
descriptor per (b, kv head) built on the device; rows past NK read as zeros) instead of per-thread
pointer loads: 5-15% faster at head_dim 128 on an H100, the same results (benchmarks/tune_attention.py).
"""
import triton
import triton.language as tl

from ..quant.kernel import _load_rows, _to_fp8, quantize_block_codes

LOG2_448 = tl.constexpr(8.807354922057604)   # log2 of e4m3's largest value
LOG2_127 = tl.constexpr(6.988684686772166)   # log2 of INT8's largest code


@triton.jit
def _i32_to_f32(x, FAST_CVT: tl.constexpr):
    """int32 -> float32, exact for |x| < 2^22 (see FAST_CVT in the module docstring)."""
    if FAST_CVT:
        return (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    return x.to(tl.float32)


@triton.jit
def _p_to_i8(p, FAST_CVT: tl.constexpr):
    """P in [0, 127] -> its INT8 codes, rounded to nearest (see FAST_CVT in the module docstring)."""
    if FAST_CVT:
        return (p + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)
    return tl.floor(p + 0.5).to(tl.int8)


@triton.jit
def _tanh(x):
    """tanh(x) = 1 - 2 / (exp(2x) + 1): exactly +-1 in the limits (exp2 saturates to inf or 0)."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.885390081777927) + 1.0)   # 2 log2(e)


@triton.jit
def _attend_tile(acc, l_i, m_i, q, k_src, v_src, start_n, NK, s_scale, cap_log2, inv_cap_log2, row_bias,
                 stride_kn, stride_vn, stride_vd,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, QK_INT8: tl.constexpr, PV_FP8: tl.constexpr,
                 MASK_KEYS: tl.constexpr, ROUND_IN_FP32: tl.constexpr, USE_TMA: tl.constexpr,
                 SOFTCAP: tl.constexpr, ROW_BIAS: tl.constexpr, PV_INT8: tl.constexpr, FAST_CVT: tl.constexpr):
    """One key tile [start_n, start_n + BLOCK_N): update (acc, l_i, m_i). s_scale (> 0) folds the
    softmax scale, log2(e) and the dequantization scales of the Q block and this K block.
    k_src / v_src: tensor descriptors with USE_TMA, else the (b, kv head) base pointers."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if USE_TMA:   # out-of-range rows come back as zeros; their scores are masked below
        k = k_src.load([start_n, 0])
        if PV_FP8:
            v = v_src.load([0, start_n])
        else:
            v = v_src.load([start_n, 0])
    else:
        k_ptrs = k_src + offs_n[:, None] * stride_kn + offs_d[None, :]
        if PV_FP8:   # V stored transposed (D, N): load the (D, BLOCK_N) tile, K-major for the FP8 MMA
            v_ptrs = v_src + offs_d[:, None] * stride_vd + offs_n[None, :]
            v_mask = offs_n[None, :] < NK
        else:
            v_ptrs = v_src + offs_n[:, None] * stride_vn + offs_d[None, :]
            v_mask = offs_n[:, None] < NK
        if MASK_KEYS:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < NK, other=0.0)
            v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
    if QK_INT8:
        qk = _i32_to_f32(tl.dot(q, tl.trans(k), out_dtype=tl.int32), FAST_CVT)
    else:
        qk = tl.dot(q, tl.trans(k))
    if SOFTCAP:   # capped scores in log2 units; z_scale 1
        z = qk * s_scale
        if ROW_BIAS:
            z = z + row_bias[:, None]
        qk = cap_log2 * _tanh(z * inv_cap_log2)
        z_scale = 1.0
    else:         # scale inside the max and the exponent (one FMA per score) rather than scaling qk first
        z_scale = s_scale
    if MASK_KEYS:
        qk = tl.where(offs_n[None, :] < NK, qk, float("-inf"))
    if PV_FP8:
        t_max = tl.max(qk, 1) * z_scale                           # this tile's row max
        m_new = tl.maximum(m_i, t_max)
        alpha = tl.math.exp2(m_i - m_new)
        live = t_max > float("-inf")
        t_ref = tl.where(live, t_max, 0.0)
        if PV_INT8:   # P to [0, 127], rounded to INT8 codes; V INT8 per channel; int32 products
            p = tl.math.exp2(qk * z_scale - (t_ref - LOG2_127)[:, None])
            beta = tl.where(live, tl.math.exp2(t_ref - m_new - LOG2_127), 0.0)
            pv = _i32_to_f32(tl.dot(_p_to_i8(p, FAST_CVT), tl.trans(v), out_dtype=tl.int32), FAST_CVT)
        else:
            p = tl.math.exp2(qk * z_scale - (t_ref - LOG2_448)[:, None])   # in [0, 448], e4m3's range
            beta = tl.where(live, tl.math.exp2(t_ref - m_new - LOG2_448), 0.0)
            pv = tl.dot(_to_fp8(p, ROUND_IN_FP32), tl.trans(v))     # a fresh fp32 tile (two-level accumulation)
        l_i = l_i * alpha + tl.sum(p, 1) * beta
        acc = acc * alpha[:, None] + pv * beta[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * z_scale)
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        p = tl.math.exp2(qk * z_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def block_sparse_fwd_kernel(  # public: plugins/tensorrt/entry.py calls it as a device function
    Q, K, V, Out, Lse,
    QScale, KScale, VScale, QkBias,
    KvIndices, KvCounts, RowOrder,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on,
    stride_ib, stride_ih, stride_im,
    stride_cb, stride_ch,
    H, GROUP, NQ, NK, QB, KB, qk_scale_log2, softcap_log2,
    HEAD_DIM: tl.constexpr, TABLE_BLOCK_M: tl.constexpr, TABLE_BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, WRITE_LSE: tl.constexpr,
    EVEN_N: tl.constexpr, ROUND_IN_FP32: tl.constexpr, USE_TMA: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
    PV_INT8: tl.constexpr = False, FAST_CVT: tl.constexpr = True, QUANT_Q: tl.constexpr = False,
):
    QK_QUANT: tl.constexpr = QUANT != 0
    QK_INT8: tl.constexpr = (QUANT == 1) or (QUANT == 3) or (QUANT == 4)
    QK_FP8: tl.constexpr = QUANT == 2
    PV_FP8: tl.constexpr = (QUANT == 2) or (QUANT == 3) or (QUANT == 4)   # 8-bit P V: V transposed, P per tile
    PV_I8: tl.constexpr = PV_INT8 or (QUANT == 4)
    ROW_BIAS: tl.constexpr = SOFTCAP and QK_QUANT
    SPLIT_M: tl.constexpr = TABLE_BLOCK_M // BLOCK_M
    SPLIT_N: tl.constexpr = TABLE_BLOCK_N // BLOCK_N

    pid = tl.program_id(0)
    row = tl.load(RowOrder + pid // SPLIT_M)          # flattened (b, h, qb), heaviest first
    qb = row % QB
    bh = row // QB
    h = bh % H
    b = bh // H
    hk = h // GROUP
    start_m = qb * TABLE_BLOCK_M + (pid % SPLIT_M) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    count = tl.load(KvCounts + b * stride_cb + h * stride_ch + qb)
    idx_base = KvIndices + b * stride_ib + h * stride_ih + qb * stride_im
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=offs_m[:, None] < NQ, other=0.0)
    k_src = K + b * stride_kb + hk * stride_kh
    v_src = V + b * stride_vb + hk * stride_vh
    if USE_TMA:
        k_src = tl.make_tensor_descriptor(k_src, shape=[NK, HEAD_DIM], strides=[stride_kn, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])
        if PV_FP8:
            v_src = tl.make_tensor_descriptor(v_src, shape=[HEAD_DIM, NK], strides=[stride_vd, 1],
                                              block_shape=[HEAD_DIM, BLOCK_N])
        else:
            v_src = tl.make_tensor_descriptor(v_src, shape=[NK, HEAD_DIM], strides=[stride_vn, 1],
                                              block_shape=[BLOCK_N, HEAD_DIM])

    row_scale = tl.cast(qk_scale_log2, tl.float32)   # Inductor passes Python floats as fp64
    cap_log2 = tl.cast(softcap_log2, tl.float32)
    inv_cap_log2 = cap_log2
    if SOFTCAP:
        inv_cap_log2 = 1.0 / cap_log2
    row_bias = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ROW_BIAS:   # q . k_mean in log2 units (see the module docstring)
        row_bias = tl.load(QkBias + bh * NQ + offs_m, mask=offs_m < NQ, other=0.0) * tl.cast(qk_scale_log2, tl.float32)
    if QK_QUANT:
        if QUANT_Q:   # Q's codes here, grouped by the table's query block (see the module docstring)
            qf = q.to(tl.float32)
            group = qf
            if SPLIT_M > 1:   # the group's amax over all its rows: the other tiles' rows loaded for it
                group = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
                for sub in tl.static_range(SPLIT_M):
                    rows = _load_rows(Q + b * stride_qb + h * stride_qh, 0, 0,
                                      qb * TABLE_BLOCK_M + sub * BLOCK_M + tl.arange(0, BLOCK_M), NQ,
                                      0, 0, stride_qn, HEAD_DIM)
                    group = tl.maximum(group, tl.abs(rows))
            q, q_scale = quantize_block_codes(qf, group, QK_FP8, 1e-10, ROUND_IN_FP32)
            row_scale = row_scale * q_scale
        else:
            row_scale = row_scale * tl.load(QScale + bh * QB + qb)
    kscale_base = KScale + (b * (H // GROUP) + hk) * KB

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # All entries but the last need no key mask (only the last key block of a row can be ragged,
    # because the indices ascend); with EVEN_N nothing is ragged and the mask is never needed.
    n_unmasked = count if EVEN_N else tl.maximum(count - 1, 0)
    for t in range(0, n_unmasked * SPLIT_N):
        kb = tl.load(idx_base + t // SPLIT_N)
        s_scale = row_scale
        if QK_QUANT:
            s_scale = s_scale * tl.load(kscale_base + kb)
        start_n = kb * TABLE_BLOCK_N + (t % SPLIT_N) * BLOCK_N
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_src, v_src, start_n, NK, s_scale, cap_log2, inv_cap_log2,
                                     row_bias, stride_kn, stride_vn, stride_vd,
                                     BLOCK_N, HEAD_DIM, QK_INT8, PV_FP8, False, ROUND_IN_FP32, USE_TMA, SOFTCAP,
                                     ROW_BIAS, PV_I8, FAST_CVT)
    if not EVEN_N:
        if count > 0:
            kb = tl.load(idx_base + count - 1)
            s_scale = row_scale
            if QK_QUANT:
                s_scale = s_scale * tl.load(kscale_base + kb)
            for sub in tl.static_range(SPLIT_N):
                acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_src, v_src,
                                             kb * TABLE_BLOCK_N + sub * BLOCK_N, NK, s_scale, cap_log2, inv_cap_log2, row_bias,
                                             stride_kn, stride_vn, stride_vd,
                                             BLOCK_N, HEAD_DIM, QK_INT8, PV_FP8, True, ROUND_IN_FP32, USE_TMA, SOFTCAP,
                                             ROW_BIAS, PV_I8, FAST_CVT)

    # A row that visited nothing (skipped head, empty row) has l = 0: output 0, lse -inf.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if PV_FP8:
        vscale = tl.load(VScale + (b * (H // GROUP) + hk) * HEAD_DIM + offs_d)
        out = out * vscale[None, :]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=offs_m[:, None] < NQ)
    if WRITE_LSE:
        # natural-log LSE of the scaled (and capped) scores: (m + log2 l) * ln 2
        lse = tl.where(l_i > 0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(Lse + bh * NQ + offs_m, lse, mask=offs_m < NQ)
