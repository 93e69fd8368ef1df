"""Bit-identical results whatever the state of Numba's on-disk cache and the thread count."""

import os
import subprocess
import sys
import textwrap

# Runs every kernel family once (small shapes forced onto the parallel paths too) and prints
# a hash of all outputs, then the cache misses and hits of the kernels it ran.
_SCRIPT = textwrap.dedent("""
    import hashlib, numpy as np
    from gnnumba import config, cpu
    config.CPU_CHUNK, config.CPU_CL_BLOCK = 64, 256
    rng = np.random.default_rng(0)
    h = hashlib.sha1()
    for dtype in (np.float32, np.float64):
        x = (3 + rng.standard_normal((2, 16, 300))).astype(dtype)
        w = (1 + rng.standard_normal(16)).astype(dtype)
        b = rng.standard_normal(16).astype(dtype)
        for cl, paths in ((False, ("serial", "fused", "split")), (True, (None,))):
            x3 = np.ascontiguousarray(x.transpose(0, 2, 1)) if cl else x
            for path in paths:
                for act in (0, 1):
                    y3, dx3 = np.empty_like(x3), np.empty_like(x3)
                    m, r = cpu.forward(x3, 4, w, b, 1e-5, act, y3, cl, path)
                    g = cpu.backward(x3, x3, m, r, w, b, act, dx3, cl, path)
                    for a in (y3, m, r, dx3, *g):
                        h.update(a.tobytes())
    used = [k for k in (*cpu._FWD.values(), *cpu._BWD.values(), *cpu._CL_FWD.values(),
                        *cpu._CL_BWD.values()) if k.signatures]
    print(h.hexdigest(), sum(sum(k.stats.cache_misses.values()) for k in used),
          sum(sum(k.stats.cache_hits.values()) for k in used))
""")


def test_fresh_compile_and_cache_load_give_the_same_bits(tmp_path):
    """The first process compiles into an empty cache directory, the second loads from it:
    their outputs must agree bit for bit. (Separately compiled fast-math helpers broke this:
    a cached kernel called a helper through a symbol that, in another process, named other
    code. Every helper is now inlined and the arithmetic is strict IEEE.)"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                              timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        digest, misses, hits = proc.stdout.split()
        runs.append((digest, int(misses), int(hits)))
    (first, misses1, _), (second, misses2, hits2) = runs
    assert misses1 > 0, "the first process should have compiled"
    assert misses2 == 0 and hits2 > 0, "the second process should have loaded from the cache"
    assert first == second


_THREADS_SCRIPT = textwrap.dedent("""
    import hashlib, numba, numpy as np, gnnumba
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16, 30, 30)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = (1 + rng.standard_normal(16)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    xc = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    for threads in (1, 2):
        numba.set_num_threads(threads)
        h = hashlib.sha1()
        for xl in (x, xc):
            for act in (None, "gelu"):
                y, m, r = gnnumba.group_norm_forward(xl, 4, w, b, activation=act)
                g = gnnumba.group_norm_backward(dy, xl, m, r, 4, w, b, activation=act)
                for a in (y, m, r, *g):
                    h.update(np.ascontiguousarray(a).tobytes())
        print(threads, h.hexdigest())
""")


def test_result_independent_of_thread_count():
    """Every blocking is a constant and partials merge in a fixed order, so 1 and 2 threads
    give the same bits. Run with NUMBA_NUM_THREADS=2 so that two threads exist even on a
    one-core machine (else the comparison would be of a value with itself)."""
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (t1, h1), (t2, h2) = (line.split() for line in proc.stdout.split("\n")[:2])
    assert (t1, t2) == ("1", "2")
    assert h1 == h2


def test_import_without_any_cache_location_compiles_in_memory():
    """A read-only install with no home directory has no place for Numba's cache; import
    gnnumba used to raise "cannot cache function ...: no locator available". Simulated by
    removing every cache locator before the import."""
    script = textwrap.dedent("""
        from numba.core import caching
        caching.CacheImpl._locator_classes = []
        import numpy as np, gnnumba
        from gnnumba.cpu import compile
        y = gnnumba.group_norm(np.ones((2, 4, 3), np.float32), 2)
        print(compile.CACHE, float(y.sum()))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "0.0"]
