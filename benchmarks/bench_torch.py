"""Per-call cost of the torch bridge against torch's native GroupNorm, at small shapes where
Python overhead dominates (issue 9's target: a tiny no_grad call takes at most 1.5x torch's time).

    python benchmarks/bench_torch.py [--reps 21] [--calls 400] [--shape 1,32,8,8]

Each repetition times ``--calls`` back-to-back calls of every case, the cases interleaved
(so load from other processes hits all of them alike); the table shows medians over the
repetitions. Cases: inference (``torch.no_grad``), a training-mode forward (parameters need
grad, so autograd records the op) and forward+backward. The big-shape throughput
comparison is the main suite's job (``gnnumba bench``, ``benchmarks/bench_groupnorm.py``).

Under pytest (``--benchmark-disable`` in the project's addopts) each case runs once as a
smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest

torch = pytest.importorskip("torch")

import gnnumba.torch as gt  # noqa: E402


def _cases(shape, groups):
    torch.manual_seed(0)
    x = torch.randn(shape)
    xg = x.clone().requires_grad_()
    native, ours = torch.nn.GroupNorm(groups, shape[1]), gt.GroupNorm(groups, shape[1])

    def infer(m):
        def f():
            with torch.no_grad():
                return m(x)
        return f

    def train_fwd(m):
        return lambda: m(x)

    def fwd_bwd(m):
        def f():
            y = m(xg)
            y.backward(torch.ones_like(y))
        return f

    return {
        "inference": (infer(native), infer(ours)),
        "train forward": (train_fwd(native), train_fwd(ours)),
        "forward+backward": (fwd_bwd(native), fwd_bwd(ours)),
    }


def measure(shape=(1, 32, 8, 8), groups=8, reps=21, calls=400):
    """{case: (native_us, gnnumba_us)} medians of interleaved repetitions."""
    cases = _cases(shape, groups)
    fns = [(case, who, f) for case, pair in cases.items() for who, f in enumerate(pair)]
    for _, _, f in fns:  # warm up: compile/caches, allocator
        for _ in range(50):
            f()
    samples = {(case, who): [] for case, who, _ in fns}
    for _ in range(reps):
        for case, who, f in fns:
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            samples[case, who].append((time.perf_counter() - t0) / calls * 1e6)
    return {case: (statistics.median(samples[case, 0]), statistics.median(samples[case, 1]))
            for case in cases}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,32,8,8")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    res = measure(shape, args.groups, args.reps, args.calls)
    print(f"shape {shape}, G={args.groups}, torch threads {torch.get_num_threads()}, "
          f"median of {args.reps} interleaved repetitions x {args.calls} calls")
    print(f"{'case':18s} {'torch us':>9s} {'gnnumba us':>11s} {'vs torch':>8s}")
    for case, (native, ours) in res.items():  # vs torch > 1: gnnumba faster, as everywhere
        print(f"{case:18s} {native:9.2f} {ours:11.2f} {native / ours:7.2f}x")


# --------------------------------------------------------------------------- pytest

SHAPE, GROUPS = (1, 32, 8, 8), 8
CASES = ("inference", "train forward", "forward+backward")
# every gnnumba timing has its torch counterpart in the same group
WHO = {"torch": 0, "gnnumba.torch": 1}


@pytest.mark.parametrize("who", list(WHO))
@pytest.mark.parametrize("case", CASES)
def test_overhead(benchmark, case, who):
    f = _cases(SHAPE, GROUPS)[case][WHO[who]]
    f()  # compile / load the Numba cache outside the timed region
    shape = "×".join(map(str, SHAPE))
    benchmark.group = f"tiny: overhead {shape} G={GROUPS} {case}"
    benchmark.extra_info.update(peer=who, label="tiny")
    benchmark(f)


if __name__ == "__main__":
    main()
