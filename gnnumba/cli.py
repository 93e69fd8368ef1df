"""The ``gnnumba`` command: ``gnnumba bench`` and ``gnnumba check``.

Also runnable as ``python -m gnnumba.cli``. ``main(argv)`` returns the exit status, so tests
call it directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from . import peers as P


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
    ap = argparse.ArgumentParser(
        prog="gnnumba", description="GroupNorm as Numba kernels: benchmarks and self-test.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{bench,check}")

    b = sub.add_parser(
        "bench", help="time gnnumba against torch's native GroupNorm and the other peers",
        description="Interleaved, repeated timing of every available peer (see gnnumba.peers) "
                    "with a same-size memory copy as the bandwidth roofline. Medians are "
                    "reported; the ratio column is torch's time over the contender's "
                    "(> 1 = faster than torch).")
    b.add_argument("--quick", action="store_true",
                   help="a few representative problems, short budget (under a minute)")
    b.add_argument("--device", choices=P.DEVICES, default="cpu")
    b.add_argument("--dtype", choices=P.DTYPES, default="float32",
                   help="bfloat16/float16 run the torch-based peers only on the CPU")
    b.add_argument("--shapes", type=_csv(tuple(P.SHAPE_SETS), "shape set"),
                   help="shape sets to run (default: all but 'small'); ignored with --quick")
    b.add_argument("--modes", type=_csv(P.MODES, "mode"),
                   default=["forward", "forward+backward", "per_sample_grads"],
                   help="default: forward,forward+backward,per_sample_grads (the last: dp vs "
                        "Opacus); ignored with --quick")
    b.add_argument("--layouts", type=_csv(("nchw", "channels_last"), "layout"),
                   default=["nchw", "channels_last"], help="ignored with --quick")
    b.add_argument("--activation", choices=("none", "silu"), default="none")
    b.add_argument("--peers", type=_csv(tuple(pe.name for pe in P.PEERS), "peer"),
                   help="contenders to run (default: every available one; the copy always runs)")
    b.add_argument("--budget", type=_positive, metavar="SECONDS",
                   help="timed rounds per problem last about this long "
                        "(default 1, 0.5 with --quick); a floor of a few rounds always runs")
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
    return ap


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
    if args.quick:
        problems = bench.quick_problems(args.dtype, args.device)
        if activation:
            problems = [dataclasses.replace(p, activation=activation) for p in problems]
        settings = bench.QUICK
    else:
        shapes = args.shapes or [s for s in P.SHAPE_SETS if s != "small"]
        problems = bench.full_problems(shapes, args.modes, args.layouts, args.dtype,
                                       args.device, activation)
        settings = bench.Settings()
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


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.command == "bench":
        return _bench(args, ap)
    from . import check

    return check.run(args.backends, verbose=args.verbose, cuda_timeout=args.cuda_timeout)


if __name__ == "__main__":
    sys.exit(main())
