"""pytest-benchmark suite: every peer of ``gnnumba.peers`` on the named shape sets.

The callables are the ones ``tests/test_peers.py`` checks against the reference, so what is
timed here is known to compute the same thing.

* CI (``--benchmark-disable`` is in the project's addopts): each benchmark runs once as a
  smoke test, on the ``tiny`` and ``small`` shapes only, in a few seconds.
* Real runs::

      GNNUMBA_BENCH_FULL=1 pytest benchmarks --benchmark-enable --benchmark-group-by=group \
          --benchmark-save=NAME          # later: --benchmark-compare

  Benchmarks are grouped per problem (shape, mode, layout, dtype), and a "vs torch" ratio
  line per group follows the tables (``benchmarks/conftest.py``).
  ``GNNUMBA_BENCH_SETS=sd-unet,dram`` picks shape sets, ``GNNUMBA_BENCH_DEVICE=cuda`` runs
  on the GPU. For interleaved, noise-robust numbers use ``gnnumba bench`` instead.
"""

import os

import pytest

from gnnumba import peers as P

FULL = os.environ.get("GNNUMBA_BENCH_FULL", "") not in ("", "0")
_default_sets = [s for s in P.SHAPE_SETS if s != "small"] if FULL else ["tiny", "small"]
SETS = [s for s in os.environ.get("GNNUMBA_BENCH_SETS", ",".join(_default_sets)).split(",") if s]
DEVICE = os.environ.get("GNNUMBA_BENCH_DEVICE", "cpu")
DTYPES = ("float32", "bfloat16")  # bfloat16 runs the torch-based peers only


def _problems():
    for name in SETS:
        for case in P.SHAPE_SETS[name]:
            for dtype in DTYPES:
                for mode in ("forward", "backward", "forward+backward"):
                    for layout in ("nchw", "channels_last"):
                        yield P.Problem.from_case(case, mode=mode, layout=layout, dtype=dtype,
                                                  device=DEVICE)
            yield P.Problem.from_case(case, mode="per_sample_grads", device=DEVICE)


PAIRS = [(p, pe) for p in _problems() for pe in P.PEERS if pe.supports(p)]


@pytest.mark.parametrize("problem,peer", PAIRS, ids=[f"{p.id}-{pe.name}" for p, pe in PAIRS])
def test_groupnorm(benchmark, problem, peer):
    why = peer.unavailable_reason()
    if why:
        pytest.skip(why)
    if peer not in P.available_peers(problem):
        pytest.skip(f"{peer.name} does not run {problem.id}")
    pr = peer.prepare(problem, problem.arrays())
    run, sync = pr.run, pr.sync
    run()  # compile / load the Numba cache outside the timed region
    sync()
    benchmark.group = f"{problem.label} {problem.id}"
    benchmark.extra_info.update(peer=peer.name, bytes_moved=problem.bytes_moved,
                                label=problem.label)

    def call():
        out = run()
        sync()  # count queued GPU work in the time (a no-op on the CPU)
        return out

    benchmark(call)
