"""The first-GPU run of gnnumba's CUDA kernels: correctness, determinism, then timings.

    python benchmarks/bench_cuda.py [--quick] [--iters 50] [--json out.json] [--skip-huge]

Without a GPU (or without torch) it prints why and exits with status 0: it never prints
invented figures. On a GPU, in order:

1. Correctness against float64 (torch on the same GPU): every shape x dtype (float16,
   bfloat16, float32) x layout (NCHW, channels_last) x activation (None, silu), forward
   (y, mean, rstd) and backward (dx, dweight, dbias), plus the per-sample gradients summed
   over n against dweight/dbias.
2. Determinism: each call repeated gives bit-identical outputs; in-place (y is x) equals the
   out-of-place result.
3. A tensor of more than 2**31 elements (float16, 4.3 GB): statistics of sampled groups
   against float64 (``--skip-huge`` leaves it out).
4. Timings with CUDA events, medians of interleaved repeats: gnnumba's launch_forward /
   launch_backward on torch's current stream, torch's F.group_norm (eager, and replayed from
   a CUDA graph), and a device copy of the same bytes; ratios ``vs torch`` (> 1: gnnumba
   faster) and ``of copy`` (copy time / gnnumba time: the fraction of bandwidth reached).
   gnnumba is also timed replayed from a CUDA graph (the host path then costs nothing).

Afterwards, run the kernels under compute-sanitizer (prints the commands, see SANITIZER).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

# (label, shape, groups): SD-UNet blocks at batch 2 and 8, video (3-D) blocks
SHAPES = [
    ("sd-unet 2x320x64x64", (2, 320, 64, 64), 32),
    ("sd-unet 2x640x32x32", (2, 640, 32, 32), 32),
    ("sd-unet 2x1280x16x16", (2, 1280, 16, 16), 32),
    ("sd-unet 2x1280x8x8", (2, 1280, 8, 8), 32),
    ("sd-unet 8x320x64x64", (8, 320, 64, 64), 32),
    ("sd-unet 8x640x32x32", (8, 640, 32, 32), 32),
    ("sd-unet 8x1280x16x16", (8, 1280, 16, 16), 32),
    ("sd-unet 8x1280x8x8", (8, 1280, 8, 8), 32),
    ("video 1x128x8x64x64", (1, 128, 8, 64, 64), 32),
    ("video 1x256x4x32x32", (1, 256, 4, 32, 32), 32),
]
QUICK = [0, 3, 8]  # indices of SHAPES for --quick

SANITIZER = [
    "compute-sanitizer --tool memcheck python benchmarks/bench_cuda.py --quick --iters 2 "
    "--skip-huge",
    "compute-sanitizer --tool racecheck python benchmarks/bench_cuda.py --quick --iters 2 "
    "--skip-huge",
    "compute-sanitizer --tool synccheck python benchmarks/bench_cuda.py --quick --iters 2 "
    "--skip-huge",
    "compute-sanitizer --tool initcheck python benchmarks/bench_cuda.py --quick --iters 2 "
    "--skip-huge",
]


def _gpu():
    """(torch, launch) or None with the reason printed."""
    try:
        import torch
    except ImportError:
        print("torch is not installed: nothing to compare against (no figures)")
        return None
    from numba import cuda

    if not (cuda.is_available() and torch.cuda.is_available()):
        print("no CUDA GPU visible to Numba and torch: benchmark skipped (no figures)")
        return None
    from gnnumba.gpu import launch

    return torch, launch


class Call:
    """gnnumba's forward/backward on torch tensors, outputs preallocated, on torch's stream."""

    def __init__(self, torch, launch, x, G, w, b, act):
        self.torch, self.launch = torch, launch
        self.x, self.G, self.w, self.b, self.act = x, G, w, b, act
        self.y = torch.empty_like(x)
        N, C = x.shape[:2]
        self.mean = torch.empty(N, G, device=x.device, dtype=torch.float32)
        self.rstd = torch.empty_like(self.mean)
        self.dy = torch.randn_like(x)
        self.dx = torch.empty_like(x)
        self.dwn = torch.empty(N, C, device=x.device, dtype=torch.float32)
        self.dbn = torch.empty_like(self.dwn)
        self.dw = torch.empty(C, device=x.device, dtype=torch.float32)  # float32: issue 10 #7
        self.db = torch.empty_like(self.dw)
        self.alloc = lambda shape, dtype: torch.empty(shape, device=x.device,
                                                      dtype=getattr(torch, dtype.name))

    def stream(self):
        return self.torch.cuda.current_stream().cuda_stream

    def forward(self, out=None):
        with self.launch.workspace_allocator(self.alloc):
            self.launch.launch_forward(self.x, self.G, self.w, self.b, 1e-5, self.act,
                                       self.y if out is None else out, self.mean, self.rstd,
                                       stream=self.stream())

    def backward(self):
        with self.launch.workspace_allocator(self.alloc):
            self.launch.launch_backward(self.dy, self.x, self.mean, self.rstd, self.G, self.w,
                                        self.b, self.act, self.dx, self.dwn, self.dbn,
                                        self.dw, self.db, stream=self.stream())


def _reference(torch, call):
    """float64 torch on the GPU: y, mean, rstd, dx, dweight, dbias."""
    F = torch.nn.functional
    x = call.x.double().requires_grad_()
    w = call.w.double().requires_grad_()
    b = call.b.double().requires_grad_()
    N = x.shape[0]
    xg = x.detach().reshape(N, call.G, -1)
    mean = xg.mean(-1)
    rstd = 1 / torch.sqrt(xg.var(-1, unbiased=False) + 1e-5)
    y = F.group_norm(x, call.G, w, b, 1e-5)
    if call.act:
        y = getattr(F, call.act)(y)
    y.backward(call.dy.double())
    return [y.detach(), mean, rstd, x.grad, w.grad, b.grad]


def _err(got, want):
    got = got.double()
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


TOL = {"float16": (1e-2, 3e-2), "bfloat16": (2e-2, 6e-2), "float32": (1e-5, 1e-4)}


def _sums_match(per_sample, total):
    """total is the float32 sum over n of per_sample, in order of n. torch's sum takes
    another order, so the two agree to float32 rounding of the terms' magnitudes, not of
    the (possibly cancelling) result: on an H100 at N=8, rtol=1e-5 flagged 30 of 120 rows."""
    n = per_sample.shape[0]
    diff = (per_sample.double().sum(0) - total.double()).abs()
    return bool((diff <= n * 2.0 ** -23 * per_sample.double().abs().sum(0) + 1e-30).all())


def check(torch, launch, x, G, act, dtype_name):
    """Correctness, determinism and in-place for one case; returns a dict of results."""
    C = x.shape[1]
    w = torch.randn(C, device="cuda", dtype=x.dtype) * 0.5 + 1
    b = torch.randn(C, device="cuda", dtype=x.dtype)
    call = Call(torch, launch, x, G, w, b, act)
    call.forward()
    call.backward()
    got = [call.y, call.mean, call.rstd, call.dx, call.dw, call.db]
    errs = [_err(g, r) for g, r in zip(got, _reference(torch, call))]
    tol_y, tol_g = TOL[dtype_name]
    ok = max(errs[:3]) <= tol_y and max(errs[3:]) <= tol_g
    first = [t.clone() for t in got]
    call.forward()
    call.backward()
    repeat = all(torch.equal(a, b_) for a, b_ in zip(first, [call.y, call.mean, call.rstd,
                                                              call.dx, call.dw, call.db]))
    xi = x.clone()
    call2 = Call(torch, launch, xi, G, w, b, act)
    call2.forward(out=xi)  # in place
    inplace = torch.equal(xi, first[0])
    per_sample = _sums_match(call.dwn, call.dw) and _sums_match(call.dbn, call.db)
    return dict(errors=errs, ok=ok, bit_identical=repeat, in_place=inplace,
                per_sample_sums=per_sample), call


def _events(torch, fn, iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e-3


def _graphed(torch, fn):
    """fn captured in a CUDA graph (warmed up on a side stream, as torch requires)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def time_case(torch, call, iters, repeats=5):
    """Medians over ``repeats`` interleaved rounds of each timing (seconds per call)."""
    F = torch.nn.functional
    x, G, w, b = call.x, call.G, call.w, call.b
    act = getattr(F, call.act) if call.act else (lambda t: t)
    y2 = torch.empty_like(x)
    fns = {
        "fwd": call.forward,
        "torch_fwd": lambda: act(F.group_norm(x, G, w, b, 1e-5)),
        "copy": lambda: y2.copy_(x),
        "bwd": call.backward,
    }
    try:
        fns["fwd_graph"] = _graphed(torch, call.forward)
        fns["torch_fwd_graph"] = _graphed(torch, fns["torch_fwd"])
    except Exception as e:  # reported, not hidden: graph capture is part of the contract
        print(f"    CUDA graph capture failed: {type(e).__name__}: {e}")
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    rounds = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            rounds[k].append(_events(torch, fn, iters))
    return {k: statistics.median(v) for k, v in rounds.items()}


