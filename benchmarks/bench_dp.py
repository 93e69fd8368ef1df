"""Per-sample GroupNorm gradients: ``dp.per_sample_grads`` (gnnumba's kernels) versus Opacus'
built-in ``nn.GroupNorm`` sampler (``F.group_norm`` + ``einsum``), at the reference DP shape.

Under pytest (``--benchmark-disable`` in addopts) each contender runs once as a smoke test
and is checked against the float64 reference; ``pytest benchmarks/bench_dp.py
--benchmark-enable`` times both in one group, with a "vs Opacus" ratio line after the table.
``python benchmarks/bench_dp.py [--budget SECONDS]`` gives interleaved, noise-checked medians
(it is ``gnnumba bench`` on this one problem). The callables are the ``dp`` and ``opacus``
peers of ``gnnumba.peers``: one table for tests, benchmarks and the CLI.
"""

from __future__ import annotations

import argparse
import sys

import pytest

from gnnumba import bench
from gnnumba import peers as P

PROBLEM = P.Problem((64, 64, 32, 32), 32, mode="per_sample_grads", label="DP reference")
CONTENDERS = ("dp", "opacus")


@pytest.mark.parametrize("name", CONTENDERS)
def test_per_sample_grads(benchmark, name):
    peer = P.peer(name)
    why = peer.unavailable_reason()
    if why:
        pytest.skip(why)
    a = PROBLEM.arrays()
    pr = peer.prepare(PROBLEM, a)
    pr.run()  # compile / load the Numba cache outside the timed region
    benchmark.group = f"per-sample grads: {PROBLEM.label} {PROBLEM.id}"
    benchmark.extra_info.update(peer=name, bytes_moved=PROBLEM.bytes_moved,
                                label=PROBLEM.label)
    got = pr.outputs(benchmark(pr.run))
    err = P.max_error(got, P.reference_outputs(PROBLEM, a))
    assert err <= P.tolerance(PROBLEM), f"{name}: scaled error {err:.3e}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed rounds")
    args = ap.parse_args(argv)
    bench.run([PROBLEM], bench.Settings(budget_s=args.budget), peer_names=list(CONTENDERS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
