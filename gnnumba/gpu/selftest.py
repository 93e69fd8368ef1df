"""Self-test of the CUDA kernels against the float64 reference (``gnnumba check``).

Runs on a GPU when there is one, else in Numba's simulator (the caller starts a subprocess
with ``NUMBA_ENABLE_CUDASIM=1``; the simulator runs every thread in Python, so the shapes
are tiny and the launch configuration is lowered so they still span several blocks, tiles
and partials per group).
"""

from __future__ import annotations

import numpy as np

from .. import cases, reference
from . import config, launch

# Lowered launch configuration: 32-thread blocks, 2 items per thread and 2 tiles per flush of
# the shifted sums, groups over 64 elements take the split path, every 16 elements may get
# their own block (16 blocks per "SM", 4 "SMs" in the simulator).
SMALL_CONFIG = dict(THREADS=32, ITEMS=2, FUSED_ITEMS=2, FLUSH=2, BLOCKS_PER_SM=16,
                    MIN_BLOCK_ELEMS=16, APPLY_ITEMS=2, CL_MIN_TILE_C=4)

# the CUDA simulator cases of the one case table (each says what it exercises)
CASES = [(c.label, c.shape, c.groups, np.dtype(c.dtype).type, c.layout == "channels_last",
          c.activation) for c in cases.CUDA_SIM]


reference_forward = reference.forward  # float64, every activation of the table
reference_backward = reference.backward

TOL = {np.float16: 2e-2, np.float32: 1e-4, np.float64: 1e-10}


def _device(a, channels_last):
    if not channels_last:
        return _to_device(a)
    out = launch.empty(a.shape, a.dtype, launch.CL)
    launch.copy_into(launch.DevArray(_to_device(a), "a"), launch.DevArray(out, "out"))
    return out


def _is_bf16(dtype):
    return launch.BFLOAT16 is not None and dtype == launch.BFLOAT16 and not launch.SIMULATOR


def _to_device(a):
    """cuda.to_device, also for ml_dtypes.bfloat16, which Numba's host copies (the buffer
    protocol) cannot read: its bits travel as uint16."""
    from numba import cuda

    a = np.ascontiguousarray(a)
    if _is_bf16(a.dtype):
        return cuda.to_device(a.view(np.uint16)).view(launch.BFLOAT16)
    return cuda.to_device(a)


def to_host(d):
    """copy_to_host, also for device arrays of ml_dtypes.bfloat16 (see ``_to_device``)."""
    if _is_bf16(d.dtype):
        return d.view(np.uint16).copy_to_host().view(launch.BFLOAT16)
    return d.copy_to_host()


def check_case(shape, G, dtype, channels_last, activation, seed=0):
    """Max abs errors (forward y, mean, rstd; backward dx, dweight, dbias) against the
    float64 reference, each scaled by the output's magnitude (at least 1)."""
    from . import group_norm_backward, group_norm_forward

    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)  # offset: tests the centring
    dy = rng.standard_normal(shape).astype(dtype)
    w = (rng.standard_normal(C) + 1).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    xd = _device(x, channels_last)
    if launch.DevArray(xd, "x").layout != (launch.CL if channels_last else launch.NCHW):
        raise AssertionError("test input has the wrong layout")
    y, mean, rstd = group_norm_forward(xd, G, _device(w, False), _device(b, False), 1e-5,
                                       activation=activation)
    dx, dw, db = group_norm_backward(_device(dy, False), xd, mean, rstd, G, _device(w, False),
                                     _device(b, False), activation=activation)
    if launch.DevArray(y, "y").layout != launch.DevArray(xd, "x").layout:
        raise AssertionError("y does not keep the layout of x")
    yr, mr, rr = reference_forward(x, G, w, b, 1e-5, activation)
    dxr, dwr, dbr, _, _ = reference_backward(dy, x, G, w, b, 1e-5, activation)
    got = [y, mean, rstd, dx, dw, db]
    want = [yr, mr, rr, dxr, dwr, dbr]
    return [float(np.max(np.abs(to_host(g).astype(np.float64) - r))
                  / max(1.0, float(np.max(np.abs(r))))) for g, r in zip(got, want)]


def run():
    """``[(name, ok, max_abs_err)]`` for every case, forward and backward."""
    saved = {k: getattr(config, k) for k in SMALL_CONFIG}
    if launch.SIMULATOR:
        for k, v in SMALL_CONFIG.items():
            setattr(config, k, v)
    results = []
    try:
        for name, shape, G, dtype, cl, act in CASES:
            try:
                errs = check_case(shape, G, dtype, cl, act)
            except Exception as e:  # reported, not raised: a check lists every backend
                results.append((f"cuda {name}: {type(e).__name__}: {e}", False, float("nan")))
                continue
            tol = TOL[dtype]
            results.append((f"cuda {name} forward", max(errs[:3]) <= tol, max(errs[:3])))
            results.append((f"cuda {name} backward", max(errs[3:]) <= tol * 10, max(errs[3:])))
    finally:
        for k, v in saved.items():
            setattr(config, k, v)
    return results


if __name__ == "__main__":  # python -m gnnumba.gpu.selftest
    for name, ok, err in run():
        print(f"{'ok  ' if ok else 'FAIL'} {name:40s} {err:.2e}")