def huge(torch, launch):
    """More than 2**31 elements in float16 (int64 indexing): sampled groups vs float64."""
    shape = (1, 64, 32768, 1025)  # 2.15e9 elements, 4.3 GB
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    G = 32
    y = torch.empty_like(x)
    mean = torch.empty(1, G, device="cuda")
    rstd = torch.empty_like(mean)
    launch.launch_forward(x, G, None, None, 1e-5, None, y, mean, rstd,
                          stream=torch.cuda.current_stream().cuda_stream)
    worst = 0.0
    for g in (0, G // 2, G - 1):
        xg = x[0, g * 2:(g + 1) * 2].double()
        worst = max(worst, abs(float(xg.mean()) - float(mean[0, g])),
                    abs(float(1 / torch.sqrt(xg.var(unbiased=False) + 1e-5)) -
                        float(rstd[0, g])) / float(rstd[0, g]))
        tail = y[0, (g + 1) * 2 - 1, -1, -8:].double()
        want = (x[0, (g + 1) * 2 - 1, -1, -8:].double() - float(mean[0, g])) * float(
            rstd[0, g])
        worst = max(worst, float((tail - want).abs().max()))
    del x, y
    torch.cuda.empty_cache()
    return worst


def _machine(torch, launch):
    import numba
    import numba_cuda

    return dict(device=torch.cuda.get_device_name(), sms=launch.sm_count(),
                torch=torch.__version__, cuda=torch.version.cuda, numba=numba.__version__,
                numba_cuda=numba_cuda.__version__, python=sys.version.split()[0])


def _geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values))


