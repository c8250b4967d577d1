"""Block-sparse flash-attention forward in Triton's Gluon dialect, for Hopper (sm_90a), bf16/fp16.

The same math and table as kernel.py (see reference.py): one program computes the 128 query rows
of one table row (b, h, qb) against the key blocks kv_indices lists, with FlashAttention's online
softmax in base 2. What Gluon adds over plain Triton is explicit control of the Hopper machinery,
as FA3 does it:

- a producer warp (a worker partition of gl.warp_specialize) walks the block table and issues TMA
  loads of Q once and of K and V per table entry into a STAGES-deep shared-memory ring; each
  stage has k_ready / v_ready mbarriers (TMA completes them by byte count) and a kv_empty
  mbarrier the consumers arrive on once their wgmma have read the stage;
- consumer warpgroups run QK^T and PV as asynchronous wgmma (Q, K, V from shared memory; P from
  registers) and the softmax in registers;
- PIPELINE: within a consumer, QK^T of entry t+1 is issued before PV of entry t, so the tensor
  core works on one while the softmax of the other runs (FA3's intra-warpgroup overlap);
- PINGPONG: two consumer partitions of one warpgroup each (64 rows apiece, their own instruction
  streams) instead of one 8-warp consumer; the warp scheduler interleaves one's softmax with the
  other's GEMMs (FA3 additionally forces the alternation with named barriers; not done here).

Only QUANT none, no soft cap, table blocks of 128 query rows and 64/128 keys (the launcher checks;
gluon_launch.py). Rows past NQ read zeros from TMA and are not stored; keys past NK (the last,
ragged key block) are masked to -inf unless EVEN_N. A row with no entry writes 0 (lse -inf).

This kernel cannot run in Triton's interpreter (TRITON_INTERPRET=1 does not model TMA, mbarriers,
wgmma or warp specialization): on the CPU only its launcher's validation and the reference are
tested, and tests/kernels/gpu_check_gluon.py checks it against the reference on a Hopper GPU.
It is written for Triton 3.6's Gluon API (the GPU machine's); tests/kernels/aot_gluon.py compiles it
ahead of time for sm_90a without a GPU.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def _producer(Q, K, V, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, idx_base, count,
              q_off, kv_off, start_m, NQ, NK, stride_qn, stride_kn, stride_vn,
              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """One warp: Q once, then K and V of every table entry into the ring (waits for a free stage)."""
    q_desc = tma.make_tensor_descriptor(Q + q_off, [NQ, HEAD_DIM], [stride_qn, 1], [BLOCK_M, HEAD_DIM],
                                        q_smem.type.layout)
    k_desc = tma.make_tensor_descriptor(K + kv_off, [NK, HEAD_DIM], [stride_kn, 1], [BLOCK_N, HEAD_DIM],
                                        k_smem.type.layout)
    v_desc = tma.make_tensor_descriptor(V + kv_off, [NK, HEAD_DIM], [stride_vn, 1], [BLOCK_N, HEAD_DIM],
                                        v_smem.type.layout)
    mbarrier.expect(q_bar, BLOCK_M * HEAD_DIM * Q.dtype.element_ty.primitive_bitwidth // 8)
    tma.async_copy_global_to_shared(q_desc, [start_m, 0], q_bar, q_smem)
    tile_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * K.dtype.element_ty.primitive_bitwidth // 8
    for t in range(count):
        s = t % STAGES
        phase = (t // STAGES) & 1
        kb = gl.load(idx_base + t)
        # A fresh mbarrier counts as having completed the phase before 0: the first lap does not wait.
        mbarrier.wait(kv_empty.index(s), phase ^ 1)
        mbarrier.expect(k_ready.index(s), tile_bytes)
        tma.async_copy_global_to_shared(k_desc, [kb * BLOCK_N, 0], k_ready.index(s), k_smem.index(s))
        mbarrier.expect(v_ready.index(s), tile_bytes)
        tma.async_copy_global_to_shared(v_desc, [kb * BLOCK_N, 0], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _scores_to_p(s, m_i, kb, NK, scale, BLOCK_N: gl.constexpr, EVEN_N: gl.constexpr):
    """Online-softmax step of one score tile (scale folds the softmax scale and log2 e):
    returns (p, m_new, alpha) with p = exp2(s * scale - m_new) and alpha = exp2(m_i - m_new)."""
    if not EVEN_N:   # only the last key block can be ragged; the compare is cheap next to the exp2
        offs_n = kb * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
        s = gl.where(gl.expand_dims(offs_n < NK, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * scale)
    p = gl.exp2(s * scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    return p, m_new, alpha


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, idx_base, count,
              Out, Lse, o_off, lse_off, start_m, NQ, NK, stride_on, scale,
              ROW0: gl.constexpr, ROWS: gl.constexpr, NUM_WARPS: gl.constexpr,
              HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              EVEN_N: gl.constexpr, WRITE_LSE: gl.constexpr, PIPELINE: gl.constexpr):
    """Rows [ROW0, ROW0 + ROWS) of the Q tile, in NUM_WARPS warps (4 per 64 rows)."""
    k_width: gl.constexpr = 256 // q_smem.type.element_ty.primitive_bitwidth
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, k_width])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, k_width])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_smem.type.element_ty

    if ROWS == q_smem.type.shape[0]:
        q_tile = q_smem
    else:
        q_tile = q_smem.slice(ROW0, ROWS)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([ROWS], gl.float32, row_s)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)

    if PIPELINE:
        if count > 0:
            # Prologue: scores and P of entry 0.
            kb = gl.load(idx_base)
            mbarrier.wait(k_ready.index(0), 0)
            s_tok = warpgroup_mma(q_tile, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=[s_tok])
            p, m_i, alpha = _scores_to_p(s, m_i, kb, NK, scale, BLOCK_N, EVEN_N)
            l_i = gl.sum(p, 1)
            for t in range(1, count):
                prev = (t - 1) % STAGES
                cur = t % STAGES
                kb = gl.load(idx_base + t)
                # Issue QK^T of entry t, then PV of entry t-1; the softmax of t runs while PV computes.
                mbarrier.wait(k_ready.index(cur), (t // STAGES) & 1)
                s_tok = warpgroup_mma(q_tile, k_smem.index(cur).permute((1, 0)), s_zero, use_acc=False,
                                      is_async=True)
                mbarrier.wait(v_ready.index(prev), ((t - 1) // STAGES) & 1)
                p16 = gl.convert_layout(p.to(dtype), p_layout)
                acc_tok = warpgroup_mma(p16, v_smem.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=[s_tok])
                p, m_i, alpha = _scores_to_p(s, m_i, kb, NK, scale, BLOCK_N, EVEN_N)
                acc, p16 = warpgroup_mma_wait(0, deps=[acc_tok, p16])
                mbarrier.arrive(kv_empty.index(prev), count=1)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
                l_i = l_i * alpha + gl.sum(p, 1)
            last = (count - 1) % STAGES
            mbarrier.wait(v_ready.index(last), ((count - 1) // STAGES) & 1)
            p16 = gl.convert_layout(p.to(dtype), p_layout)
            acc_tok = warpgroup_mma(p16, v_smem.index(last), acc, is_async=True)
            acc, p16 = warpgroup_mma_wait(0, deps=[acc_tok, p16])
            mbarrier.arrive(kv_empty.index(last), count=1)
    else:
        for t in range(count):
            cur = t % STAGES
            phase = (t // STAGES) & 1
            kb = gl.load(idx_base + t)
            mbarrier.wait(k_ready.index(cur), phase)
            s_tok = warpgroup_mma(q_tile, k_smem.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=[s_tok])
            p, m_i, alpha = _scores_to_p(s, m_i, kb, NK, scale, BLOCK_N, EVEN_N)
            l_i = l_i * alpha + gl.sum(p, 1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            mbarrier.wait(v_ready.index(cur), phase)
            p16 = gl.convert_layout(p.to(dtype), p_layout)
            acc_tok = warpgroup_mma(p16, v_smem.index(cur), acc, is_async=True)
            acc, p16 = warpgroup_mma_wait(0, deps=[acc_tok, p16])
            mbarrier.arrive(kv_empty.index(cur), count=1)

    # A row that visited nothing has l = 0: output 0, lse -inf.
    l_o = gl.convert_layout(l_i, row_o)
    l_safe = gl.where(l_o > 0, l_o, 1.0)
    out = acc / gl.expand_dims(l_safe, 1)
    offs_m = start_m + ROW0 + gl.arange(0, ROWS, layout=row_o)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    ptrs = Out + o_off + gl.expand_dims(offs_m, 1) * stride_on + gl.expand_dims(offs_d, 0)
    gl.store(ptrs, out.to(Out.dtype.element_ty), mask=gl.expand_dims(offs_m < NQ, 1))
    if WRITE_LSE:
        lse = gl.where(l_o > 0, (gl.convert_layout(m_i, row_o) + gl.log2(l_safe)) * 0.6931471805599453,
                       float("-inf"))
        gl.store(Lse + lse_off + offs_m, lse, mask=offs_m < NQ)


@gluon.jit
def _consumer_hi(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, idx_base, count,
                 Out, Lse, o_off, lse_off, start_m, NQ, NK, stride_on, scale,
                 HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 EVEN_N: gl.constexpr, WRITE_LSE: gl.constexpr, PIPELINE: gl.constexpr):
    """PINGPONG's second consumer (a worker partition, one warpgroup): rows [64, 128)."""
    _consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, idx_base, count,
              Out, Lse, o_off, lse_off, start_m, NQ, NK, stride_on, scale,
              64, 64, 4, HEAD_DIM, BLOCK_N, STAGES, EVEN_N, WRITE_LSE, PIPELINE)


