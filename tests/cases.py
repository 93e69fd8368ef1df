"""The test suite's view of the one case table, ``gnnumba.cases``: pytest params and asserts.

Nothing here defines a case: shapes, tolerances and value distributions live in
``gnnumba/cases.py`` (shared with ``gnnumba check``, the CUDA self-test and the benchmarks).
"""

import numpy as np
import pytest

from gnnumba import cases
from gnnumba.cases import Case, lay_out, scaled_error  # noqa: F401  (re-exported)

# (shape, num_groups, label), as the tests take them
SHAPES = [(c.shape, c.groups, c.label) for c in cases.SHAPES]
SHAPE_PARAMS = [pytest.param(c.shape, c.groups, id=c.label) for c in cases.SHAPES]

make_layout = lay_out

# per-dtype tolerances against the float64 reference, keyed by NumPy type: (y, grad)
TOL = {np.float32: cases.TOLERANCE["float32"], np.float64: cases.TOLERANCE["float64"]}


def random_inputs(shape, dtype=np.float32, seed=0, offset=0.0):
    """(x, weight, bias, dy) in ``dtype``: x standard normal plus ``offset``."""
    x, w, b, dy = cases.inputs(shape, np.float64, seed)
    return (offset + x).astype(dtype), w.astype(dtype), b.astype(dtype), dy.astype(dtype)


def assert_close(actual, expected, tol, what=""):
    """Scaled error (``cases.scaled_error``) at most ``tol``; shapes must match."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = scaled_error(actual, expected)
    assert err <= tol, f"{what}: scaled error {err:.3g} > {tol:.3g}"
