"""Compile (or load from Numba's on-disk cache) every CPU kernel before the first real call.

Numba compiles each kernel the first time it meets a new combination of dtype and memory
layout: 1-4 s each, about 16-20 s for everything on a cold cache. The machine code is then
written to Numba's cache, so later processes only load it (milliseconds). ``gnnumba warmup``
(or ``gnnumba.precompile()``) pays that cost up front, with a progress bar: run it once
after installing, or in a container image's build step, so that no training run or request
stalls on a first call.

Where the cache lives (Numba's rules): ``$NUMBA_CACHE_DIR`` when set; otherwise a
``__pycache__`` folder beside gnnumba's own modules when that is writable; otherwise a
per-user folder (``~/.cache/numba`` on Linux). For a read-only install or a container, set
``NUMBA_CACHE_DIR`` to a writable path both when warming up and when running. Entries are
keyed by the source file (path and modification time) and the CPU model, so a cache built
into an image is reused on machines with the same CPU and silently rebuilt elsewhere.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass

import numpy as np

DTYPES = ("float32", "float64")
HALF_DTYPES = ("bfloat16", "float16")  # through the torch bridge only
LAYOUTS = ("nchw", "channels_last")
# Below config.CPU_SERIAL_MAX_ELEMENTS the kernels run serially, above it in parallel:
# one shape on each side compiles both families.
SHAPES = {"serial": (2, 8, 4, 4), "parallel": (2, 64, 32, 32)}


@dataclass(frozen=True)
class Job:
    dtype: str
    layout: str
    size: str
    activation: str | None

    def __str__(self):
        return f"{self.dtype} {self.layout} {self.size} {self.activation or 'no activation'}"


def jobs(dtypes=DTYPES, layouts=LAYOUTS, activations=None) -> list[Job]:
    """Every combination to warm, in a stable order."""
    from . import activations as A

    acts = list(A.CODES) if activations is None else list(activations)
    return [Job(d, lay, size, act)
            for d, lay, size, act in itertools.product(dtypes, layouts, SHAPES, acts)]


def _laid_out(a, layout):
    if layout == "nchw":
        return np.ascontiguousarray(a)
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def run_job(job: Job) -> None:
    """Forward, backward and per-sample gradients of one combination, on small inputs."""
    import gnnumba

    shape = SHAPES[job.size]
    rng = np.random.default_rng(0)
    if job.dtype in HALF_DTYPES:
        _run_torch_half(job, shape, rng)
        return
    x = _laid_out(rng.standard_normal(shape).astype(job.dtype), job.layout)
    dy = _laid_out(rng.standard_normal(shape).astype(job.dtype), job.layout)
    w = np.ones(shape[1], job.dtype)
    b = np.zeros(shape[1], job.dtype)
    G = 4
    _, mean, rstd = gnnumba.group_norm_forward(x, G, w, b, activation=job.activation)
    gnnumba.group_norm_backward(dy, x, mean, rstd, G, w, b, activation=job.activation)
    psg = getattr(gnnumba, "per_sample_param_grads", None)
    if psg is not None:
        psg(dy, x, mean, rstd, G, w, b, activation=job.activation)


def _run_torch_half(job, shape, rng):
    import torch

    import gnnumba.torch as gt

    x = torch.from_numpy(rng.standard_normal(shape)).to(getattr(torch, job.dtype))
    if job.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = gt.group_norm(x, 4, activation=job.activation)
    y.backward(torch.ones_like(y))


def cache_dirs() -> list[str]:
    """Where Numba writes gnnumba's compiled kernels (one entry per distinct folder)."""
    import importlib

    import numba

    if numba.config.CACHE_DIR:
        return [numba.config.CACHE_DIR]
    for name in ("gnnumba.cpu",):  # importing it loads the kernel modules
        importlib.import_module(name)
    paths = []
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] != "gnnumba" or mod is None:
            continue
        for v in vars(mod).values():
            path = getattr(getattr(v, "_cache", None), "_cache_path", None)
            if path and path not in paths:
                paths.append(path)
    return sorted(paths)


def precompile(dtypes=DTYPES, layouts=LAYOUTS, activations=None, *, progress=True,
               file=None) -> list[Job]:
    """Compile or cache-load the CPU kernels for these dtypes, layouts and activations
    (default: float32 and float64, both layouts, every activation; ``"bfloat16"`` and
    ``"float16"`` go through ``gnnumba.torch`` and need torch). Returns the jobs run.

    Raises ``ValueError`` for an unknown dtype or layout (the message lists the known ones)."""
    from tqdm import tqdm

    from . import activations as A

    for what, given, known in (("dtype", dtypes, DTYPES + HALF_DTYPES),
                               ("layout", layouts, LAYOUTS),
                               ("activation", activations or (), tuple(A.CODES))):
        bad = [g for g in given if g not in known]
        if bad:
            raise ValueError(f"unknown {what} {bad[0]!r}; choose from "
                             f"{', '.join(map(str, known))}")
    todo = jobs(dtypes, layouts, activations)
    bar = tqdm(todo, unit="kernel set", disable=None if progress else True,
               file=file or sys.stderr, dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(str(job))
        run_job(job)
    return todo
