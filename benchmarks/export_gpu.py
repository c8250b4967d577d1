"""GPU numbers for docs/EXPORT.md: the shipped reference model's artifacts on one GPU, side by side.

    eager            the dense model (no vsopt), bf16
    compile-vsopt    torch.compile(backend="vsopt", options={"plan": shipped plan}), bf16
    onnx-ort-cuda    the portable ONNX (vsopt.export, fp16: onnxruntime's CUDA attention takes fp16) in
                     onnxruntime's CUDA execution provider, with I/O bound on the GPU; also the
                     same model without a plan (dense ONNX) to show what the mask costs
    aoti             the AOTInductor package (bf16, Triton kernels inside): build time, then a load
                     and a timed run in a child process per load route (a segfault is reported,
                     not fatal), with a plain MLP package as the control

Every artifact is also checked by vsopt.export (fresh process, against the eager optimized model).
On the H200 (DEVICE.md): `source benchmarks/gpu_env.sh`, with onnxscript and onnx-ir wheels under
.whl/model/ (pure Python) and onnxruntime-gpu installed under /tmp/site (import torch first, so its
CUDA 13 libraries load); then

    python3 benchmarks/export_gpu.py                 # the reference model at its trained size
    python3 benchmarks/export_gpu.py --smoke         # a small clip on the CPU: checks the script runs

Writes benchmarks/results/export_gpu.json and export_gpu.md (--out to change the folder).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vsopt.core.timing import median_ms  # noqa: E402  (after the path: runs from a checkout)


def time_ms(fn, device: str, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU): vsopt.core.timing's loop."""
    return median_ms(fn, reps, warmup=warmup, cuda=device == "cuda")


def reference(device: str, dtype: torch.dtype, smoke: bool):
    from vsopt.deploy.reference import reference_target

    frames, size = (4, 16) if smoke else (None, None)
    model, inputs, plan, note = reference_target(frames, size, None)
    model = model.to(device=device, dtype=dtype)
    inputs = tuple(x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype) for x in inputs)
    return model, inputs, plan, note


def ort_session(path: Path, device: str):
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=providers)
    return session, session.get_providers()[0]


def ort_timing(path: Path, inputs: tuple, device: str) -> dict:
    """onnxruntime with inputs and outputs bound on the device (no host copies in the timing)."""
    import numpy as np

    session, provider = ort_session(path, device)
    binding = session.io_binding()
    types = {torch.float16: np.float16, torch.float32: np.float32, torch.int64: np.int64}
    keep = []
    for meta, x in zip(session.get_inputs(), inputs):
        x = x.contiguous()
        keep.append(x)
        binding.bind_input(meta.name, "cuda" if device == "cuda" else "cpu", 0, types[x.dtype], list(x.shape),
                           x.data_ptr())
    for meta in session.get_outputs():
        binding.bind_output(meta.name, "cuda" if device == "cuda" else "cpu")
    ms = time_ms(lambda: session.run_with_iobinding(binding), "cpu")   # run_with_iobinding synchronizes
    return {"ms": ms, "provider": provider}


_AOTI_CHILD = r"""
import json, sys, time, statistics, torch
sys.path.insert(0, {root!r})
import vsopt.deploy as d
d.register_ops()
pkg, inputs_path, expected_path, route = sys.argv[1:5]
kwargs = {{"run_single_threaded": True}} if route == "single_threaded" else {{}}
t0 = time.perf_counter()
run = torch._inductor.aoti_load_package(pkg, **kwargs)
load_s = time.perf_counter() - t0
inputs = torch.load(inputs_path)
with torch.no_grad():
    out = run(*inputs)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    times = []
    for _ in range(10):
        t0 = time.perf_counter(); run(*inputs)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        times.append((time.perf_counter() - t0) * 1e3)
err = None
if expected_path != "-":
    want = torch.load(expected_path)
    got = out if isinstance(out, (list, tuple)) else [out]
    err = max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)).item()
              for g, w in zip(got, want))
print("RESULT " + json.dumps({{"load_s": load_s, "ms": statistics.median(times), "max_rel": err}}))
"""


def aoti_route(pkg: Path, inputs_path: Path, expected_path: str, route: str) -> dict:
    code = _AOTI_CHILD.format(root=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, str(pkg), str(inputs_path), expected_path, route],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode < 0:
        return {"route": route, "ok": False, "error": f"crashed with signal {-proc.returncode}"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"route": route, "ok": False, "error": f"exit {proc.returncode}: {tail[:300]}"}
    return {"route": route, "ok": True, **json.loads(line[len("RESULT "):])}


