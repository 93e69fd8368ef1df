"""The ``gnnumba`` command: ``gnnumba bench``, ``gnnumba check`` and ``gnnumba warmup``.

Also runnable as ``python -m gnnumba``. ``main(argv)`` returns the exit status, so tests
call it directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from . import peers as P
from .activations import NAMES as ACTIVATIONS


def _csv(allowed, what):
    """argparse type: a comma-separated subset of ``allowed``, with a helpful error."""
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad)) or '(empty)'}; "
                f"choose from: {', '.join(allowed)} (comma-separated)")
        return items
    return parse


def _positive(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return v


def _parser() -> argparse.ArgumentParser:
    from . import __version__, bench
    from . import warmup as W

    ap = argparse.ArgumentParser(
        prog="gnnumba",
        description="GroupNorm as Numba kernels: benchmarks, self-test and kernel warm-up.")
    ap.add_argument("--version", action="version", version=f"gnnumba {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{bench,check,warmup}")

    b = sub.add_parser(
        "bench", help="time gnnumba against torch's native GroupNorm and the other peers",
        description="Interleaved, repeated timing of every available peer (see gnnumba.peers) "
                    "with a same-size memory copy as the bandwidth roofline. Medians are "
                    "reported; the ratio column is torch's time over the contender's "
                    "(> 1 = faster than torch).")
    b.add_argument("--quick", action="store_true",
                   help="a few representative problems (tiny, model shapes, DRAM-sized) with "
                        "a short budget, under a minute; --shapes/--modes/--layouts narrow "
                        "or replace that selection")
    b.add_argument("--device", choices=P.DEVICES, default="cpu")
    b.add_argument("--dtype", choices=P.DTYPES, default="float32",
                   help="bfloat16/float16 run the torch-based peers only on the CPU")
    b.add_argument("--shapes", type=_csv(tuple(P.SHAPE_SETS), "shape set"),
                   help="shape sets to run (default: " + ",".join(bench.DEFAULT_SHAPE_SETS)
                        + "; 'models' = SD-UNet b2, ResNet-50-GN b8 stages, video blocks); "
                        "with --quick, these sets replace the quick selection")
    b.add_argument("--modes", type=_csv(P.MODES, "mode"),
                   help="default: " + ",".join(DEFAULT_MODES) + " (per_sample_grads: dp vs "
                        "Opacus); with --quick, keeps only these modes")
    b.add_argument("--layouts", type=_csv(("nchw", "channels_last"), "layout"),
                   help="default: nchw,channels_last; with --quick, keeps only these layouts")
    b.add_argument("--activation", choices=[a or "none" for a in ACTIVATIONS], default="none",
                   help="fused activation after the normalisation (torch: F.<name> after "
                        "F.group_norm)")
    b.add_argument("--peers", type=_csv(tuple(pe.name for pe in P.PEERS), "peer"),
                   help="contenders to run (default: every available one; the copy always runs)")
    b.add_argument("--budget", type=_positive, metavar="SECONDS",
                   help=f"timed rounds per problem last about this long (default "
                        f"{bench.Settings().budget_s:g}, {bench.QUICK.budget_s:g} with --quick); "
                        f"at least {bench.Settings().min_reps} rounds always run, and a noisy "
                        f"problem is measured once more")
    b.add_argument("--json", metavar="PATH", help="write machine-readable results here")
    b.add_argument("--plot", metavar="PATH",
                   help="write a PNG (speedup per problem, bandwidth with copy roofline)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser(
        "check", help="self-test every available backend against the float64 reference",
        description="Runs the CPU kernels, the torch bridge, the dp add-on and the CUDA "
                    "kernels (on a GPU, else in Numba's CUDA simulator) against "
                    "gnnumba.reference; exit status 1 on any failure.")
    c.add_argument("--backends", type=_csv(("cpu", "torch", "dp", "cuda"), "backend"),
                   default=["cpu", "torch", "dp", "cuda"])
    c.add_argument("--cuda-timeout", type=_positive, default=900.0, metavar="SECONDS",
                   help="time limit of the CUDA self-test subprocess (the simulator is slow)")
    c.add_argument("-v", "--verbose", action="store_true", help="one line per case")

    w = sub.add_parser(
        "warmup", help="compile (or load from Numba's cache) every CPU kernel now",
        description=W.__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("--dtypes", type=_csv(W.DTYPES + W.HALF_DTYPES, "dtype"),
                   default=list(W.DTYPES),
                   help="default: float32,float64 (bfloat16/float16 warm the torch bridge)")
    w.add_argument("--layouts", type=_csv(W.LAYOUTS, "layout"), default=list(W.LAYOUTS))
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


DEFAULT_MODES = ("forward", "forward+backward", "per_sample_grads")


def _bench(args, ap) -> int:
    from . import bench

    if args.device == "cuda":
        try:
            from numba import cuda

            ok = cuda.is_available()
        except Exception:  # numba-cuda missing or broken
            ok = False
        if not ok:
            ap.error("--device cuda: no CUDA GPU is usable here (numba.cuda.is_available() is "
                     "False); run on a machine with a GPU and `pip install gnnumba[cuda]`, or "
                     "use --device cpu")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--plot needs matplotlib: pip install 'gnnumba[plot]'")
    activation = None if args.activation == "none" else args.activation
    if args.quick and not args.shapes:
        problems = bench.quick_problems(args.dtype, args.device, args.modes, args.layouts)
        if not problems:
            ap.error("--quick with these --modes/--layouts selects no problem; the quick set "
                     "has forward and forward+backward in nchw and channels_last")
        if activation:
            problems = [dataclasses.replace(p, activation=activation) for p in problems]
    else:
        problems = bench.full_problems(args.shapes or bench.DEFAULT_SHAPE_SETS,
                                       args.modes or DEFAULT_MODES,
                                       args.layouts or ["nchw", "channels_last"], args.dtype,
                                       args.device, activation)
    settings = bench.QUICK if args.quick else bench.Settings()
    if args.budget:
        settings = dataclasses.replace(settings, budget_s=args.budget)
    runnable = [p for p in problems if P.available_peers(p, args.peers)]
    if not runnable:
        ap.error(f"no available peer runs {args.dtype} on {args.device} for these problems "
                 f"(bfloat16/float16 need torch on the CPU); try --dtype float32")
    report = bench.run(runnable, settings, peer_names=args.peers,
                       progress=not args.no_progress, device=args.device)
    if args.json:
        bench.write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        bench.plot(report["results"], args.plot, report["machine_line"])
        print(f"wrote {args.plot}")
    return 0


def _warmup(args) -> int:
    from . import warmup as W

    t0 = time.perf_counter()
    done = W.precompile(args.dtypes, args.layouts, progress=not args.no_progress)
    print(f"{len(done)} kernel sets compiled or loaded in {time.perf_counter() - t0:.1f} s; "
          f"Numba's cache: {', '.join(W.cache_dirs()) or '(none: caching is off)'}")
    return 0


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.command == "bench":
        return _bench(args, ap)
    if args.command == "warmup":
        return _warmup(args)
    from . import check

    return check.run(args.backends, verbose=args.verbose, cuda_timeout=args.cuda_timeout)


if __name__ == "__main__":
    sys.exit(main())
