"""Fork safety: a forked child must neither hang nor be killed, whatever the parent ran
first (torch's OpenMP ops, Numba prange code, gnnumba's own parallel kernels), for every
kernel. Each scenario runs in a subprocess with a bounded timeout."""

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")

# Runs every CPU kernel family at sizes that take the parallel paths in a normal process.
_KERNELS = textwrap.dedent("""
    import numpy as np
    from gnnumba import cpu
    def run_all():
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 64, 32, 32)).astype(np.float32)  # 131072 elements
        w = np.ones(64, np.float32); b = np.zeros(64, np.float32)
        out = []
        for cl in (False, True):
            x3 = np.ascontiguousarray(x.reshape(2, 64, -1).transpose(0, 2, 1)) if cl else \\
                x.reshape(2, 64, -1)
            y3, dx3 = np.empty_like(x3), np.empty_like(x3)
            m, r = cpu.forward(x3, 32, w, b, 1e-5, 1, y3, cl)
            g = cpu.backward(x3, x3, m, r, w, b, 1, dx3, cl)
            p = cpu.per_sample_param_grads(x3, x3, m, r, w, b, 1, cl)
            out += [y3, m, r, dx3, *g, *p]
        return out
""")


def _run(script, timeout=300):
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout.split()


def _forked_child_check(parent_setup):
    return _KERNELS + textwrap.dedent(parent_setup) + textwrap.dedent("""
        import multiprocessing as mp
        def child(q):
            q.put(all(np.array_equal(a, b) for a, b in zip(run_all(), expected)))
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        p.join(120)
        if p.exitcode is None:
            p.kill()
        print(p.exitcode, q.get(timeout=5) if p.exitcode == 0 else None)
    """)


def test_fork_after_torch_openmp_matmul():
    """The parent ran an OpenMP-parallel torch op but no gnnumba parallel kernel (it hung)."""
    script = _forked_child_check("""
        import torch
        torch.set_num_threads(2)
        a = torch.randn(512, 512)
        for _ in range(5):
            a @ a
        import gnnumba
        gnnumba.config.CPU_SERIAL_MAX_ELEMENTS = 1 << 62  # the parent stays serial here
        expected = run_all()
        gnnumba.config.CPU_SERIAL_MAX_ELEMENTS = 32768  # the child would go parallel
    """)
    assert _run(script) == ["0", "True"]


def test_fork_after_numba_prange_before_import():
    """The parent ran Numba prange code before importing gnnumba (the child was killed)."""
    script = _forked_child_check("""
        import numba, numpy as np
        @numba.njit(parallel=True)
        def f(a):
            s = 0.0
            for i in numba.prange(a.shape[0]):
                s += a[i]
            return s
        f(np.ones(100000))
        import gnnumba
        expected = run_all()
    """)
    assert _run(script) == ["0", "True"]


def test_fork_after_gnnumba_parallel_kernels():
    script = _forked_child_check("""
        expected = run_all()
    """)
    assert _run(script) == ["0", "True"]


def test_dataloader_workers_call_gnnumba_torch():
    """DataLoader(num_workers=2) workers (forked) call gnnumba.torch.group_norm after the
    parent used torch's OpenMP ops and gnnumba's parallel kernels."""
    script = textwrap.dedent("""
        import torch, gnnumba.torch as gt
        from torch.utils.data import DataLoader, Dataset
        torch.set_num_threads(2)
        a = torch.randn(512, 512)
        a @ a
        x = torch.randn(8, 64, 32, 32)
        expected = gt.group_norm(x, 32, activation="silu")  # parallel in the parent
        class DS(Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return gt.group_norm(x, 32, activation="silu")
        loader = DataLoader(DS(), batch_size=None, num_workers=2,
                            multiprocessing_context="fork", timeout=120)
        print(all(torch.equal(y, expected) for y in loader))
    """)
    assert _run(script) == ["True"]