def mlp_control(device: str, tmp: Path) -> list[dict]:
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).to(device)
    x = torch.randn(8, 64, device=device)
    pkg = tmp / "mlp.pt2"
    torch._inductor.aoti_compile_and_package(torch.export.export(mlp, (x,)), package_path=str(pkg))
    torch.save((x,), tmp / "mlp_inputs.pt")
    return [aoti_route(pkg, tmp / "mlp_inputs.pt", "-", r) for r in ("default", "single_threaded")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a small clip on the CPU (checks the script)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--skip", default="", help="comma list of parts to skip: compile,onnx,aoti")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import vsopt

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    results: dict = {"device": gpu, "torch": torch.__version__, "smoke": args.smoke, "rows": [], "checks": {},
                     "aoti": {}}
    try:
        import onnxruntime as ort

        results["onnxruntime"] = f"{ort.__version__} {ort.get_available_providers()}"
    except ImportError as e:
        results["onnxruntime"] = f"not installed ({e})"
    main_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, inputs, plan, note = reference(device, main_dtype, args.smoke)
    results["plan"] = note
    rows = results["rows"]
    tmp = Path(tempfile.mkdtemp(prefix="vsopt-export-gpu-"))

    with torch.no_grad():
        rows.append({"path": "eager (dense)", "dtype": str(main_dtype), "ms": time_ms(lambda: model(*inputs), device)})
        if "compile" not in skip:
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="vsopt", options={"plan": plan})
            t0 = time.perf_counter()
            compiled(*inputs)
            rows.append({"path": "torch.compile(backend=vsopt)", "dtype": str(main_dtype),
                         "ms": time_ms(lambda: compiled(*inputs), device),
                         "note": f"compile {time.perf_counter() - t0:.0f} s"})

    if "onnx" not in skip:
        onnx_dtype = torch.float16 if device == "cuda" else torch.float32
        m16 = model.to(onnx_dtype)
        in16 = tuple(x.to(onnx_dtype) if x.is_floating_point() else x for x in inputs)
        for label, the_plan in (("onnx portable, shipped plan", plan), ("onnx portable, dense (no plan)", None)):
            out = tmp / ("sparse.onnx" if the_plan else "dense.onnx")
            try:
                t0 = time.perf_counter()
                result = vsopt.export(m16, in16, the_plan, "onnx", out, progress=print)
                row = {"path": label, "dtype": str(onnx_dtype), "note": f"export + check {time.perf_counter() - t0:.0f} s"}
                results["checks"][label] = result.check.line() if result.check else None
                row.update(ort_timing(out, in16, device))
            except Exception as e:  # noqa: BLE001 - reported in the table
                row = {"path": label, "dtype": str(onnx_dtype), "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
        model = model.to(main_dtype)

    if "aoti" not in skip:
        pkg = tmp / "reference.pt2"
        t0 = time.perf_counter()
        try:
            result = vsopt.export(model, inputs, plan, "aoti", pkg, check=False, progress=print)
            results["aoti"]["build_s"] = round(time.perf_counter() - t0, 1)
            results["aoti"]["notes"] = result.notes
            torch.save(tuple(inputs), tmp / "inputs.pt")
            from vsopt.deploy.program import rewritten_program

            expected = rewritten_program(model, inputs, plan).expected()
            torch.save(tuple(expected), tmp / "expected.pt")
            results["aoti"]["routes"] = [aoti_route(pkg, tmp / "inputs.pt", str(tmp / "expected.pt"), r)
                                         for r in ("default", "single_threaded")]
        except Exception as e:  # noqa: BLE001
            results["aoti"]["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        results["aoti"]["mlp_control"] = mlp_control(device, tmp)
        for r in results["aoti"].get("routes", []):
            if r.get("ok"):
                rows.append({"path": f"aoti package ({r['route']} load)", "dtype": str(main_dtype), "ms": r["ms"],
                             "note": f"max rel {r['max_rel']:.1e} vs eager optimized"})

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "export_gpu_smoke" if args.smoke else "export_gpu"
    from vsopt.core.io import atomic_write_json, atomic_write_text

    atomic_write_json(out_dir / f"{name}.json", results)
    atomic_write_text(out_dir / f"{name}.md", markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    lines = [f"Device: {r['device']}; torch {r['torch']}; onnxruntime {r.get('onnxruntime')}; plan: {r.get('plan')}",
             "", "| path | dtype | ms | notes |", "|---|---|---|---|"]
    base = next((x["ms"] for x in r["rows"] if x["path"].startswith("eager") and "ms" in x), None)
    for x in r["rows"]:
        ms = f"{x['ms']:.2f}" if "ms" in x else "-"
        speed = f" ({base / x['ms']:.2f}x eager)" if base and "ms" in x and not x["path"].startswith("eager") else ""
        note = "; ".join(filter(None, [x.get("provider"), x.get("note"), x.get("error")]))
        lines.append(f"| {x['path']} | {x['dtype'].removeprefix('torch.')} | {ms}{speed} | {note} |")
    a = r.get("aoti", {})
    if a:
        lines += ["", f"AOTI package build: {a.get('build_s', '-')} s. " + " ".join(a.get("notes", [])[-1:])]
        for label, routes in (("reference", a.get("routes", [])), ("MLP control", a.get("mlp_control", []))):
            for x in routes:
                lines.append(f"- {label}, {x['route']} load: " + (f"ok, {x['ms']:.2f} ms" if x.get("ok") else x["error"]))
        if a.get("error"):
            lines.append(f"- build failed: {a['error']}")
    for label, line in r.get("checks", {}).items():
        lines.append(f"- check of {label}: {line}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
