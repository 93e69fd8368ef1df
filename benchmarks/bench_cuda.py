"""GPU benchmark of the Numba CUDA GroupNorm forward (run on a machine with a GPU).

    python benchmarks/bench_cuda.py [--iters 50] [--json out.json]

Per shape and dtype (fp32, fp16) it reports: time per call of gnnumba's forward
(``launch_forward`` on torch-allocated outputs, torch's current stream), achieved
bandwidth (read x + write y) as a fraction of a same-size device copy, and the ratio of
torch's native CUDA GroupNorm time to gnnumba's (> 1: gnnumba faster). Exits with a message
(status 0) when no GPU is present; it never prints invented figures.
"""

import argparse
import json
import sys

# (label, shape, groups): the shapes of issue 4
SHAPES = [
    ("sd-unet C=320 64x64", (2, 320, 64, 64), 32),
    ("sd-unet C=640 32x32", (2, 640, 32, 32), 32),
    ("sd-unet C=1280 16x16", (2, 1280, 16, 16), 32),
    ("sd-unet C=1280 8x8", (2, 1280, 8, 8), 32),
    ("video C=128 8x64x64", (1, 128, 8, 64, 64), 32),
    ("resnet N=32 C=256 56x56", (32, 256, 56, 56), 32),
]



def _time(fn, torch, iters):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e-3  # seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("torch is not installed: nothing to compare against")
        return 0
    from numba import cuda

    if not (cuda.is_available() and torch.cuda.is_available()):
        print("no CUDA GPU visible to Numba and torch: benchmark skipped (no figures)")
        return 0
    from gnnumba.gpu import launch_forward

    print(f"device: {torch.cuda.get_device_name()}")
    print(f"{'shape':28s} {'dtype':7s} {'gnnumba':>10s} {'torch':>10s} {'copy':>10s} "
          f"{'GB/s':>7s} {'of copy':>8s} {'vs torch':>8s}")
    rows = []
    for label, shape, G in SHAPES:
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(shape, device="cuda", dtype=dtype)
            w = torch.randn(shape[1], device="cuda", dtype=dtype)
            b = torch.randn(shape[1], device="cuda", dtype=dtype)
            y = torch.empty_like(x)
            sdt = torch.float32
            mean = torch.empty(shape[0], G, device="cuda", dtype=sdt)
            rstd = torch.empty_like(mean)

            def ours():
                launch_forward(x, G, w, b, 1e-5, None, y, mean, rstd,
                               stream=torch.cuda.current_stream().cuda_stream)

            ours()
            ref = torch.nn.functional.group_norm(x.float(), G, w.float(), b.float(), 1e-5)
            err = (y.float() - ref).abs().max().item()
            t_ours = _time(ours, torch, args.iters)
            t_torch = _time(lambda: torch.nn.functional.group_norm(x, G, w, b, 1e-5), torch,
                            args.iters)
            t_copy = _time(lambda: y.copy_(x), torch, args.iters)
            nbytes = 2 * x.numel() * x.element_size()
            row = dict(shape=label, dtype=str(dtype).split(".")[-1], gnnumba_s=t_ours,
                       torch_s=t_torch, copy_s=t_copy, gbps=nbytes / t_ours / 1e9,
                       frac_of_copy=t_copy / t_ours, vs_torch=t_torch / t_ours, max_err=err)
            rows.append(row)
            print(f"{label:28s} {row['dtype']:7s} {t_ours * 1e6:8.1f}us {t_torch * 1e6:8.1f}us "
                  f"{t_copy * 1e6:8.1f}us {row['gbps']:7.0f} {row['frac_of_copy']:7.0%} "
                  f"{row['vs_torch']:7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