@gluon.jit
def _producer_ws(Q, K, V, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, idx_base, count,
                 q_off, kv_off, start_m, NQ, NK, stride_qn, stride_kn, stride_vn,
                 HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    _producer(Q, K, V, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, idx_base, count,
              q_off, kv_off, start_m, NQ, NK, stride_qn, stride_kn, stride_vn, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES)


@gluon.jit
def gluon_block_sparse_fwd_kernel(
    Q, K, V, Out, Lse, KvIndices, KvCounts, RowOrder,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_ib, stride_ih, stride_im,
    stride_cb, stride_ch,
    H, GROUP, NQ, NK, QB, qk_scale_log2,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    EVEN_N: gl.constexpr, WRITE_LSE: gl.constexpr, PIPELINE: gl.constexpr, PINGPONG: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Grid: one program per table row, in RowOrder's order (launch.work_order). num_warps: 8
    (one consumer of two warpgroups) or, with PINGPONG, 4 (two consumers of one warpgroup each)."""
    gl.static_assert(BLOCK_M == 128, "the Gluon kernel takes 128-row table blocks")
    pid = gl.program_id(0)
    row = gl.load(RowOrder + pid)          # flattened (b, h, qb), heaviest first within a head
    qb = row % QB
    bh = row // QB
    h = bh % H
    b = bh // H
    hk = h // GROUP
    start_m = qb * BLOCK_M
    count = gl.load(KvCounts + b * stride_cb + h * stride_ch + qb)
    idx_base = KvIndices + b * stride_ib + h * stride_ih + qb * stride_im
    q_off = b * stride_qb + h * stride_qh
    kv_off = b * stride_kb + hk * stride_kh
    o_off = b * stride_ob + h * stride_oh
    lse_off = bh * NQ
    scale = qk_scale_log2.to(gl.float32)   # Inductor passes Python floats as fp64

    dtype: gl.constexpr = Q.dtype.element_ty
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    CONSUMERS: gl.constexpr = 2 if PINGPONG else 1
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=CONSUMERS)

    # The partitions' arguments are written out in each call: a tuple assigned to a variable would
    # turn its constexprs into tensors (Triton's assignment rule), and a partition needs them constexpr.
    if PINGPONG:
        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, idx_base, count,
                         Out, Lse, o_off, lse_off, start_m, NQ, NK, stride_on, scale,
                         0, 64, 4, HEAD_DIM, BLOCK_N, STAGES, EVEN_N, WRITE_LSE, PIPELINE)),
            (_consumer_hi, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, idx_base, count,
                            Out, Lse, o_off, lse_off, start_m, NQ, NK, stride_on, scale,
                            HEAD_DIM, BLOCK_N, STAGES, EVEN_N, WRITE_LSE, PIPELINE)),
            (_producer_ws, (Q, K, V, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, idx_base, count,
                            q_off, kv_off, start_m, NQ, NK, stride_qn, stride_kn, stride_vn,
                            HEAD_DIM, BLOCK_M, BLOCK_N, STAGES)),
        ], [4, 1], [240, 24])
    else:
        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, idx_base, count,
                         Out, Lse, o_off, lse_off, start_m, NQ, NK, stride_on, scale,
                         0, 128, num_warps, HEAD_DIM, BLOCK_N, STAGES, EVEN_N, WRITE_LSE, PIPELINE)),
            (_producer_ws, (Q, K, V, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, idx_base, count,
                            q_off, kv_off, start_m, NQ, NK, stride_qn, stride_kn, stride_vn,
                            HEAD_DIM, BLOCK_M, BLOCK_N, STAGES)),
        ], [1], [24])
