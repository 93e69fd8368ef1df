"""Which Numba threading layer the CPU kernels use, and where they may use threads at all.

Two hazards decide it:

* Concurrent calls. Numba's fallback "workqueue" layer aborts the whole process when two
  Python threads enter parallel kernels at once (a torch DataLoader thread and the main
  thread, a web server's request threads). "threadsafe" picks TBB if installed, else OpenMP;
  both are safe under concurrent calls. A user's explicit choice (NUMBA_THREADING_LAYER or
  numba.config.THREADING_LAYER) is left alone.
* fork(). GNU OpenMP is not fork-safe: a child forked after the parent used it either hangs
  in its first parallel region or is terminated ("fork() called from a process already using
  GNU OpenMP"). The parent need not have used gnnumba for this: torch's CPU ops and Numba's
  "omp" layer share the system libgomp, so one OpenMP matmul in the parent was enough to hang
  a DataLoader worker in gnnumba's first parallel kernel. Nothing reliable tells whether some
  library in the parent started an OpenMP pool, so a forked child never enters a parallel
  region: every kernel has a serial twin that gives the same bits (``gnnumba.cpu`` decides
  with ``parallel_allowed``). That is also what torch does in DataLoader workers (one thread
  each); the parallelism there is the workers.

The "forksafe" layer is no way out: without TBB it is "workqueue", which fails the first
hazard, and TBB is an optional extra we do not require.
"""

import os

import numba

if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "threadsafe"

# Cleared in every child forked after gnnumba was imported (a child that imports gnnumba
# only after the fork cannot be told from a fresh process; import it before forking).
_PARALLEL_ALLOWED = True


def _after_fork_in_child():
    global _PARALLEL_ALLOWED
    _PARALLEL_ALLOWED = False


os.register_at_fork(after_in_child=_after_fork_in_child)


def parallel_allowed() -> bool:
    """False in a process forked after gnnumba was imported (see the module docstring)."""
    return _PARALLEL_ALLOWED
