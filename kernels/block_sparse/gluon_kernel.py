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
  other's GEMMs; ORDERED forces the alternation as FA3 does (two "turn" mbarriers: a consumer issues
  its GEMMs of a step only after the other has issued its own, then hands the turn back).

Two kernels share these pieces:
- gluon_block_sparse_fwd_kernel: one program per table row; the producer builds TMA descriptors on
  the device per (b, head), so any strides work (rows past NQ / NK read zeros);
- gluon_block_sparse_persistent_kernel: one program per SM looping over the table rows (static
  round robin over the work order), so one row's epilogue and the next row's Q load and first K/V
  loads overlap; TMA descriptors built on the host over 2-D views of q, k, v (the launcher: a
  contiguous (B, H, N, D) tensor as (B*H*N, D), a (B, N, H, D) view as (B*N, H*D)), so a ragged
  last block reads the next head's or batch's rows: finite values, masked (keys: p = 0) or not
  stored (queries). A q_empty mbarrier hands the Q buffer back to the producer after each row.

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
def _row_of(RowOrder, i, KvIndices, KvCounts, stride_ib, stride_ih, stride_im, stride_cb, stride_ch,
            H, GROUP, QB):
    """Table row i of the work order: (b, h, kv head, query block, entry count, its index pointer)."""
    row = gl.load(RowOrder + i)          # flattened (b, h, qb), heaviest first within a head
    qb = row % QB
    bh = row // QB
    h = bh % H
    b = bh // H
    count = gl.load(KvCounts + b * stride_cb + h * stride_ch + qb)
    idx_base = KvIndices + b * stride_ib + h * stride_ih + qb * stride_im
    return b, h, h // GROUP, qb, count, idx_base


