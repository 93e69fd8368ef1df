"""The ONE table of comparable GroupNorm callables, shared by tests, benchmarks and the CLI.

As in numbagg's ``COMPARISONS``: every peer library's way of doing the same computation is
written down once, here. ``tests/test_peers.py`` checks each peer against the float64
reference, ``benchmarks/`` and ``gnnumba bench`` time exactly the same callables, and
``gnnumba check`` runs the gnnumba ones on its labelled shapes, so the three never drift.

Vocabulary:

* a :class:`Problem` is one computation: shape, groups, dtype, memory layout, activation,
  mode and device. ``Problem.arrays()`` makes its float64 inputs (deterministic);
* a :class:`Peer` is one library's way of solving it; ``peer.prepare(problem, arrays)``
  converts the inputs once (outside any timed region) and returns a :class:`Prepared`
  whose ``run()`` is the call to time and whose ``outputs(result)`` turns what ``run()``
  returned into float64 NumPy arrays in the mode's canonical order (:data:`OUTPUTS`).

Optional libraries (torch, opacus, the ``dp`` add-on, the torch bridge, numba-cuda) are
imported lazily: a peer whose library does not import is simply unavailable.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import cases as C
from .activations import NAMES as ACTIVATIONS
from .activations import TORCH_NAMES

MODES = ("forward", "backward", "forward+backward", "per_sample_grads")
LAYOUTS = ("nchw", "channels_last", "strided")
DTYPES = ("float32", "float64", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")

# What outputs() returns, per mode. Per-sample gradients are those of weight and bias, (N, C).
OUTPUTS = {
    "forward": ("y",),
    "backward": ("dx", "dweight", "dbias"),
    "forward+backward": ("y", "dx", "dweight", "dbias"),
    "per_sample_grads": ("dweight_per_sample", "dbias_per_sample"),
}

# Bytes a mode must move at least, in units of x.nbytes: forward reads x and writes y;
# backward reads x and dy and writes dx (mean/rstd/weight are negligible); forward+backward is
# both; per-sample gradients read x and dy. Achieved bandwidth = this / time.
TRAFFIC = {"forward": 2, "backward": 3, "forward+backward": 5, "per_sample_grads": 2}


# --------------------------------------------------------------------------- problems


# A named shape (label, shape, groups): what the benchmark tables and test ids show. The
# labelled cases and the shape sets live in gnnumba.cases, the one table of cases.
Case = C.Case


@dataclass(frozen=True)
class Problem:
    shape: tuple
    groups: int
    dtype: str = "float32"
    layout: str = "nchw"
    activation: str | None = None
    mode: str = "forward"
    device: str = "cpu"
    label: str = ""
    eps: float = 1e-5

    def __post_init__(self):
        # Invalid combinations are programming errors in a table, but say which and why.
        for name, value, allowed in (("mode", self.mode, MODES), ("layout", self.layout, LAYOUTS),
                                     ("dtype", self.dtype, DTYPES),
                                     ("device", self.device, DEVICES)):
            if value not in allowed:
                raise ValueError(f"Problem {name}={value!r} is not one of {allowed}")
        if self.layout == "channels_last" and len(self.shape) < 3:
            raise ValueError(f"channels_last needs a spatial dim; shape {self.shape} has none")

    @classmethod
    def from_case(cls, case: Case, **kw) -> "Problem":
        return cls(shape=tuple(case.shape), groups=case.groups, label=case.label, **kw)

    @property
    def itemsize(self) -> int:
        return {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes_moved(self) -> int:
        return TRAFFIC[self.mode] * self.numel * self.itemsize

    @property
    def id(self) -> str:
        """Short, unique, filesystem- and pytest-friendly id."""
        shape = "x".join(map(str, self.shape))
        act = f"-{self.activation}" if self.activation else ""
        return f"{self.mode}-{shape}-G{self.groups}-{self.layout}-{self.dtype}{act}-{self.device}"

    def arrays(self, seed: int = 0) -> dict:
        """float64 inputs, C-contiguous (``gnnumba.cases.inputs``): x off-centre (so a
        cancelling E[x^2]-E[x]^2 would show), dy, weight, bias. Peers cast and lay them out
        themselves."""
        x, w, b, dy = C.inputs(self.shape, "float64", seed, distribution="offset")
        return {"x": x, "dy": dy, "weight": w, "bias": b}


# A copy of C-contiguous ``a`` with the same values in another memory layout ("strided":
# every other element of a twice-as-wide buffer, a layout no fast path takes).
lay_out = C.lay_out


# --------------------------------------------------------------------------- shape sets

# tiny, small, resnet50-b2/-b32, sd-unet, video, models (SD-UNet b2, ResNet-50-GN b8 stages,
# 3-D video blocks) and dram: see gnnumba.cases
SHAPE_SETS = C.SHAPE_SETS


# --------------------------------------------------------------------------- peers


@dataclass
class Prepared:
    run: Callable[[], object]
    outputs: Callable[[object], tuple]
    # waits for queued device work; the benchmark calls it after each timed batch
    sync: Callable[[], None] = field(default=lambda: None)


@dataclass(frozen=True)
class Peer:
    name: str
    requires: tuple  # modules that must import
    modes: tuple
    devices: tuple = ("cpu",)
    dtypes: tuple = ("float32", "float64")
    layouts: tuple = LAYOUTS
    activations: tuple = ACTIVATIONS
    prepare: Callable[[Problem, dict], Prepared] = None
    note: str = ""

    def unavailable_reason(self) -> str | None:
        """None when every required module imports, else why not (for skip messages)."""
        for mod in self.requires:
            try:
                importlib.import_module(mod)
            except Exception as e:  # an optional extra may fail in many ways; report it
                return f"{self.name}: cannot import {mod} ({type(e).__name__}: {e})"
        return None

    def supports(self, p: Problem) -> bool:
        return (p.mode in self.modes and p.device in self.devices and p.dtype in self.dtypes
                and p.layout in self.layouts and p.activation in self.activations)


def _f64(a) -> np.ndarray:
    """Any peer's output (NumPy, torch, Numba device array) as a float64 NumPy array."""
    if a is None:
        return None
    if hasattr(a, "detach"):  # torch
        return a.detach().to("cpu").double().numpy()
    if hasattr(a, "copy_to_host"):  # Numba device array
        a = a.copy_to_host()
    return np.asarray(a, dtype=np.float64)