def table(report) -> str:
    """README's table of a ``--json`` run: forward time per shape and layout, float16 and
    float32 without activation, graphed (GPU time alone) and eager (with the host path), as
    ratios to torch; and a summary line over every row of the run."""
    rows = report["rows"]
    m = report["machine"]
    us = lambda s: f"{s * 1e6:.1f}"  # noqa: E731
    by = {(r["shape"], r["dtype"], r["layout"]): r for r in rows if r["act"] is None}
    out = [
        f"Measured on: {m['device']} ({m['sms']} SMs), torch {m['torch']} (CUDA {m['cuda']}), "
        f"Numba {m['numba']}, numba-cuda {m['numba_cuda']}, Python {m['python']}; "
        f"`python benchmarks/bench_cuda.py`, CUDA events, medians of interleaved repeats. "
        f"*graphed*: replayed from a CUDA graph, the GPU time alone; *eager*: one call as a "
        f"program makes it, host path included. Ratio = torch's time / gnnumba's.",
        "",
        "| shape | layout | float16 graphed: gnnumba | torch | ratio | float32 graphed: "
        "gnnumba | torch | ratio | float32 eager: gnnumba | torch | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in dict.fromkeys(r["shape"] for r in rows):
        for layout in ("nchw", "channels_last"):
            h, f = by.get((label, "float16", layout)), by.get((label, "float32", layout))
            if h is None or f is None:
                continue
            out.append(
                f"| {label} | {layout} | {us(h['fwd_graph_s'])} µs | "
                f"{us(h['torch_fwd_graph_s'])} µs | "
                f"{h['torch_fwd_graph_s'] / h['fwd_graph_s']:.2f}× | "
                f"{us(f['fwd_graph_s'])} µs | {us(f['torch_fwd_graph_s'])} µs | "
                f"{f['torch_fwd_graph_s'] / f['fwd_graph_s']:.2f}× | {us(f['fwd_s'])} µs | "
                f"{us(f['torch_fwd_s'])} µs | {f['torch_fwd_s'] / f['fwd_s']:.2f}× |")
    good = sum(r["ok"] and r["bit_identical"] and r["in_place"] and r["per_sample_sums"]
               for r in rows)
    out += ["", f"Over all {len(rows)} rows of the run (float16, bfloat16, float32; both "
            f"layouts; SiLU on and off): geometric mean ratio graphed "
            f"{_geomean([r['torch_fwd_graph_s'] / r['fwd_graph_s'] for r in rows]):.2f}×, "
            f"eager {_geomean([r['torch_fwd_s'] / r['fwd_s'] for r in rows]):.2f}×; "
            f"{good} of {len(rows)} rows correct against float64, bit-identical on repeat and "
            f"in place, per-sample gradients summing to dweight/dbias."]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="three shapes")
    ap.add_argument("--skip-huge", action="store_true", help="skip the >2**31-element case")
    ap.add_argument("--json")
    ap.add_argument("--table", metavar="JSON", help="print README's Markdown table from the "
                    "output of a --json run, and exit (no GPU needed)")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)), end="")
        return 0
    env = _gpu()
    if env is None:
        return 0
    torch, launch = env
    print(f"device: {torch.cuda.get_device_name()}  SMs: {launch.sm_count()}")
    shapes = [SHAPES[i] for i in QUICK] if args.quick else SHAPES
    rows, failures = [], 0
    print(f"{'shape':22s} {'dtype':8s} {'layout':6s} {'act':5s} {'ok':3s} {'rep':3s} "
          f"{'fwd us':>8s} {'graph':>8s} {'torch':>8s} {'t.graph':>8s} {'copy':>8s} "
          f"{'vs torch':>8s} {'of copy':>8s} {'bwd us':>8s}")
    for label, shape, G in shapes:
        for dtype_name in ("float16", "bfloat16", "float32"):
            for layout in ("nchw", "channels_last"):
                for act in (None, "silu"):
                    dtype = getattr(torch, dtype_name)
                    x = torch.randn(shape, device="cuda", dtype=dtype) * 2 + 3
                    if layout == "channels_last":
                        fmt = (torch.channels_last if x.dim() == 4 else
                               torch.channels_last_3d)
                        x = x.contiguous(memory_format=fmt)
                    try:
                        res, call = check(torch, launch, x, G, act, dtype_name)
                    except TypeError as e:  # e.g. bfloat16 through __cuda_array_interface__
                        print(f"{label:22s} {dtype_name:8s} {layout[:6]:6s} {str(act):5s} "
                              f"not run: {e}")
                        continue
                    t = time_case(torch, call, args.iters)
                    ok = res["ok"] and res["bit_identical"] and res["in_place"] and \
                        res["per_sample_sums"]
                    failures += not ok
                    row = dict(shape=label, dtype=dtype_name, layout=layout, act=act, **res,
                               **{k + "_s": v for k, v in t.items()},
                               vs_torch=t["torch_fwd"] / t["fwd"], of_copy=t["copy"] / t["fwd"])
                    rows.append(row)
                    us = {k: f"{v * 1e6:8.1f}" for k, v in t.items()}
                    print(f"{label:22s} {dtype_name:8s} {layout[:6]:6s} {str(act):5s} "
                          f"{'ok' if res['ok'] else 'ERR':3s} "
                          f"{'yes' if res['bit_identical'] else 'NO':3s} {us['fwd']} "
                          f"{us.get('fwd_graph', '       -')} {us['torch_fwd']} "
                          f"{us.get('torch_fwd_graph', '       -')} {us['copy']} "
                          f"{row['vs_torch']:7.2f}x {row['of_copy']:7.0%} {us['bwd']}",
                          flush=True)
    if not args.skip_huge:
        err = huge(torch, launch)
        print(f">2**31 elements (1x64x32768x1025 float16): worst error of sampled groups "
              f"{err:.2e} ({'ok' if err < 2e-2 else 'FAIL'})")
        failures += err >= 2e-2
    print("\nNext: the kernels under compute-sanitizer:")
    for cmd in SANITIZER:
        print("  " + cmd)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=_machine(torch, launch), rows=rows), f, indent=1,
                      default=str)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
