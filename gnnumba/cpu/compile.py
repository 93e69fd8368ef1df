"""How the CPU kernels are compiled: one decorator, so every kernel gets the same options.

* ``cache``: compiled kernels are kept in Numba's on-disk cache when there is a writable
  place for it (next to the sources, or NUMBA_CACHE_DIR / the user's cache directory). A
  read-only install with no home directory has none, and ``cache=True`` would then make
  ``import gnnumba`` fail; the kernels are compiled in memory instead.
* ``error_model="numpy"``: division by zero gives inf/NaN as in NumPy and torch (eps = 0 with
  a constant group), never ZeroDivisionError, and integer divisions need no zero check.
* No fast-math: strict IEEE arithmetic, so a result depends only on the source (see
  ``stats``). Helpers are ``njit(inline="always")``: every kernel is one self-contained
  compiled unit (a call into a separately compiled helper went through a symbol that a
  kernel loaded from the cache could bind to other code).
"""

from numba import njit


def _probe():
    pass


def _cache_available() -> bool:
    try:
        njit(cache=True)(_probe)  # the cache locator is looked for here, in this directory
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return False
    return True


CACHE = _cache_available()


def kernel(parallel=False):
    """Decorator for a kernel called from the host."""
    return njit(parallel=parallel, cache=CACHE, error_model="numpy")
