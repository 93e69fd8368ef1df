"""pytest-benchmark suite: every peer of ``gnnumba.peers`` on the named shape sets.

The callables are the ones ``tests/test_peers.py`` checks against the reference, so what is
timed here is known to compute the same thing.

* CI (``--benchmark-disable`` is in the project's addopts): each benchmark runs once as a
  smoke test, on the ``tiny`` and ``small`` shapes only, in a few seconds.
* Real runs::

      GNNUMBA_BENCH_FULL=1 pytest benchmarks --benchmark-enable --benchmark-group-by=group \
          --benchmark-save=NAME          # later: --benchmark-compare

  Every benchmark of one problem (shape set, shape, mode, layout, dtype) is in one group,
  torch's native GroupNorm among them, and a "vs torch" ratio line per group follows the
  tables (``benchmarks/conftest.py``). Test ids start with the shape set's name, so
  ``-k models`` or ``-k "tiny and forward"`` select by it.

Environment variables:

* ``GNNUMBA_BENCH_FULL=1``: every shape set of ``gnnumba bench``'s default run
  (tiny, models, dram) instead of the CI smoke sets (tiny, small);
* ``GNNUMBA_BENCH_SETS=models,dram``: exactly these shape sets (names: ``gnnumba.peers
  .SHAPE_SETS``: tiny, small, resnet50-b2, resnet50-b32, sd-unet, video, models, dram);
* ``GNNUMBA_BENCH_DEVICE=cuda``: run on the GPU.

For interleaved, noise-checked numbers use ``gnnumba bench`` instead.
"""

import os

import pytest

from gnnumba import bench
from gnnumba import peers as P

FULL = os.environ.get("GNNUMBA_BENCH_FULL", "") not in ("", "0")
_default_sets = list(bench.DEFAULT_SHAPE_SETS) if FULL else ["tiny", "small"]
SETS = [s for s in os.environ.get("GNNUMBA_BENCH_SETS", ",".join(_default_sets)).split(",") if s]
_unknown = [s for s in SETS if s not in P.SHAPE_SETS]
if _unknown:
    raise ValueError(f"GNNUMBA_BENCH_SETS names unknown shape set(s) {_unknown}; choose from "
                     f"{', '.join(P.SHAPE_SETS)}")
DEVICE = os.environ.get("GNNUMBA_BENCH_DEVICE", "cpu")
DTYPES = ("float32", "bfloat16")  # bfloat16 runs the torch-based peers only


def _problems():
    for name in SETS:
        for case in P.SHAPE_SETS[name]:
            for dtype in DTYPES:
                for mode in ("forward", "backward", "forward+backward"):
                    for layout in ("nchw", "channels_last"):
                        yield name, P.Problem.from_case(case, mode=mode, layout=layout,
                                                        dtype=dtype, device=DEVICE)
            yield name, P.Problem.from_case(case, mode="per_sample_grads", device=DEVICE)


# Only problems that a baseline (torch, or Opacus for per-sample gradients) times too: a
# group without its baseline would be a table of numbers with nothing to compare them to.
PAIRS = [(s, p, pe) for s, p in _problems()
         if any(P.peer(b).supports(p) for b in P.BASELINES)
         for pe in P.PEERS if pe.supports(p)]


@pytest.mark.parametrize("shape_set,problem,peer", PAIRS,
                         ids=[f"{s}-{p.id}-{pe.name}" for s, p, pe in PAIRS])
def test_groupnorm(benchmark, shape_set, problem, peer):
    why = peer.unavailable_reason()
    if why:
        pytest.skip(why)
    if peer not in P.available_peers(problem):
        pytest.skip(f"{peer.name} does not run {problem.id}")
    pr = peer.prepare(problem, problem.arrays())
    run, sync = pr.run, pr.sync
    run()  # compile / load the Numba cache outside the timed region
    sync()
    benchmark.group = f"{shape_set}: {problem.label} {problem.id}"
    benchmark.extra_info.update(peer=peer.name, bytes_moved=problem.bytes_moved,
                                label=problem.label)

    def call():
        out = run()
        sync()  # count queued GPU work in the time (a no-op on the CPU)
        return out

    benchmark(call)
