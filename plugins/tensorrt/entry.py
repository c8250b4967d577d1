"""The block-sparse attention kernel with TensorRT's AOT calling convention.

A TensorRT AOT plugin launches one kernel with its arguments in the order (input pointers, extra
int32 scalars, output pointers) and nothing else. vsopt's kernel (kernels/block_sparse/kernel.py)
takes its output pointer among the inputs and its softmax scale as a float, so this entry point
reorders the arguments and takes the scale (and the logit soft cap, 0 for none) as compile-time
constants (one PTX per scale and cap, which a static plan fixes), then calls the kernel as a
device function: the same code, no copy of it.

Inputs are contiguous (B, H, N, D) tensors (TensorRT's linear format), so the output has q's
strides; quant is "none" (the quantized modes need the quantization kernels first: they run in
the plugin's JIT implementation); no TMA (device-side descriptors need a scratch allocator
TensorRT does not provide).
"""
import triton
import triton.language as tl

from vsopt.kernels.block_sparse.kernel import block_sparse_fwd_kernel


@triton.jit
def block_sparse_trt_entry(
    Q, K, V, KvIndices, KvCounts, RowOrder,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_ib, stride_ih, stride_im, stride_cb, stride_ch,
    H, GROUP, NQ, NK, QB, KB,
    Out,
    QK_SCALE_LOG2: tl.constexpr, SOFTCAP_LOG2: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, TABLE_BLOCK_M: tl.constexpr,
    TABLE_BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):
    block_sparse_fwd_kernel(
        Q, K, V, Out, Out, RowOrder, RowOrder, RowOrder, RowOrder, KvIndices, KvCounts, RowOrder,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_kb, stride_kh, stride_kn, 1,                    # V has K's layout (quant none)
        stride_qb, stride_qh, stride_qn,                       # Out has q's layout
        stride_ib, stride_ih, stride_im, stride_cb, stride_ch,
        H, GROUP, NQ, NK, QB, KB, QK_SCALE_LOG2, SOFTCAP_LOG2,
        HEAD_DIM=HEAD_DIM, TABLE_BLOCK_M=TABLE_BLOCK_M, TABLE_BLOCK_N=TABLE_BLOCK_N, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, QUANT=0, WRITE_LSE=False, EVEN_N=EVEN_N, ROUND_IN_FP32=False, USE_TMA=False,
        SOFTCAP=SOFTCAP,
    )


#: The int32 scalars between the input and output pointers, in order (the plugin's extra args).
SCALARS = ("stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn", "stride_ib", "stride_ih",
           "stride_im", "stride_cb", "stride_ch", "H", "GROUP", "NQ", "NK", "QB", "KB")
