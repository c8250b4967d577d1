"""GPU check of the semantic clustering order (Sparse VideoGen 2, vsopt.core.clustering) at Wan-like
sizes: the k-means layout on the GPU and the clustered block-sparse attention through the Triton
kernel, against float64 references; that the whole path makes no host sync (torch's sync debug
mode set to "error") and replays inside a CUDA graph; and its times beside dense and top-k.

    python3 tests/kernels/gpu_check_cluster.py [--out cluster.json]   (one CUDA GPU; exit 1 on a FAIL)
    python3 tests/kernels/gpu_check_cluster.py --smoke                (tiny sizes on the CPU)

Prints one JSON object. Per case: rel L2 at top_p 1 against exact dense attention (PASS under
BOUND: bf16), rel L2 at top_p < 1 against the float64 token-mask reference of the same layout
(reference_clustered_attention, first heads only), the block density each top_p gives, and (GPU)
no_host_sync / cuda_graph (the layout and attention captured and replayed on new inputs equal
the eager result) and median ms of the layout (cold, warm) and of the attention, beside dense
(block-sparse at density 1) and top-k at the same density. Not collected by pytest
(tests/core/test_clustering.py checks the math on the CPU; tests/kernels/test_gpu_check_cluster.py
runs --smoke).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from vsopt.core import semantics
from vsopt.core.clustering import ClusterSpec, cluster_layout, clustered_attention, reference_clustered_attention
from vsopt.core.dynamic import DynamicMethod, DynamicSpec
from vsopt.core.plan import Quant

BOUND = 2e-2  # bf16 inputs and output
REF_HEADS = 2  # the float64 token-mask reference is (B, heads, N, N): on the first heads only


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _inputs(B, H, N, D, device, dtype, seed):
    """q/k/v with content clusters (a few shared directions), as real heads have."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dirs = torch.randn(16, D, generator=g) * 1.5
    lab_q, lab_k = torch.randint(0, 16, (N,), generator=g), torch.randint(0, 16, (N,), generator=g)
    q = torch.randn(B, H, N, D, generator=g) + dirs[lab_q]
    k = torch.randn(B, H, N, D, generator=g) + dirs[lab_k]
    v = torch.randn(B, H, N, D, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _sync_free(fn) -> tuple[bool, str]:
    """Whether fn runs with torch's CUDA sync debug mode on "error" (any host sync raises)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True, ""
    except RuntimeError as e:
        return False, str(e).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _graph_replay(q, k, v, spec, scale, block) -> tuple[bool, float]:
    """Capture layout + attention in a CUDA graph, replay on other inputs copied into the static
    ones, compare with eager on those inputs: (equal within bf16, rel L2)."""
    sq, sk, sv = q.clone(), k.clone(), v.clone()

    def run():
        lay = cluster_layout(sq, sk, spec, scale, block, block)
        return clustered_attention(sq, sk, sv, lay, scale, "none", block, block)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            run()  # warm-up: Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    g = torch.Generator(device="cpu").manual_seed(123)
    for x in (sq, sk, sv):
        x.copy_(x + 0.3 * torch.randn(x.shape, generator=g).to(x.device, x.dtype))
    graph.replay()
    torch.cuda.synchronize()
    eager = run()
    rel = _rel(static_out, eager)
    return rel < 1e-3, rel


def _case(name, B, H, N, D, block, clusters, top_ps, device, dtype, gpu):
    q, k, v = _inputs(B, H, N, D, device, dtype, seed=N + H)
    scale = D ** -0.5
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    out = {"case": name, "B": B, "H": H, "N": N, "D": D, "block": block, "clusters": list(clusters), "points": []}
    dense_spec = ClusterSpec(*clusters, top_p=1.0)
    lay = cluster_layout(q, k, dense_spec, scale, block, block)
    got = clustered_attention(q, k, v, lay, scale, "none", block, block)
    out["top_p_1_rel_l2_vs_exact"] = rel1 = _rel(got, exact)
    ok = rel1 < BOUND and bool(lay.masks.all())
    for p in top_ps:
        spec = ClusterSpec(*clusters, top_p=p)
        lay = cluster_layout(q, k, spec, scale, block, block)
        got = clustered_attention(q, k, v, lay, scale, "none", block, block)
        sl = slice(0, min(H, REF_HEADS))
        sub = type(lay)(lay.perm_q[:, sl], lay.perm_k[:, sl], lay.masks[:, sl], lay.centroids_q[:, sl],
                        lay.centroids_k[:, sl])
        want = reference_clustered_attention(q[:, sl], k[:, sl], v[:, sl], sub, scale, block, block)
        density = float(lay.masks.float().mean())
        point = {"top_p": p, "density": density, "rel_l2_vs_reference": _rel(got[:, sl], want),
                 "cluster_rel_l2_vs_exact": _rel(got, exact)}
        # top-k over pooled blocks in the model's order at the same density, for comparison
        topk = semantics.dynamic_masks(q, k, DynamicSpec(DynamicMethod.TOP_K, max(density, 1e-3)), scale, block, block)
        tk = semantics.masked_attention(q, k, v, topk, scale, Quant.NONE, block, block)
        point["topk_density"] = float(topk.float().mean())
        point["topk_rel_l2_vs_exact"] = _rel(tk, exact)
        ok = ok and point["rel_l2_vs_reference"] < BOUND
        if gpu:
            from vsopt.core.timing import median_ms

            warm = (lay.centroids_q, lay.centroids_k)
            point["layout_cold_ms"] = median_ms(lambda: cluster_layout(q, k, spec, scale, block, block), 10, warmup=2,
                                                cuda=True)
            point["layout_warm_ms"] = median_ms(lambda: cluster_layout(q, k, spec, scale, block, block, init=warm), 10,
                                                warmup=2, cuda=True)
            point["attention_ms"] = median_ms(lambda: clustered_attention(q, k, v, lay, scale, "none", block, block),
                                              10, warmup=2, cuda=True)
            point["topk_attention_ms"] = median_ms(lambda: semantics.masked_attention(q, k, v, topk, scale, Quant.NONE,
                                                                                      block, block), 10, warmup=2,
                                                   cuda=True)
        out["points"].append(point)
    if gpu:
        from vsopt.core.timing import median_ms

        ones = torch.ones(1, H, -(-N // block), -(-N // block), dtype=torch.bool, device=device)
        out["dense_ms"] = median_ms(lambda: semantics.masked_attention(q, k, v, ones, scale, Quant.NONE, block, block),
                                    10, warmup=2, cuda=True)
        spec = ClusterSpec(*clusters, top_p=top_ps[0])
        warm_lay = cluster_layout(q, k, spec, scale, block, block)

        def whole():
            lay2 = cluster_layout(q, k, spec, scale, block, block, init=(warm_lay.centroids_q, warm_lay.centroids_k))
            clustered_attention(q, k, v, lay2, scale, "none", block, block)

        out["no_host_sync"], out["sync_error"] = _sync_free(whole)
        try:
            out["cuda_graph"], out["cuda_graph_rel_l2"] = _graph_replay(q, k, v, spec, scale, block)
        except RuntimeError as e:  # a capture that fails is a FAIL with its reason, not a crash
            out["cuda_graph"], out["cuda_graph_error"] = False, str(e).splitlines()[0][:200]
        ok = ok and out["no_host_sync"] and out["cuda_graph"]
    out["pass"] = ok
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the references)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        device, dtype, gpu = "cpu", torch.float32, False
        cases = [("smoke", 1, 2, 130, 16, 16, (6, 8), (0.5,))]
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU: run with --smoke for the CPU path", file=sys.stderr)
            return 2
        device, dtype, gpu = "cuda", torch.bfloat16, True
        cases = [("wan-4680", 1, 12, 4680, 128, 64, (64, 128), (0.5, 0.8, 0.95)),
                 ("wan-9360", 1, 12, 9360, 128, 64, (100, 200), (0.5, 0.8))]
    results = [_case(*c, device, dtype, gpu) for c in cases]
    doc = {"check": "cluster_order", "device": torch.cuda.get_device_name() if gpu else "cpu",
           "torch": torch.__version__, "bound": BOUND, "results": results}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        from vsopt.core.io import atomic_write_bytes

        atomic_write_bytes(args.out, (text + "\n").encode())
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
