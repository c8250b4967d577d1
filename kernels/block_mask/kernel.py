"""Triton kernels of the block-mask helpers (math in reference.py).

_mask_to_table_kernel: one program per mask row; walks the row in CHUNK-wide pieces, and the
position of each selected block is (blocks selected before the chunk) + (exclusive prefix sum of
the chunk), so the row is compacted in one pass without sorting.
_pool_blocks_kernel: one program per (token block, b*h): the mean of the block's rows in fp32.
"""
import triton
import triton.language as tl


@triton.jit
def _mask_to_table_kernel(Mask, Indices, Counts, KB, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    total = 0
    for start in range(0, KB, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        sel = tl.load(Mask + row * KB + offs, mask=offs < KB, other=0).to(tl.int32)
        position = total + tl.cumsum(sel, 0) - sel
        tl.store(Indices + row * KB + position, offs, mask=sel != 0)
        total += tl.sum(sel, 0)
    tl.store(Counts + row, total)


@triton.jit
def _pool_blocks_kernel(X, Out, H, N, NUM_BLOCKS, stride_xb, stride_xh, stride_xn,
                        BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    x = tl.load(X + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :],
                mask=offs_n[:, None] < N, other=0.0).to(tl.float32)
    size = tl.minimum(N - blk * BLOCK, BLOCK).to(tl.float32)
    tl.store(Out + (bh * NUM_BLOCKS + blk) * HEAD_DIM + offs_d, tl.sum(x, 0) / size)