@gluon.jit
def _load_entries(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_empty, idx_base, count, kv_row, kv_col,
                  it0, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """K and V of every entry of one table row into the ring; it0: entries loaded before (ring position)."""
    tile_bytes: gl.constexpr = k_desc.block_type.nbytes
    kb_next = gl.load(idx_base, mask=count > 0, other=0)
    for t in range(count):
        it = it0 + t
        s = it % STAGES
        kb = kb_next   # the next index is loaded one entry ahead: its latency hides behind this entry's wait
        kb_next = gl.load(idx_base + t + 1, mask=t + 1 < count, other=0)
        # A fresh mbarrier counts as having completed the phase before 0: the first lap does not wait.
        mbarrier.wait(kv_empty.index(s), ((it // STAGES) & 1) ^ 1)
        mbarrier.expect(k_ready.index(s), tile_bytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + kb * BLOCK_N, kv_col], k_ready.index(s), k_smem.index(s))
        mbarrier.expect(v_ready.index(s), tile_bytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row + kb * BLOCK_N, kv_col], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _producer(Q, K, V, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, idx_base, count,
              q_off, kv_off, start_m, NQ, NK, stride_qn, stride_kn, stride_vn,
              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """One warp, one table row: descriptors of this (b, head), Q once, then K and V of every entry."""
    q_desc = tma.make_tensor_descriptor(Q + q_off, [NQ, HEAD_DIM], [stride_qn, 1], [BLOCK_M, HEAD_DIM],
                                        q_smem.type.layout)
    k_desc = tma.make_tensor_descriptor(K + kv_off, [NK, HEAD_DIM], [stride_kn, 1], [BLOCK_N, HEAD_DIM],
                                        k_smem.type.layout)
    v_desc = tma.make_tensor_descriptor(V + kv_off, [NK, HEAD_DIM], [stride_vn, 1], [BLOCK_N, HEAD_DIM],
                                        v_smem.type.layout)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [start_m, 0], q_bar, q_smem)
    _load_entries(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_empty, idx_base, count, 0, 0, 0,
                  BLOCK_N, STAGES)


@gluon.jit
def _producer_persistent(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready,
                         kv_empty, RowOrder, KvIndices, KvCounts, stride_ib, stride_ih, stride_im, stride_cb,
                         stride_ch, H, GROUP, QB, n_rows, q_rb, q_rh, q_ch, kv_rb, kv_rh, kv_ch,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """One warp, every table row of this program: Q into its buffer once the consumers gave it back,
    then K and V of the row's entries (the ring position runs on across rows)."""
    it = 0
    n = 0
    for i in range(gl.program_id(0), n_rows, gl.num_programs(0)):
        b, h, hk, qb, count, idx_base = _row_of(RowOrder, i, KvIndices, KvCounts, stride_ib, stride_ih,
                                                stride_im, stride_cb, stride_ch, H, GROUP, QB)
        mbarrier.wait(q_empty, (n & 1) ^ 1)
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b * q_rb + h * q_rh + qb * BLOCK_M, h * q_ch], q_bar, q_smem)
        _load_entries(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_empty, idx_base, count,
                      b * kv_rb + hk * kv_rh, hk * kv_ch, it, BLOCK_N, STAGES)
        it += count
        n += 1


@gluon.jit
def _scores_to_p(s, m_i, keys_left, scale, MASK: gl.constexpr):
    """Online-softmax step of one score tile (scale folds the softmax scale and log2 e):
    returns (p, m_new, alpha) with p = exp2(s * scale - m_new) and alpha = exp2(m_i - m_new).
    MASK: keys at or past keys_left are -inf (only a row's last entry can be the ragged key block,
    because the indices ascend: the callers peel that entry off the loop)."""
    if MASK:
        offs_n = gl.arange(0, s.type.shape[1], layout=gl.SliceLayout(0, s.type.layout))
        s = gl.where(gl.expand_dims(offs_n < keys_left, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * scale)
    p = gl.exp2(s * scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    return p, m_new, alpha


@gluon.jit
def _pipelined_step(q_tile, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, j, slot, p, m_i, l_i, acc, s_zero,
                    keys_left, scale, WG: gl.constexpr, ORDERED: gl.constexpr, MASK: gl.constexpr):
    """Entry j (ring position) of a row, j > its first: issue QK^T of j, then PV of j - 1 with the P
    computed last step; the softmax of j runs while PV computes. Returns (p, m, l, acc)."""
    STAGES: gl.constexpr = k_smem.type.shape[0]
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    prev = (j - 1) % STAGES
    cur = j % STAGES
    mbarrier.wait(k_ready.index(cur), (j // STAGES) & 1)
    mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
    p16 = gl.convert_layout(p.to(k_smem.type.element_ty), p_layout)
    _turn_wait(turn, slot, WG, ORDERED)
    s_tok = warpgroup_mma(q_tile, k_smem.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    acc_tok = warpgroup_mma(p16, v_smem.index(prev), acc, is_async=True)
    _turn_pass(turn, WG, ORDERED)
    s = warpgroup_mma_wait(1, deps=[s_tok])
    p, m_i, alpha = _scores_to_p(s, m_i, keys_left, scale, MASK)
    acc, p16 = warpgroup_mma_wait(0, deps=[acc_tok, p16])
    mbarrier.arrive(kv_empty.index(prev), count=1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_i, l_i, acc


@gluon.jit
def _plain_step(q_tile, k_smem, v_smem, k_ready, v_ready, kv_empty, j, m_i, l_i, acc, s_zero, keys_left, scale,
                MASK: gl.constexpr):
    """Entry j without overlap: QK^T, softmax, PV, release. Returns (m, l, acc)."""
    STAGES: gl.constexpr = k_smem.type.shape[0]
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    cur = j % STAGES
    phase = (j // STAGES) & 1
    mbarrier.wait(k_ready.index(cur), phase)
    s_tok = warpgroup_mma(q_tile, k_smem.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=[s_tok])
    p, m_i, alpha = _scores_to_p(s, m_i, keys_left, scale, MASK)
    l_i = l_i * alpha + gl.sum(p, 1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    mbarrier.wait(v_ready.index(cur), phase)
    p16 = gl.convert_layout(p.to(k_smem.type.element_ty), p_layout)
    acc_tok = warpgroup_mma(p16, v_smem.index(cur), acc, is_async=True)
    acc, p16 = warpgroup_mma_wait(0, deps=[acc_tok, p16])
    mbarrier.arrive(kv_empty.index(cur), count=1)
    return m_i, l_i, acc


@gluon.jit
def _turn_wait(turn, slot, WG: gl.constexpr, ORDERED: gl.constexpr):
    """ORDERED: wait until the other consumer has issued its GEMMs of the previous slot (consumer 0
    goes first: a fresh mbarrier passes a wait for parity 1)."""
    if ORDERED:
        mbarrier.wait(turn.index(WG), (slot & 1) ^ (1 - WG))


@gluon.jit
def _turn_pass(turn, WG: gl.constexpr, ORDERED: gl.constexpr):
    """ORDERED: this consumer's GEMMs of the slot are issued; the other's turn."""
    if ORDERED:
        mbarrier.arrive(turn.index(1 - WG), count=1)


@gluon.jit
def _consume_row(q_smem, k_smem, v_smem, q_bar, q_phase, k_ready, v_ready, kv_empty, turn, it0, slot0, count,
                 keys_left, scale, WG: gl.constexpr, ROWS: gl.constexpr, NUM_WARPS: gl.constexpr,
                 EVEN_N: gl.constexpr, PIPELINE: gl.constexpr, ORDERED: gl.constexpr):
    """Rows [WG * ROWS, (WG + 1) * ROWS) of the Q tile against one table row's entries, in NUM_WARPS
    warps (4 per 64 rows); it0: the ring position of the row's first entry; slot0: ORDERED's turn
    count before this row. Returns (acc, l, m) of the online softmax.
    ORDERED (PIPELINE with two consumers): the consumers issue their GEMMs in turns, FA3's ping-pong:
    slot 0 is QK of entry 0, slot t the pair QK(t), PV(t-1), slot count PV of the last entry."""
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.type.shape[2]
    dtype: gl.constexpr = q_smem.type.element_ty
    k_width: gl.constexpr = 256 // dtype.primitive_bitwidth
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, k_width])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, k_width])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    if ROWS == q_smem.type.shape[0]:
        q_tile = q_smem
    else:
        q_tile = q_smem.slice(WG * ROWS, ROWS)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([ROWS], gl.float32, row_s)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, q_phase)

    # Every entry but the last runs unmasked; the last is peeled off the loop and masked unless EVEN_N.
    MASK: gl.constexpr = not EVEN_N
    if PIPELINE:
        if count > 0:
            # Prologue: scores and P of entry 0 (masked if it is the row's only entry).
            first = it0 % STAGES
            mbarrier.wait(k_ready.index(first), (it0 // STAGES) & 1)
            _turn_wait(turn, slot0, WG, ORDERED)
            s_tok = warpgroup_mma(q_tile, k_smem.index(first).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
            _turn_pass(turn, WG, ORDERED)
            s = warpgroup_mma_wait(0, deps=[s_tok])
            only = gl.where(count == 1, keys_left, BLOCK_N)
            p, m_i, alpha = _scores_to_p(s, m_i, only, scale, MASK)
            l_i = gl.sum(p, 1)
            for t in range(1, count - 1):
                p, m_i, l_i, acc = _pipelined_step(q_tile, k_smem, v_smem, k_ready, v_ready, kv_empty, turn,
                                                   it0 + t, slot0 + t, p, m_i, l_i, acc, s_zero, keys_left, scale,
                                                   WG, ORDERED, False)
            if count > 1:
                p, m_i, l_i, acc = _pipelined_step(q_tile, k_smem, v_smem, k_ready, v_ready, kv_empty, turn,
                                                   it0 + count - 1, slot0 + count - 1, p, m_i, l_i, acc, s_zero,
                                                   keys_left, scale, WG, ORDERED, MASK)
            last = (it0 + count - 1) % STAGES
            mbarrier.wait(v_ready.index(last), ((it0 + count - 1) // STAGES) & 1)
            p16 = gl.convert_layout(p.to(dtype), p_layout)
            _turn_wait(turn, slot0 + count, WG, ORDERED)
            acc_tok = warpgroup_mma(p16, v_smem.index(last), acc, is_async=True)
            _turn_pass(turn, WG, ORDERED)
            acc, p16 = warpgroup_mma_wait(0, deps=[acc_tok, p16])
            mbarrier.arrive(kv_empty.index(last), count=1)
    else:
        for t in range(0, count - 1):
            m_i, l_i, acc = _plain_step(q_tile, k_smem, v_smem, k_ready, v_ready, kv_empty, it0 + t, m_i, l_i, acc,
                                        s_zero, keys_left, scale, False)
        if count > 0:
            m_i, l_i, acc = _plain_step(q_tile, k_smem, v_smem, k_ready, v_ready, kv_empty, it0 + count - 1, m_i,
                                        l_i, acc, s_zero, keys_left, scale, MASK)
    return acc, l_i, m_i


@gluon.jit
def _store_row(acc, l_i, m_i, Out, Lse, o_off, lse_off, start_m, NQ, stride_on,
               WG: gl.constexpr, ROWS: gl.constexpr, WRITE_LSE: gl.constexpr):
    """out = acc / l for the rows below NQ (a row that visited nothing has l = 0: output 0, lse -inf)."""
    o_layout: gl.constexpr = acc.type.layout
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    HEAD_DIM: gl.constexpr = acc.type.shape[1]
    l_o = gl.convert_layout(l_i, row_o)
    l_safe = gl.where(l_o > 0, l_o, 1.0)
    out = acc / gl.expand_dims(l_safe, 1)
    offs_m = start_m + WG * ROWS + gl.arange(0, ROWS, layout=row_o)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    ptrs = Out + o_off + gl.expand_dims(offs_m, 1) * stride_on + gl.expand_dims(offs_d, 0)
    gl.store(ptrs, out.to(Out.dtype.element_ty), mask=gl.expand_dims(offs_m < NQ, 1))
    if WRITE_LSE:
        lse = gl.where(l_o > 0, (gl.convert_layout(m_i, row_o) + gl.log2(l_safe)) * 0.6931471805599453,
                       float("-inf"))
        gl.store(Lse + lse_off + offs_m, lse, mask=offs_m < NQ)


@gluon.jit
def _keys_left(idx_base, count, NK, BLOCK_N: gl.constexpr, EVEN_N: gl.constexpr):
    """Valid keys in the row's last key block (only that block can be ragged; BLOCK_N if none is)."""
    keys_left = gl.to_tensor(BLOCK_N)
    if not EVEN_N:
        if count > 0:
            keys_left = NK - gl.load(idx_base + count - 1) * BLOCK_N
    return keys_left


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, idx_base, count,
              Out, Lse, o_off, lse_off, start_m, NQ, NK, stride_on, scale,
              WG: gl.constexpr, ROWS: gl.constexpr, NUM_WARPS: gl.constexpr,
              EVEN_N: gl.constexpr, WRITE_LSE: gl.constexpr, PIPELINE: gl.constexpr, ORDERED: gl.constexpr):
    """One table row (the one-program-per-row kernel)."""
    keys_left = _keys_left(idx_base, count, NK, k_smem.type.shape[1], EVEN_N)
    acc, l_i, m_i = _consume_row(q_smem, k_smem, v_smem, q_bar, 0, k_ready, v_ready, kv_empty, turn, 0, 0, count,
                                 keys_left, scale, WG, ROWS, NUM_WARPS, EVEN_N, PIPELINE, ORDERED)
    _store_row(acc, l_i, m_i, Out, Lse, o_off, lse_off, start_m, NQ, stride_on, WG, ROWS, WRITE_LSE)


@gluon.jit
def _consumer_persistent(q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, turn,
                         RowOrder, KvIndices, KvCounts, stride_ib, stride_ih, stride_im, stride_cb, stride_ch,
                         H, GROUP, QB, n_rows, Out, Lse, stride_ob, stride_oh, stride_on, NQ, NK, scale,
                         WG: gl.constexpr, ROWS: gl.constexpr, NUM_WARPS: gl.constexpr,
                         EVEN_N: gl.constexpr, WRITE_LSE: gl.constexpr, PIPELINE: gl.constexpr,
                         ORDERED: gl.constexpr):
    """Every table row of this program, in the producer's order; Q handed back after each row."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[0]
    it = 0
    slot = 0
    n = 0
    for i in range(gl.program_id(0), n_rows, gl.num_programs(0)):
        b, h, hk, qb, count, idx_base = _row_of(RowOrder, i, KvIndices, KvCounts, stride_ib, stride_ih,
                                                stride_im, stride_cb, stride_ch, H, GROUP, QB)
        keys_left = _keys_left(idx_base, count, NK, k_smem.type.shape[1], EVEN_N)
        acc, l_i, m_i = _consume_row(q_smem, k_smem, v_smem, q_bar, n & 1, k_ready, v_ready, kv_empty, turn,
                                     it, slot, count, keys_left, scale, WG, ROWS, NUM_WARPS, EVEN_N, PIPELINE,
                                     ORDERED)
        mbarrier.arrive(q_empty, count=1)   # the QK GEMMs of this row are done: Q's buffer is free
        _store_row(acc, l_i, m_i, Out, Lse, b * stride_ob + h * stride_oh, (b * H + h) * NQ, qb * BLOCK_M, NQ,
                   stride_on, WG, ROWS, WRITE_LSE)
        it += count
        slot += gl.where(count > 0, count + 1, 0)
        n += 1


@gluon.jit
def _alloc(dtype: gl.constexpr, q_layout: gl.constexpr, kv_layout: gl.constexpr, BLOCK_M: gl.constexpr,
           BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
    """Shared memory and mbarriers: the Q tile, the K/V ring and its barriers, the turn barriers."""
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(q_empty, count=CONSUMERS)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=CONSUMERS)
    return q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, turn


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
    ORDERED: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    """Grid: one program per table row, in RowOrder's order (schedule.work_order). num_warps: 8
    (one consumer of two warpgroups) or, with PINGPONG, 4 (two consumers of one warpgroup each)."""
    gl.static_assert(BLOCK_M == 128, "the Gluon kernel takes 128-row table blocks")
    gl.static_assert(not ORDERED or (PINGPONG and PIPELINE), "ORDERED needs PINGPONG and PIPELINE")
    b, h, hk, qb, count, idx_base = _row_of(RowOrder, gl.program_id(0), KvIndices, KvCounts, stride_ib, stride_ih,
                                            stride_im, stride_cb, stride_ch, H, GROUP, QB)
    start_m = qb * BLOCK_M
    q_off = b * stride_qb + h * stride_qh
    kv_off = b * stride_kb + hk * stride_kh
    o_off = b * stride_ob + h * stride_oh
    lse_off = (b * H + h) * NQ
    scale = qk_scale_log2.to(gl.float32)   # Inductor passes Python floats as fp64

    dtype: gl.constexpr = Q.dtype.element_ty
    q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, turn = _alloc(
        dtype, gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype),
        gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype), BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
        2 if PINGPONG else 1)
    # The partitions' arguments are written out in each call: a tuple assigned to a variable would
    # turn its constexprs into tensors (Triton's assignment rule), and a partition needs them constexpr.
    if PINGPONG:
        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, idx_base, count,
                         Out, Lse, o_off, lse_off, start_m, NQ, NK, stride_on, scale,
                         0, 64, 4, EVEN_N, WRITE_LSE, PIPELINE, ORDERED)),
            (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, idx_base, count,
                         Out, Lse, o_off, lse_off, start_m, NQ, NK, stride_on, scale,
                         1, 64, 4, EVEN_N, WRITE_LSE, PIPELINE, ORDERED)),
            (_producer, (Q, K, V, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, idx_base, count,
                         q_off, kv_off, start_m, NQ, NK, stride_qn, stride_kn, stride_vn,
                         HEAD_DIM, BLOCK_M, BLOCK_N, STAGES)),
        ], [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, idx_base, count,
                         Out, Lse, o_off, lse_off, start_m, NQ, NK, stride_on, scale,
                         0, 128, num_warps, EVEN_N, WRITE_LSE, PIPELINE, False)),
            (_producer, (Q, K, V, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, idx_base, count,
                         q_off, kv_off, start_m, NQ, NK, stride_qn, stride_kn, stride_vn,
                         HEAD_DIM, BLOCK_M, BLOCK_N, STAGES)),
        ], [1], [24])


@gluon.jit
def gluon_block_sparse_persistent_kernel(
    q_desc, k_desc, v_desc, Out, Lse, KvIndices, KvCounts, RowOrder,
    stride_ob, stride_oh, stride_on,
    stride_ib, stride_ih, stride_im,
    stride_cb, stride_ch,
    H, GROUP, NQ, NK, QB, n_rows, q_rb, q_rh, q_ch, kv_rb, kv_rh, kv_ch, qk_scale_log2,
    STAGES: gl.constexpr, EVEN_N: gl.constexpr, WRITE_LSE: gl.constexpr, PIPELINE: gl.constexpr,
    PINGPONG: gl.constexpr, ORDERED: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    """Grid: at most one program per SM, each looping over table rows i = pid, pid + grid, ... of
    RowOrder. q_desc / k_desc / v_desc: 2-D host descriptors (module docstring); the tile of
    (b, h, query block qb) starts at row b * q_rb + h * q_rh + qb * 128, column h * q_ch, and key
    block kb of (b, kv head hk) at row b * kv_rb + hk * kv_rh + kb * BLOCK_N, column hk * kv_ch."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    gl.static_assert(BLOCK_M == 128, "the Gluon kernel takes 128-row table blocks")
    gl.static_assert(not ORDERED or (PINGPONG and PIPELINE), "ORDERED needs PINGPONG and PIPELINE")
    scale = qk_scale_log2.to(gl.float32)
    dtype: gl.constexpr = q_desc.dtype
    q_layout: gl.constexpr = q_desc.layout
    kv_layout: gl.constexpr = k_desc.layout
    q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, turn = _alloc(
        dtype, q_layout, kv_layout, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, 2 if PINGPONG else 1)
    if PINGPONG:
        gl.warp_specialize([
            (_consumer_persistent, (q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, turn,
                                    RowOrder, KvIndices, KvCounts, stride_ib, stride_ih, stride_im, stride_cb,
                                    stride_ch, H, GROUP, QB, n_rows, Out, Lse, stride_ob, stride_oh, stride_on,
                                    NQ, NK, scale, 0, 64, 4, EVEN_N, WRITE_LSE, PIPELINE, ORDERED)),
            (_consumer_persistent, (q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, turn,
                                    RowOrder, KvIndices, KvCounts, stride_ib, stride_ih, stride_im, stride_cb,
                                    stride_ch, H, GROUP, QB, n_rows, Out, Lse, stride_ob, stride_oh, stride_on,
                                    NQ, NK, scale, 1, 64, 4, EVEN_N, WRITE_LSE, PIPELINE, ORDERED)),
            (_producer_persistent, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                                    v_ready, kv_empty, RowOrder, KvIndices, KvCounts, stride_ib, stride_ih,
                                    stride_im, stride_cb, stride_ch, H, GROUP, QB, n_rows, q_rb, q_rh, q_ch,
                                    kv_rb, kv_rh, kv_ch, BLOCK_M, BLOCK_N, STAGES)),
        ], [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([
            (_consumer_persistent, (q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, turn,
                                    RowOrder, KvIndices, KvCounts, stride_ib, stride_ih, stride_im, stride_cb,
                                    stride_ch, H, GROUP, QB, n_rows, Out, Lse, stride_ob, stride_oh, stride_on,
                                    NQ, NK, scale, 0, 128, num_warps, EVEN_N, WRITE_LSE, PIPELINE, False)),
            (_producer_persistent, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                                    v_ready, kv_empty, RowOrder, KvIndices, KvCounts, stride_ib, stride_ih,
                                    stride_im, stride_cb, stride_ch, H, GROUP, QB, n_rows, q_rb, q_rh, q_ch,
                                    kv_rb, kv_rh, kv_ch, BLOCK_M, BLOCK_N, STAGES)),
        ], [1], [24])
