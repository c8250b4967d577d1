"""The block-sparse ops' route between the Gluon and the Triton kernel (kernels/block_sparse/route.py), on the CPU.

The rule is tested on fake CUDA tensors (no GPU here) with the GPU's facts stubbed; the plumbing (eager
launch, the opaque op in a traced graph, Inductor, export) with the Gluon launcher replaced by the
reference, since the Gluon kernel cannot run in the interpreter (tests/kernels/gpu_check_gluon.py
--parts op checks the real route on a Hopper GPU)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vsopt.core.ops as ops
from vsopt.kernels.block_mask import reference as mask_ref
from vsopt.kernels.block_sparse import gluon_launch, reference, route

from .helpers import block_mask, rel_l2

MEASURED = gluon_launch.GluonConfig(3, True, True, True, persistent=True)


@pytest.fixture
def hopper(monkeypatch):
    """What choose() reads from the GPU and the environment, as on the H200 with Triton 3.6."""
    monkeypatch.setattr(route, "_hardware", lambda index: None)
    monkeypatch.setattr(route, "interpreting", lambda: False)
    monkeypatch.setattr(route, "GLUON", True)


def _fake(shape=(1, 4, 300, 128), dtype=torch.bfloat16, layout="bhnd"):
    B, H, N, D = shape
    if layout == "bnhd":
        return torch.empty(B, N, H, D, dtype=dtype, device="cuda").transpose(1, 2)
    if layout == "strided":
        return torch.empty(B, H, N, 2 * D, dtype=dtype, device="cuda")[..., :D]
    return torch.empty(B, H, N, D, dtype=dtype, device="cuda")


def _choose(q=None, k=None, v=None, block_m=128, block_n=128, quant="none", softcap=0.0):
    with FakeTensorMode():
        q = _fake() if q is None else q()
        k = _fake((1, 2, 300, q.shape[-1]), q.dtype) if k is None else k()
        v = _fake((1, 2, 300, q.shape[-1]), q.dtype) if v is None else v()
        return route.choose(q, k, v, block_m, block_n, quant, softcap)


def test_measured_calls_take_the_gluon_kernel(hopper):
    r = _choose()
    assert (r.kernel, r.config) == ("gluon", MEASURED) and "head_dim 128" in r.reason
    # 128 x 64 tables, fp16, (B, N, H, D) views of a projection's output: covered, same variant.
    r = _choose(q=lambda: _fake(dtype=torch.float16, layout="bnhd"), block_n=64,
                k=lambda: _fake((1, 2, 300, 128), torch.float16, "bnhd"),
                v=lambda: _fake((1, 2, 300, 128), torch.float16, "bnhd"))
    assert (r.kernel, r.config) == ("gluon", MEASURED)


@pytest.mark.parametrize("case, words", [
    (dict(quant="int8"), "quant 'int8'"),
    (dict(quant="fp8"), "quant 'fp8'"),
    (dict(softcap=30.0), "soft cap"),
    (dict(q=lambda: _fake(dtype=torch.float32), k=lambda: _fake(dtype=torch.float32),
          v=lambda: _fake(dtype=torch.float32)), "dtype torch.float32"),
    (dict(q=lambda: _fake((1, 4, 300, 64)), k=lambda: _fake((1, 2, 300, 64)), v=lambda: _fake((1, 2, 300, 64))),
     "head_dim 64: the Gluon kernel was measured faster at head_dim 128 only"),
    (dict(block_n=32), "table blocks 128 x 32"),
    (dict(block_m=64, block_n=64), "table blocks 64 x 64"),
    (dict(q=lambda: _fake(layout="strided")), "layouts None/bhnd/bhnd"),
    (dict(k=lambda: _fake((1, 2, 300, 128), layout="bnhd")), "layouts bhnd/bnhd/bhnd"),   # k and v differ
])
def test_every_other_call_takes_the_triton_kernel_with_its_reason(hopper, case, words):
    r = _choose(**case)
    assert r.kernel == "triton" and r.config is None and words in r.reason, r.reason


def test_switch_interpreter_cpu_aot_and_gpu_facts_send_calls_to_triton(hopper, monkeypatch):
    from torch._inductor.virtualized import V

    monkeypatch.setattr(route, "GLUON", False)
    assert "switched off (VSOPT_GLUON=0" in _choose().reason
    monkeypatch.setattr(route, "GLUON", True)
    with V.set_aot_compilation(True):
        assert _choose().kernel == "triton" and "AOTInductor" in _choose().reason
    monkeypatch.setattr(route, "_hardware", lambda index: "compute capability (8, 0): ...")
    assert _choose().reason.startswith("compute capability (8, 0)")
    monkeypatch.setattr(route, "interpreting", lambda: True)
    assert "interpreter" in _choose().reason
    monkeypatch.setattr(route, "interpreting", lambda: False)
    x = torch.zeros(1, 4, 300, 128, dtype=torch.bfloat16)
    assert route.choose(x, x, x, 128, 128).reason.startswith("device cpu")


def test_hardware_facts_on_this_machine_are_a_reason():
    route._hardware.cache_clear()
    reason = route._hardware(0)
    assert reason is None or isinstance(reason, str) and reason   # here: no GPU, or not Hopper / not Triton 3.6
    if not torch.cuda.is_available():
        assert reason == "no CUDA device is visible to read its compute capability"


def test_real_base_pointers_must_be_16_byte_aligned():
    x = torch.empty(4 * 300 * 128 + 1, dtype=torch.bfloat16)
    assert route._aligned(x[:-1].view(1, 4, 300, 128))
    assert not route._aligned(x[1:].view(1, 4, 300, 128))     # 2 bytes off


def test_environment_switch_turns_the_route_off():
    code = "from vsopt.kernels.block_sparse import route; print(route.GLUON, route.cache_tag())"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "VSOPT_GLUON": "0"}).stdout
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert off.startswith("False gluon route off") and on.startswith("True gluon route on")


def test_measured_variant_per_head_dim():
    assert gluon_launch.default_config(128) == MEASURED
    assert gluon_launch.default_config(64) == gluon_launch.GluonConfig(2, False, True, persistent=True)
    assert all(c in gluon_launch.CONFIGS for c in gluon_launch.DEFAULT_CONFIGS.values())
    assert set(route.ROUTE_HEAD_DIMS) <= set(gluon_launch.DEFAULT_CONFIGS)
    assert gluon_launch.shared_bytes(128, 128, MEASURED.stages) <= 227 * 1024
    with pytest.raises(Exception, match="head_dim must be one of"):
        gluon_launch.default_config(32)


def test_op_route_on_the_cpu_and_in_the_interpreter():
    x = torch.zeros(1, 4, 300, 128, dtype=torch.bfloat16)
    assert ops.block_sparse_route(x, x, x, 128, 128) == ("reference", "device cpu")
    with FakeTensorMode():   # a CUDA call here (TRITON_INTERPRET=1, conftest): the Triton kernel
        c = torch.empty(1, 4, 300, 128, dtype=torch.bfloat16, device="cuda")
        kernel, reason = ops.block_sparse_route(c, c, c, 128, 128)
    assert kernel == "triton" and "interpreter" in reason


# ----------------------------------------------------------------------------- the plumbing, Gluon stubbed


def _case(N=300, D=128, Hq=2, Hkv=1, bn=128, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(N)
    q = torch.randn(1, Hq, N, D, generator=g).to(dtype)
    k, v = (torch.randn(1, Hkv, N, D, generator=g).to(dtype) for _ in range(2))
    idx, cnt = mask_ref.mask_to_table(block_mask(1, Hq, math.ceil(N / 128), math.ceil(N / bn), 0.5, g))
    return q, k, v, idx, cnt


@pytest.fixture
def stub_gluon(monkeypatch):
    """CPU calls routed to the Gluon launcher, which here computes the reference and records its calls."""
    calls = []

    def launch(q, k, v, idx, cnt, scale, bm, bn, with_lse, config, kernels=None, num_sms=None, row_order=None):
        calls.append({"config": config, "row_order": row_order, "real": type(q) is torch.Tensor})
        out, lse = reference.block_sparse_attention(q.float(), k.float(), v.float(), idx, cnt, scale, bm, bn)
        return torch.empty_like(q).copy_(out), (lse if with_lse else None)

    monkeypatch.setattr(ops, "_bsa_fallback_reason", lambda q: None)
    monkeypatch.setattr(route, "choose", lambda *a, **kw: route.Route("gluon", "stub", MEASURED))
    monkeypatch.setattr(gluon_launch, "launch_validated", launch)
    return calls


def _want(q, k, v, idx, cnt, bn=128):
    return reference.block_sparse_attention(q.float(), k.float(), v.float(), idx, cnt, q.shape[-1] ** -0.5, 128, bn)


def test_eager_call_launches_the_gluon_kernel_with_the_given_work_order(stub_gluon):
    q, k, v, idx, cnt = _case()
    before = ops.KERNEL_LAUNCHES["gluon"]
    order = ops.row_order(cnt, 1)
    out, lse = torch.ops.vsopt.block_sparse_attention_lse(q, k, v, idx, cnt, 128 ** -0.5, 128, 128, row_order=order)
    want, want_lse = _want(q, k, v, idx, cnt)
    assert rel_l2(out, want) < 1e-2 and torch.equal(lse, want_lse)
    assert stub_gluon[-1]["row_order"] is order and stub_gluon[-1]["config"] == MEASURED
    assert ops.KERNEL_LAUNCHES["gluon"] == before + 1 and ("gluon", "stub") in ops.KERNEL_ROUTES


def _traced_graphs(fn, *args):
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def compiler(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=aot_autograd(fw_compiler=compiler), fullgraph=True)(*args)
    return out, graphs


def _targets(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("with_lse", [False, True])
def test_traced_call_puts_the_opaque_gluon_op_in_the_graph(stub_gluon, with_lse):
    q, k, v, idx, cnt = _case(N=700, bn=64, dtype=torch.float16)

    def fn(q, k, v):
        if with_lse:
            return torch.ops.vsopt.block_sparse_attention_lse(q, k, v, idx, cnt, 128 ** -0.5, 128, 64)
        return torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, 128 ** -0.5, 128, 64)

    out, graphs = _traced_graphs(fn, q, k, v)
    (gm,) = graphs
    targets = _targets(gm)
    assert "vsopt.block_sparse_attention_gluon.default" in targets
    assert not any("triton_kernel_wrapper" in t for t in targets)    # no Triton launch traced
    want, want_lse = _want(q, k, v, idx, cnt, 64)
    if with_lse:
        out, lse = out
        assert lse.shape == (1, 2, 700) and torch.equal(lse, want_lse)
    assert rel_l2(out, want) < 1e-2
    # the launch ran at run time, on real tensors, with the order the graph computed (a sort in the graph)
    assert stub_gluon[-1]["real"] and stub_gluon[-1]["row_order"].shape == (2 * 6,)
    assert torch.equal(stub_gluon[-1]["row_order"], ops.row_order(cnt, 1))


def test_inductor_calls_the_opaque_op_and_keeps_the_output_layout(stub_gluon):
    from torch._inductor.utils import run_and_get_code

    q, k, v, idx, cnt = _case()
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))   # (B, N, H, D) views

    def fn(q, k, v):
        return torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, 128 ** -0.5, 128, 128).transpose(1, 2) * 2

    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(fn, backend="inductor"), qt, kt, vt)
    assert "torch.ops.vsopt.block_sparse_attention_gluon.default(" in "\n".join(code)
    assert rel_l2(out, _want(q, k, v, idx, cnt)[0].transpose(1, 2) * 2) < 1e-2


def test_export_keeps_the_op_itself(stub_gluon):
    """torch.export keeps vsopt::block_sparse_attention (triton ops are not decomposed there), so the
    ONNX / TensorRT translations see it; an AOTInductor compilation then chooses the Triton kernel
    (route: AOT)."""
    q, k, v, idx, cnt = _case()

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, 128 ** -0.5, 128, 128)

    ep = torch.export.export(M(), (q, k, v), strict=False)
    for graph in (ep.graph, ep.run_decompositions().graph):
        targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
        assert "vsopt.block_sparse_attention.default" in targets and not any("gluon" in t for t in targets)


def test_opaque_op_runs_the_triton_kernel_where_the_route_says_so_now():
    """Called with tensors the Gluon kernel cannot take now (here: the interpreter), the opaque op runs the
    Triton kernel (interpreted) and records why; its fake matches the real output."""
    q, k, v, idx, cnt = _case(N=40, D=16, Hq=2, Hkv=1, dtype=torch.float16)   # (bf16 in the interpreter: garbage)
    idx, cnt = mask_ref.mask_to_table(block_mask(1, 2, 3, 3, 0.6, torch.Generator().manual_seed(1)))
    order = ops.row_order(cnt, 1)
    out, lse = torch.ops.vsopt.block_sparse_attention_gluon(q, k, v, idx, cnt, 0.25, 16, 16, order, True)
    want, want_lse = reference.block_sparse_attention(q.float(), k.float(), v.float(), idx, cnt, 0.25, 16, 16)
    assert rel_l2(out, want) < 1e-2 and torch.allclose(lse, want_lse, atol=1e-2, rtol=0, equal_nan=True)
    assert any(kernel == "triton" and "interpreter" in reason for kernel, reason in ops.KERNEL_ROUTES)
    no_lse = torch.ops.vsopt.block_sparse_attention_gluon(q, k, v, idx, cnt, 0.25, 16, 16, order, False)[1]
    assert no_lse.shape == (0,) and no_lse.dtype == torch.float32
    for with_lse in (False, True):
        torch.library.opcheck(torch.ops.vsopt.block_sparse_attention_gluon.default,
                              (q, k, v, idx, cnt, 0.25, 16, 16, order, with_lse),
                              test_utils=("test_schema", "test_faketensor"))


def test_gpu_check_op_part_runs_on_the_cpu_with_the_gluon_kernel_stubbed(stub_gluon, monkeypatch, tmp_path):
    """tests/kernels/gpu_check_gluon.py --parts op, small and on the CPU (no CUDA graphs): the route the
    stub gives (Gluon at head_dim 128 unless switched off) is what every check sees, and every check passes."""
    import importlib.util
    import pathlib

    def choose(q, k, v, block_m, block_n, quant="none", softcap=0.0):
        if route.GLUON and q.shape[-1] in route.ROUTE_HEAD_DIMS:
            return route.Route("gluon", "stub", MEASURED)
        return route.Route("triton", "stub")

    monkeypatch.setattr(route, "choose", choose)
    path = pathlib.Path(__file__).with_name("gpu_check_gluon.py")
    spec = importlib.util.spec_from_file_location("gpu_check_gluon", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    shapes = [(1, 2, 1, 300, 128, 128, torch.float16, 1, False), (2, 2, 2, 200, 128, 64, torch.float16, 2, True),
              (1, 2, 1, 100, 64, 128, torch.float16, 1, False)]   # float16: the interpreter's bf16 is garbage
    check.op_part(tmp_path, device="cpu", shapes=shapes, workload=(1, 2, 256, 128), timed=[(1.0, 128)], rounds=1,
                  iters=1, t0=__import__("time").time(), dtype=torch.float16)
    assert check.failures == [], check.failures
    cases = [r["case"] for r in check.results["correctness"]]
    assert sum(c.startswith("op eager B") for c in cases) == 3 and sum("torch.compile" in c for c in cases) == 2
    (timing,) = check.results["op"]["timing"]
    assert timing["gluon route"]["ms"] > 0 and timing["triton (route off)"]["ms"] > 0
    assert (tmp_path / "gpu_check_gluon_op.json").exists()


def test_aotinductor_compilation_is_seen_where_the_route_is_chosen(monkeypatch):
    """The op's body chooses its route while AOTInductor compiles (aoti_compile_and_package) with the AOT
    flag set, so a package keeps the Triton kernel; torch.compile does not set it. (The compilation is
    stopped at the choice: the rule itself is tested above.)"""
    seen = []

    class Chosen(Exception):
        pass

    def choose(*args, **kwargs):
        seen.append(route._aot_compiling())
        raise Chosen

    monkeypatch.setattr(ops, "_bsa_fallback_reason", lambda q: None)
    monkeypatch.setattr(route, "choose", choose)
    q, k, v, idx, cnt = _case()

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, 128 ** -0.5, 128, 128)

    ep = torch.export.export(M(), (q, k, v), strict=False)   # export itself keeps the op: no choice made
    assert seen == []
    with pytest.raises(Exception) as err:
        torch._inductor.aoti_compile_and_package(ep)
    assert seen == [True], (seen, err.value)
    torch._dynamo.reset()
    with pytest.raises(Exception):
        torch.compile(M(), backend="inductor")(q, k, v)
    assert seen == [True, False]


def test_switched_sets_the_switch_inside_the_block_only(monkeypatch):
    monkeypatch.setattr(route, "GLUON", True)
    with route.switched(False):
        assert route.GLUON is False
    assert route.GLUON is True
    with pytest.raises(RuntimeError), route.switched(False):
        raise RuntimeError
    assert route.GLUON is True


def test_vsopt_backend_runs_a_planned_site_through_the_opaque_op(stub_gluon):
    """backend="vsopt" with a plan at head_dim 128 and 128 x 128 blocks: Inductor (the real one, on the
    CPU) compiles the prepared graph, whose launch carries its static work order; the Gluon route's
    opaque op runs with it at run time, and the output is the one of the same plan run eagerly."""
    import torch.nn.functional as F

    from vsopt.backend import trace_and_rewrite
    from vsopt.core.config import VsoptConfig
    from vsopt.core.orders import TokenOrder
    from vsopt.core.patterns import LocalWindow
    from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v) * 2.0

    grid = (2, 8, 24)   # 384 tokens: three 128-token blocks
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 384, 128, generator=g).to(torch.float16) for _ in range(3))
    model = Attn()
    _, report = trace_and_rewrite(model, (q, k, v), VsoptConfig.from_options({"grid": grid}))
    (site,) = report.sites
    heads = [HeadPlan(Sparsity.PATTERN, TokenOrder.HWF, Quant.NONE, 128, 128, pattern=LocalWindow(1, 1, 1))] * 2
    plan = Plan({site.site_id: SitePlan.for_site(site, heads)})
    exported, _ = trace_and_rewrite(model, (q, k, v), VsoptConfig.from_options({"grid": grid, "plan": plan}))
    want = exported(q, k, v)                                         # eager: the stubbed launch, computed order
    assert stub_gluon[-1]["real"] and stub_gluon[-1]["row_order"] is None
    torch._dynamo.reset()
    out = torch.compile(model, backend="vsopt", options={"grid": grid, "plan": plan})(q, k, v)
    last = stub_gluon[-1]
    assert last["real"] and last["row_order"] is not None and last["row_order"].dtype == torch.int32
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_gluon_route_checks_the_scale_as_the_triton_launcher_does(stub_gluon):
    from vsopt.core.errors import KernelInputError

    q, k, v, idx, cnt = _case()
    with pytest.raises(KernelInputError, match="scale must be positive, got -1.0"):
        torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, -1.0, 128, 128)
    assert stub_gluon == []
