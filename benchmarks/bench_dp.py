"""Per-sample GroupNorm gradients: ``dp.per_sample_grads`` (Numba kernel) versus Opacus's
built-in ``nn.GroupNorm`` sampler (``F.group_norm`` + ``einsum``).

Under pytest (``--benchmark-disable`` in addopts) each case runs once as a smoke test and is
checked against the other; ``pytest benchmarks/bench_dp.py --benchmark-enable`` times them.
``python benchmarks/bench_dp.py [--repeats N]`` prints interleaved medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

import dp  # noqa: E402
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample  # noqa: E402

SHAPE, GROUPS = (64, 64, 32, 32), 32  # the reference shape, float32


def make_inputs(shape=SHAPE, groups=GROUPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    dy = torch.randn(shape, generator=g)
    layer = torch.nn.GroupNorm(groups, shape[1])
    return x, dy, layer


# one table: the same callables are checked and timed
CASES = {
    "gnnumba": lambda x, dy, layer: dp.per_sample_grads(x, dy, layer.num_groups, layer.eps),
    "opacus": lambda x, dy, layer: tuple(
        compute_group_norm_grad_sample(layer, [x], dy)[p] for p in (layer.weight, layer.bias)),
}


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


@pytest.mark.parametrize("impl", list(CASES))
def test_per_sample_grads(benchmark, impl, inputs):
    got = benchmark(CASES[impl], *inputs)
    other = CASES["opacus" if impl == "gnnumba" else "gnnumba"](*inputs)
    for a, b in zip(got, other):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


def measure(repeats: int = 30, shape=SHAPE, groups=GROUPS) -> dict:
    """Interleaved timing (ours, theirs, ours, ...) after a warm-up; medians in ms."""
    x, dy, layer = make_inputs(shape, groups)
    times = {k: [] for k in CASES}
    for fn in CASES.values():
        fn(x, dy, layer)  # JIT compile / warm caches
    for _ in range(repeats):
        for k, fn in CASES.items():
            t = time.perf_counter()
            fn(x, dy, layer)
            times[k].append(time.perf_counter() - t)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"shape": shape, "groups": groups, "ms": med, "speedup": med["opacus"] / med["gnnumba"]}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    import numba

    r = measure(args.repeats)
    print(f"per-sample GroupNorm grads, x{r['shape']} float32, G={r['groups']}, "
          f"torch threads {torch.get_num_threads()}, numba threads {numba.get_num_threads()}, "
          f"{args.repeats} interleaved repeats")
    for k, v in r["ms"].items():
        print(f"  {k:<8} median {v:8.2f} ms")
    print(f"  speedup gnnumba vs Opacus built-in: {r['speedup']:.1f}x")