def _as_tuple(res) -> tuple:
    return tuple(_f64(a) for a in (res if isinstance(res, tuple) else (res,)))


# --- plain NumPy (what one writes without a kernel library) ---------------------------


def _np_shape(x):
    return (1, -1) + (1,) * (x.ndim - 2)


def numpy_forward(x, G, w, b, eps):
    """GroupNorm in plain NumPy, in x's dtype; two-pass variance (np.var). No fused
    activation: the peer is what one writes without a kernel library."""
    N = x.shape[0]
    xg = x.reshape(N, G, -1)
    mean = xg.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(xg.var(axis=-1, keepdims=True) + x.dtype.type(eps))
    z = ((xg - mean) * rstd).reshape(x.shape) * w.reshape(_np_shape(x)) + b.reshape(_np_shape(x))
    return z, mean[..., 0], rstd[..., 0]


def numpy_backward(dy, x, mean, rstd, G, w):
    N = x.shape[0]
    xhat = ((x.reshape(N, G, -1) - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    dz = dy
    red = (0,) + tuple(range(2, x.ndim))
    dw, db = (dz * xhat).sum(axis=red), dz.sum(axis=red)
    g = (dz * w.reshape(_np_shape(x))).reshape(N, G, -1)
    xh = xhat.reshape(N, G, -1)
    dx = rstd[..., None] * (g - g.mean(axis=-1, keepdims=True)
                            - xh * (g * xh).mean(axis=-1, keepdims=True))
    return dx.reshape(x.shape), dw, db


def _prep_numpy(p: Problem, a: dict) -> Prepared:
    dt = np.dtype(p.dtype)
    x, dy = lay_out(a["x"].astype(dt), p.layout), lay_out(a["dy"].astype(dt), p.layout)
    w, b = a["weight"].astype(dt), a["bias"].astype(dt)
    G, eps = p.groups, p.eps
    if p.mode == "forward":
        return Prepared(lambda: numpy_forward(x, G, w, b, eps)[0], _as_tuple)
    _, mean, rstd = numpy_forward(x, G, w, b, eps)
    if p.mode == "backward":
        return Prepared(lambda: numpy_backward(dy, x, mean, rstd, G, w), _as_tuple)

    def fwd_bwd():
        y, m, r = numpy_forward(x, G, w, b, eps)
        return (y,) + numpy_backward(dy, x, m, r, G, w)
    return Prepared(fwd_bwd, _as_tuple)


# --- gnnumba array API ----------------------------------------------------------------


def _cuda_sync():
    from numba import cuda

    cuda.synchronize()
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except ImportError:
        pass


def _gnnumba_inputs(p: Problem, a: dict):
    dt = np.dtype(p.dtype)
    arrs = {k: (lay_out(v.astype(dt), p.layout) if k in ("x", "dy") else v.astype(dt))
            for k, v in a.items()}
    if p.device == "cpu":
        return arrs, (lambda: None)
    from numba import cuda

    if p.layout != "nchw":
        # Numba device arrays are made from contiguous host arrays; other layouts would need
        # torch CUDA tensors, which the gnnumba.torch peer covers.
        raise ValueError("the gnnumba CUDA array peer takes NCHW only")
    return {k: cuda.to_device(v) for k, v in arrs.items()}, _cuda_sync


def _prep_gnnumba(p: Problem, a: dict, use_out: bool = False) -> Prepared:
    import gnnumba

    arr, sync = _gnnumba_inputs(p, a)
    x, dy, w, b = arr["x"], arr["dy"], arr["weight"], arr["bias"]
    G, eps, act = p.groups, p.eps, p.activation
    if p.mode == "forward":
        if use_out:
            out = (np.empty_like(x) if p.device == "cpu"
                   else _cuda_empty_like(x))
            return Prepared(lambda: gnnumba.group_norm(x, G, w, b, eps, activation=act, out=out),
                            _as_tuple, sync)
        return Prepared(lambda: gnnumba.group_norm(x, G, w, b, eps, activation=act),
                        _as_tuple, sync)
    if p.mode == "backward":
        _, mean, rstd = gnnumba.group_norm_forward(x, G, w, b, eps, activation=act)
        return Prepared(lambda: gnnumba.group_norm_backward(dy, x, mean, rstd, G, w, b,
                                                            activation=act), _as_tuple, sync)

    def fwd_bwd():
        y, mean, rstd = gnnumba.group_norm_forward(x, G, w, b, eps, activation=act)
        return (y,) + tuple(gnnumba.group_norm_backward(dy, x, mean, rstd, G, w, b,
                                                        activation=act))
    return Prepared(fwd_bwd, _as_tuple, sync)


def _cuda_empty_like(x):
    from numba import cuda

    return cuda.device_array(x.shape, dtype=x.dtype)


# --- torch: native F.group_norm and the gnnumba.torch module ---------------------------


def _torch_inputs(p: Problem, a: dict, requires_grad: bool):
    import torch

    dt = getattr(torch, p.dtype)
    dev = "cuda" if p.device == "cuda" else "cpu"

    def t(v, lay, grad=False):
        v = torch.from_numpy(lay_out(v, p.layout) if lay else v).to(device=dev, dtype=dt)
        if lay and p.layout == "channels_last":
            # for 4-D/5-D these are the strides of torch.channels_last(_3d); 3-D has no
            # memory-format name but the same (N, spatial..., C) order
            v = v.movedim(1, -1).contiguous().movedim(-1, 1)
        elif lay and p.layout == "strided":
            v = torch.empty(v.shape[:-1] + (2 * v.shape[-1],), dtype=dt,
                            device=dev)[..., ::2].copy_(v)
        return v.requires_grad_(grad)

    x = t(a["x"], True, requires_grad)
    dy = t(a["dy"], True)
    w, b = t(a["weight"], False, requires_grad), t(a["bias"], False, requires_grad)
    sync = _cuda_sync if p.device == "cuda" else (lambda: None)
    return x, dy, w, b, sync


def _torch_timed(p: Problem, forward, x, dy, params, sync) -> Prepared:
    """forward(x) -> y with autograd; the same three modes for every torch-based peer."""
    import torch

    if p.mode == "forward":
        def run():
            with torch.no_grad():
                return forward(x)
        return Prepared(run, _as_tuple, sync)
    inputs = (x,) + tuple(params)
    if p.mode == "backward":
        y = forward(x)  # graph built once; each timed call runs only the backward
        return Prepared(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True),
                        _as_tuple, sync)

    def fwd_bwd():
        y = forward(x)
        return (y,) + torch.autograd.grad(y, inputs, dy)
    return Prepared(fwd_bwd, _as_tuple, sync)


def _prep_torch(p: Problem, a: dict) -> Prepared:
    import torch.nn.functional as F

    x, dy, w, b, sync = _torch_inputs(p, a, p.mode != "forward")
    G, eps = p.groups, p.eps
    if p.activation is not None:
        act = getattr(F, TORCH_NAMES[p.activation])

        def fwd(t):
            return act(F.group_norm(t, G, w, b, eps))
    else:
        def fwd(t):
            return F.group_norm(t, G, w, b, eps)
    return _torch_timed(p, fwd, x, dy, (w, b), sync)


def _prep_gnnumba_torch(p: Problem, a: dict) -> Prepared:
    import torch

    import gnnumba.torch as gt

    x, dy, w, b, sync = _torch_inputs(p, a, p.mode != "forward")
    kw = {"activation": p.activation} if p.activation else {}
    m = gt.GroupNorm(p.groups, p.shape[1], eps=p.eps, device=x.device, dtype=x.dtype, **kw)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    return _torch_timed(p, m, x, dy, (m.weight, m.bias), sync)


# --- per-sample gradients for differential privacy -------------------------------------


def _prep_opacus(p: Problem, a: dict) -> Prepared:
    import torch
    from opacus.grad_sample.group_norm import compute_group_norm_grad_sample

    x, dy, _, _, sync = _torch_inputs(p, a, False)
    layer = torch.nn.GroupNorm(p.groups, p.shape[1], eps=p.eps).to(device=x.device,
                                                                   dtype=x.dtype)

    def run():
        with torch.no_grad():
            gs = compute_group_norm_grad_sample(layer, [x], dy)
        return gs[layer.weight], gs[layer.bias]
    return Prepared(run, _as_tuple, sync)


def _prep_dp(p: Problem, a: dict) -> Prepared:
    import dp

    dt = np.dtype(p.dtype)
    x, dy = lay_out(a["x"].astype(dt), p.layout), lay_out(a["dy"].astype(dt), p.layout)
    return Prepared(lambda: dp.per_sample_grads(x, dy, p.groups, p.eps), _as_tuple)


# --------------------------------------------------------------------------- the table

_TORCH_DTYPES = ("float32", "float64", "bfloat16", "float16")
_ARRAY_MODES = ("forward", "backward", "forward+backward")

PEERS: tuple[Peer, ...] = (
    Peer("gnnumba", ("gnnumba",), _ARRAY_MODES, devices=("cpu", "cuda"),
         prepare=_prep_gnnumba, note="gnnumba.group_norm (NumPy / CUDA arrays)"),
    Peer("gnnumba out=", ("gnnumba",), ("forward",), devices=("cpu", "cuda"),
         prepare=lambda p, a: _prep_gnnumba(p, a, use_out=True),
         note="gnnumba.group_norm into a preallocated out="),
    Peer("gnnumba.torch", ("torch", "gnnumba.torch"), _ARRAY_MODES, devices=("cpu", "cuda"),
         dtypes=_TORCH_DTYPES, prepare=_prep_gnnumba_torch,
         note="gnnumba.torch.GroupNorm module"),
    Peer("torch", ("torch",), _ARRAY_MODES, devices=("cpu", "cuda"), dtypes=_TORCH_DTYPES,
         prepare=_prep_torch, note="torch.nn.functional.group_norm (native)"),
    Peer("numpy", (), _ARRAY_MODES, activations=(None,), prepare=_prep_numpy,
         note="plain NumPy, two-pass variance, in the input dtype"),
    Peer("opacus", ("torch", "opacus"), ("per_sample_grads",), dtypes=_TORCH_DTYPES,
         activations=(None,), prepare=_prep_opacus,
         note="Opacus' built-in nn.GroupNorm grad sampler"),
    Peer("dp", ("dp",), ("per_sample_grads",), activations=(None,), prepare=_prep_dp,
         note="dp.per_sample_grads (Numba kernel)"),
)

# What ratios are reported against: torch native, or for per-sample gradients Opacus'
# (torch-based) sampler. BASELINE is the one for the array modes.
BASELINES = ("torch", "opacus")
BASELINE = BASELINES[0]


def baseline_of(names) -> str | None:
    """The first of BASELINES among ``names`` (contender names of one problem)."""
    return next((b for b in BASELINES if b in names), None)


def peer(name: str) -> Peer:
    for pe in PEERS:
        if pe.name == name:
            return pe
    raise KeyError(f"no peer named {name!r}; peers: {', '.join(pe.name for pe in PEERS)}")


def available_peers(problem: Problem, names=None) -> list[Peer]:
    """Peers that support ``problem`` and whose libraries import, in table order."""
    out = []
    for pe in PEERS:
        if names is not None and pe.name not in names:
            continue
        if pe.supports(problem) and pe.unavailable_reason() is None:
            if pe.name == "dp" and not hasattr(importlib.import_module("dp"), "per_sample_grads"):
                continue  # the dp package exists before its per_sample_grads lands
            if problem.device == "cuda" and not _cuda_ready(pe, problem):
                continue
            out.append(pe)
    return out


def _cuda_ready(pe: Peer, problem: Problem) -> bool:
    """Whether the peer's library sees a GPU (Numba's simulator counts for Numba)."""
    if "torch" in pe.requires:
        import torch

        return torch.cuda.is_available()
    if problem.layout != "nchw":  # see _gnnumba_inputs
        return False
    try:
        from numba import cuda

        return cuda.is_available()
    except Exception:
        return False


def reference_outputs(p: Problem, a: dict) -> tuple:
    """The float64 reference's answer to ``p``, in the order of :data:`OUTPUTS`, computed from
    the inputs rounded to p.dtype (so only the peer's own arithmetic is measured)."""
    from . import reference

    x, dy = _rounded(a["x"], p.dtype), _rounded(a["dy"], p.dtype)
    w, b = _rounded(a["weight"], p.dtype), _rounded(a["bias"], p.dtype)
    if p.mode == "per_sample_grads":
        _, _, _, dw_n, db_n = reference.backward(dy, x, p.groups, None, None, p.eps)
        return dw_n, db_n
    y = reference.forward(x, p.groups, w, b, p.eps, p.activation)[0]
    dx, dw, db = reference.backward(dy, x, p.groups, w, b, p.eps, p.activation)[:3]
    return {"forward": (y,), "backward": (dx, dw, db),
            "forward+backward": (y, dx, dw, db)}[p.mode]


def _rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype in ("float32", "float64", "float16"):
        return a.astype(dtype).astype(np.float64)
    import torch  # bfloat16 exists only there

    return torch.from_numpy(a).to(torch.bfloat16).double().numpy()


def tolerance(p: Problem) -> float:
    """Largest scaled error a peer may show on ``p`` (``gnnumba.cases.TOLERANCE``: the
    forward's own, or the looser one of gradients, which sum over a group)."""
    return C.TOLERANCE[p.dtype]["y" if p.mode == "forward" else "grad"]


def max_error(got: tuple, want: tuple) -> float:
    """Largest scaled error (``gnnumba.cases.scaled_error``) over all outputs; inf for a
    missing output, a shape mismatch or a NaN."""
    worst = 0.0
    for g, w in zip(got, want):
        if g is None:
            return math.inf
        worst = max(worst, C.scaled_error(g, w))
    return worst
