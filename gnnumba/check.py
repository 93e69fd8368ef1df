"""``gnnumba check``: every available backend against the float64 reference.

Backends and what runs them:

* ``cpu``   — the NumPy array API (``gnnumba`` and ``gnnumba out=`` peers) on the labelled
  cases of ``gnnumba.cases`` (``CHECK``), forward and backward;
* ``torch`` — the ``gnnumba.torch`` module, the same cases plus ``CHECK_HALF``;
* ``dp``    — ``dp.per_sample_grads`` (per-sample dgamma/dbeta);
* ``cuda``  — ``gnnumba.gpu.selftest.run()`` in a subprocess: on the GPU when Numba sees
  one, else in Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, small shapes, slow).

A backend whose library is not installed is reported "unavailable", never "passed". Any
failure gives exit status 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from . import cases as C
from . import peers as P

# The cases are the package's one table (gnnumba.cases); the torch bridge also takes half
# precision (accumulated in float32).
CASES = C.CHECK
TORCH_CASES = C.CHECK + C.CHECK_HALF
DP_CASES = [c for c in C.CHECK if c.activation is None]
MODES = ("forward", "backward")


@dataclass
class Outcome:
    backend: str
    status: str  # "passed", "FAILED", "unavailable"
    detail: str
    failures: list  # lines describing each failed case
    lines: list  # one per case, for --verbose


def _problems(cases, modes):
    for c in cases:
        for mode in modes:
            yield P.Problem(c.shape, c.groups, dtype=c.dtype, layout=c.layout,
                            activation=c.activation, mode=mode, label=c.label)


def check_peers(backend: str, peer_names, cases, modes) -> Outcome:
    """Run each named peer on each case and compare with the reference."""
    reasons = [P.peer(n).unavailable_reason() for n in peer_names]
    if all(reasons):
        return Outcome(backend, "unavailable", "; ".join(reasons), [], [])
    if backend == "dp":
        import dp

        if not hasattr(dp, "per_sample_grads"):
            return Outcome(backend, "unavailable", "dp.per_sample_grads is not there yet",
                           [], [])
    failures, lines, worst, n = [], [], 0.0, 0
    for p in _problems(cases, modes):
        a = p.arrays(seed=1)
        want = P.reference_outputs(p, a)
        for pe in P.available_peers(p, peer_names):
            n += 1
            where = f"{pe.name}: {p.label} [{p.mode}, {p.dtype}, {'x'.join(map(str, p.shape))}]"
            try:
                pr = pe.prepare(p, a)
                got = pr.outputs(pr.run())
                err = P.max_error(got, want)
            except Exception as e:  # a crash is a failure, reported with its message
                failures.append(f"{where}: raised {type(e).__name__}: {e}")
                lines.append(f"  FAIL {where}: raised {type(e).__name__}")
                continue
            tol = C.TOLERANCE[p.dtype]["y" if p.mode == "forward" else "grad"]
            worst = max(worst, err / tol)
            ok = err <= tol
            lines.append(f"  {'ok  ' if ok else 'FAIL'} {where}: error {err:.1e} "
                         f"(tolerance {tol:.0e})")
            if not ok:
                failures.append(f"{where}: error {err:.2e} > tolerance {tol:.0e}")
    if n == 0:
        return Outcome(backend, "unavailable", "no case ran", [], lines)
    status = "FAILED" if failures else "passed"
    detail = (f"{n - len(failures)}/{n} checks, worst error {worst:.2f} of tolerance")
    return Outcome(backend, status, detail, failures, lines)


# --------------------------------------------------------------------------- CUDA

_MARK = "GNNUMBA-CHECK"
# Runs in a fresh interpreter so that the simulator switch (an environment variable read at
# Numba import) cannot leak into this process.
_CUDA_SCRIPT = f"""
import json, sys
try:
    from gnnumba.gpu import selftest
except ModuleNotFoundError as e:
    missing = e.name or ""
    if missing in ("gnnumba.gpu", "gnnumba.gpu.selftest") or missing.split(".")[0] in (
            "numba_cuda", "cuda", "cupy") or missing.startswith("numba.cuda"):
        print("{_MARK}-UNAVAILABLE " + str(e))
        sys.exit(0)
    raise
res = selftest.run()
print("{_MARK}-RESULT " + json.dumps([[str(n), bool(ok), float(err)] for n, ok, err in res]))
"""


def _gpu_present() -> tuple[bool, str]:
    try:
        import numba
        from numba import cuda

        if numba.config.ENABLE_CUDASIM:
            return False, "simulator (NUMBA_ENABLE_CUDASIM is set)"
        if cuda.is_available():
            dev = cuda.get_current_device()
            name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
            return True, f"GPU {name}"
    except Exception:
        pass
    return False, "simulator (no CUDA GPU found)"


def check_cuda(timeout: float) -> Outcome:
    gpu, where = _gpu_present()
    env = dict(os.environ)
    if not gpu:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _CUDA_SCRIPT], env=env, timeout=timeout,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return Outcome("cuda", "FAILED", f"{where}: self-test timed out after {timeout:.0f} s",
                       [f"timed out after {timeout:.0f} s (raise --cuda-timeout)"], [])
    return _parse_cuda(proc.returncode, proc.stdout, proc.stderr, where,
                       time.perf_counter() - t0)


def _parse_cuda(rc: int, stdout: str, stderr: str, where: str, seconds: float) -> Outcome:
    for line in stdout.splitlines():
        if line.startswith(_MARK + "-UNAVAILABLE"):
            return Outcome("cuda", "unavailable", line.split(" ", 1)[1].strip(), [], [])
    results = None
    for line in stdout.splitlines():
        if line.startswith(_MARK + "-RESULT "):
            results = json.loads(line.split(" ", 1)[1])
    if rc != 0 or results is None:
        tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
        return Outcome("cuda", "FAILED", f"{where}: self-test crashed (exit {rc}): {tail}",
                       [stderr.strip()[-2000:]], [])
    if not results:
        return Outcome("cuda", "FAILED", f"{where}: the self-test ran no case", [], [])
    failures = [f"{n}: error {e:.2e}" for n, ok, e in results if not ok]
    lines = [f"  {'ok  ' if ok else 'FAIL'} cuda: {n}: error {e:.1e}" for n, ok, e in results]
    status = "FAILED" if failures else "passed"
    return Outcome("cuda", status, f"{where}: {len(results) - len(failures)}/{len(results)} "
                   f"checks in {seconds:.0f} s", failures, lines)


# --------------------------------------------------------------------------- driver


def run(backends=("cpu", "torch", "dp", "cuda"), *, verbose=False, cuda_timeout=900.0,
        out=None) -> int:
    out = sys.stdout if out is None else out
    outcomes = []
    for b in backends:
        if b == "cpu":
            o = check_peers("cpu", ("gnnumba", "gnnumba out="), CASES, MODES)
        elif b == "torch":
            o = check_peers("torch", ("gnnumba.torch",), TORCH_CASES, MODES)
        elif b == "dp":
            o = check_peers("dp", ("dp",), DP_CASES, ("per_sample_grads",))
        else:
            o = check_cuda(cuda_timeout)
        outcomes.append(o)
        print(f"{o.backend:6s} {o.status:11s} {o.detail}", file=out, flush=True)
        if verbose:
            for line in o.lines:
                print(line, file=out)
        for f in o.failures:
            print(f"    {f}", file=out)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("passed", "FAILED", "unavailable")}
    print(f"gnnumba check: {counts['passed']} passed, {counts['FAILED']} failed, "
          f"{counts['unavailable']} unavailable", file=out)
    return 1 if counts["FAILED"] else 0
