"""THE table of labelled cases: what tests, ``gnnumba check``, the CUDA self-test and the
benchmarks run GroupNorm on.

Each shape says what it exercises; dtypes come with their tolerances against the float64
reference (``gnnumba.reference``); value distributions cover the numerically hard inputs;
layouts are the memory orders the kernels take. Everything here is data plus small, pure
NumPy helpers, so the package can import it without pytest, torch or a GPU.

* :data:`SHAPES` — shape coverage: every degenerate and boundary shape the kernels must get
  right (tests cross them with layouts, dtypes and activations).
* :data:`CHECK`, :data:`CHECK_HALF` — the full cases ``gnnumba check`` runs per backend.
* :data:`CUDA_SIM` — small cases for the CUDA kernels in Numba's simulator (slow).
* :data:`SHAPE_SETS` — the benchmark shape sets (``gnnumba bench --shapes NAME``).
* :data:`TOLERANCE`, :data:`DISTRIBUTIONS`, :func:`values`, :func:`inputs`,
  :func:`lay_out`, :func:`scaled_error`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import activations

DTYPES = ("float32", "float64", "float16", "bfloat16")
LAYOUTS = ("nchw", "channels_last", "strided")
ACTIVATIONS = activations.NAMES  # every activation of the one table is tested


@dataclass(frozen=True)
class Case:
    """One labelled problem. ``layout``/``activation``/``dtype`` are the defaults a user of
    the case may cross with others."""

    label: str
    shape: tuple
    groups: int
    layout: str = "nchw"
    activation: str | None = None
    dtype: str = "float32"

    @property
    def id(self) -> str:
        """A short, pytest-friendly id."""
        act = f"-{self.activation}" if self.activation else ""
        return (f"{'x'.join(map(str, self.shape))}-G{self.groups}-{self.layout}-{self.dtype}"
                f"{act}")


# --------------------------------------------------------------------------- shapes

SHAPES = [
    Case("N=0 (empty batch)", (0, 4, 3, 3), 2),
    Case("empty spatial dim", (2, 4, 0, 3), 2),
    Case("G=1 (LayerNorm-like)", (2, 6, 5, 5), 1),
    Case("G=C (InstanceNorm-like)", (2, 6, 5, 5), 6),
    Case("one element per group (variance 0)", (3, 4, 1, 1), 4),
    Case("no spatial dims (N, C)", (4, 8), 2),
    Case("1-D signal", (2, 8, 17), 4),
    Case("3-D volume", (2, 4, 3, 5, 6), 2),
    Case("odd sizes", (3, 9, 7, 11), 3),
    Case("G=32 default", (2, 64, 4, 4), 32),
    Case("large groups, N=1 (several chunks, split path)", (1, 4, 45, 47), 2),
    # the CPU kernels read 64-lane blocks: whole blocks by plain loads, the tail masked
    Case("rows of whole 64-lane blocks and a tail (S = 135)", (2, 4, 9, 15), 2),
    Case("channel tiles of 64 and a tail (C = 130)", (1, 130, 3, 5), 2),
]

# ``gnnumba check``: each backend against the reference on these (every layout, activation
# and the paths of the CPU kernels; float64 where the accumulation differs)
CHECK = [
    Case("NCHW 4-D, odd spatial", (2, 8, 5, 7), 4),
    Case("NCHW float64", (2, 8, 5, 7), 4, dtype="float64"),
    Case("(N, C), no spatial dims", (3, 6), 3),
    Case("(N, C, L), 1-D", (2, 12, 33), 3),
    Case("(N, C, D, H, W), 3-D", (1, 8, 3, 4, 5), 2),
    Case("single group (LayerNorm-like)", (2, 8, 4, 4), 1),
    Case("group == channel (InstanceNorm-like)", (2, 8, 4, 4), 8),
    Case("few groups (split path)", (1, 4, 8, 8), 2),
    Case("group larger than L2 (split path, many chunks)", (1, 2, 300, 300), 1),
    Case("channels-last", (2, 16, 5, 6), 4, layout="channels_last"),
    Case("channels-last 3-D", (1, 8, 2, 3, 4), 2, layout="channels_last"),
    Case("channels-last float64", (2, 16, 5, 6), 4, layout="channels_last", dtype="float64"),
    Case("silu", (2, 8, 6, 6), 4, activation="silu"),
    Case("relu", (2, 8, 6, 6), 4, activation="relu"),
    Case("gelu", (2, 8, 6, 6), 4, activation="gelu"),
    Case("channels-last + silu", (2, 16, 5, 6), 4, layout="channels_last", activation="silu"),
    Case("channels-last + gelu float64", (2, 16, 5, 6), 4, layout="channels_last",
         activation="gelu", dtype="float64"),
    Case("other strides (copied once)", (2, 8, 4, 6), 4, layout="strided"),
    Case("empty batch (N=0)", (0, 8, 4, 4), 4),
]
# half precision (accumulated in float32): what the torch bridge and the DLPack route add
CHECK_HALF = [
    Case("bfloat16", (2, 8, 5, 7), 4, dtype="bfloat16"),
    Case("float16 channels-last", (2, 16, 5, 6), 4, layout="channels_last", dtype="float16"),
    Case("bfloat16 + relu", (2, 8, 6, 6), 4, activation="relu", dtype="bfloat16"),
    Case("bfloat16, whole 64-lane blocks", (2, 4, 9, 15), 2, dtype="bfloat16"),
    Case("float16 channels-last, whole 64-channel tiles", (1, 130, 3, 5), 2,
         layout="channels_last", dtype="float16"),
]

# Numba's CUDA simulator runs a thread at a time: a few small shapes, each for one reason
CUDA_SIM = [
    Case("nchw split: 2 blocks per group", (2, 6, 5, 7), 3),
    Case("nchw fused: group on chip, silu", (2, 4, 3, 5), 2, activation="silu"),
    Case("nchw split, short rows: 4 rows per apply block", (1, 16, 4, 4), 2),
    Case("channels-last: channel tiles x spatial chunks, relu", (2, 6, 4, 5), 3,
         layout="channels_last", activation="relu"),
    Case("channels-last 1-D, C > tile, silu", (1, 12, 9), 4, layout="channels_last",
         activation="silu"),
    Case("float16 accumulated in float32, gelu", (2, 4, 6, 6), 2, activation="gelu",
         dtype="float16"),
    Case("channels-last float64, one group, gelu", (2, 4, 3, 3), 1, layout="channels_last",
         activation="gelu", dtype="float64"),
    Case("channels-last groups straddle channel tiles (Cg=6, tile 4)", (1, 12, 3, 3), 2,
         layout="channels_last"),
]


def _r50(batch: int) -> list[Case]:
    # ResNet-50's GroupNorm layers (G=32, torchvision v1.5 strides): stem, then the distinct
    # (C, H) of each stage's bottleneck widths and outputs.
    chw = [(64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14),
           (512, 7), (2048, 7)]
    return [Case(f"R50 b{batch} C{c} {h}²", (batch, c, h, h), 32) for c, h in chw]


SHAPE_SETS: dict[str, list[Case]] = {
    "tiny": [Case("tiny", (1, 32, 8, 8), 8)],
    # two channels per group, a few cache-sized groups: what the CI smoke runs use
    "small": [Case("small", (2, 64, 16, 16), 32)],
    "resnet50-b2": _r50(2),
    "resnet50-b32": _r50(32),
    # Stable Diffusion UNet levels (batch 2, G=32): 64², 32², 16², 8² latents
    "sd-unet": [Case(f"SD C{c} {h}²", (2, c, h, h), 32)
                for c, h in ((320, 64), (640, 32), (1280, 16), (1280, 8))],
    "video": [Case("video 8×64²", (1, 128, 8, 64, 64), 32)],
    # What real models run (G=32): the Stable Diffusion UNet levels at batch 2, the four
    # ResNet-50-with-GN stage outputs at batch 8 (56² down to 7²), and two 3-D video blocks.
    "models": [
        *[Case(f"SD-UNet C{c} {h}²", (2, c, h, h), 32)
          for c, h in ((320, 64), (640, 32), (1280, 16), (1280, 8))],
        *[Case(f"R50-GN b8 C{c} {h}²", (8, c, h, h), 32)
          for c, h in ((256, 56), (512, 28), (1024, 14), (2048, 7))],
        Case("video C128 8×32²", (1, 128, 8, 32, 32), 32),
        Case("video C256 4×16²", (1, 256, 4, 16, 16), 32),
    ],
    # 32 MiB of float32 in, 32 MiB out: more than L3 on most machines
    "dram": [Case("DRAM 8×256×64²", (8, 256, 64, 64), 32)],
}


# --------------------------------------------------------------------------- tolerances

# Largest error against the float64 reference, relative to max(1, largest |reference|):
# "y" for the forward output and statistics, "grad" for dx, dweight, dbias and the per-sample
# gradients (sums over a group add rounding). Half types: the output's own rounding dominates.
TOLERANCE = {
    "float64": {"y": 1e-11, "grad": 1e-9},
    "float32": {"y": 2e-5, "grad": 2e-4},
    "float16": {"y": 4e-3, "grad": 4e-3},
    "bfloat16": {"y": 3e-2, "grad": 3e-2},
}


def scaled_error(actual, expected) -> float:
    """max |actual - expected| / max(1, max |expected|), in float64; inf when the shapes
    differ or a NaN appears where the reference has none. 0 for empty arrays."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return float("inf")
    if e.size == 0:
        return 0.0
    same_nan = np.isnan(a) & np.isnan(e)
    diff = np.where(same_nan, 0.0, np.abs(a - e))
    worst = float(np.max(diff))
    scale = max(1.0, float(np.nanmax(np.abs(e))) if not np.all(np.isnan(e)) else 1.0)
    return worst / scale if worst == worst else float("inf")


# --------------------------------------------------------------------------- values

# What x is drawn from. The hard ones are where a naive E[x^2]-E[x]^2 or a float32
# accumulation goes wrong; "nonfinite" checks that NaN/inf stay in their group, as in torch.
DISTRIBUTIONS = {
    "normal": "standard normal",
    "offset": "normal(3, 2): off-centre, so cancellation in the variance would show",
    "large-offset": "1e4 + normal: float32 keeps ~3 digits of the deviations",
    "constant": "every group constant: variance exactly 0, rstd = 1/sqrt(eps)",
    "near-constant": "1e6 + 1e-2 * normal: deviations 8 orders below the mean",
    "denormal": "subnormal float32 magnitudes (1e-40 scale)",
    "nonfinite": "normal with a NaN and a +inf in the first group of sample 0",
}


def values(distribution: str, shape, seed: int = 0) -> np.ndarray:
    """float64 values of ``shape`` drawn from ``DISTRIBUTIONS[distribution]``."""
    return _draw(distribution, shape, np.random.default_rng(seed))


def _draw(distribution: str, shape, rng) -> np.ndarray:
    z = rng.standard_normal(shape)
    if distribution == "normal":
        return z
    if distribution == "offset":
        return 3.0 + 2.0 * z
    if distribution == "large-offset":
        return 1e4 + z
    if distribution == "constant":
        return np.full(shape, 2.5)
    if distribution == "near-constant":
        return 1e6 + 1e-2 * z
    if distribution == "denormal":
        return 1e-40 * z
    if distribution == "nonfinite":
        x = z.copy()
        flat = x.reshape(-1)
        if flat.size >= 2:
            flat[0], flat[1] = np.nan, np.inf
        return x
    raise ValueError(f"unknown distribution {distribution!r}; known: {', '.join(DISTRIBUTIONS)}")


def inputs(shape, dtype="float32", seed: int = 0, distribution: str = "normal"):
    """(x, weight, bias, dy) in ``dtype`` (a NumPy dtype: float32/float64; the half types are
    the caller's to make, e.g. ``torch.from_numpy(x).bfloat16()``), C-contiguous."""
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = _draw(distribution, shape, rng)
    w = 1.0 + 0.5 * rng.standard_normal(C)
    b = rng.standard_normal(C)
    dy = rng.standard_normal(shape)
    dt = np.dtype(dtype)
    return x.astype(dt), w.astype(dt), b.astype(dt), dy.astype(dt)


def lay_out(a: np.ndarray, layout: str) -> np.ndarray:
    """The same values as ``a`` in another memory layout (a copy, except "nchw" of a
    C-contiguous array)."""
    if layout == "nchw" or (layout == "channels_last" and a.ndim < 3):
        return np.ascontiguousarray(a)  # without spatial dims both orders are the same
    if layout == "channels_last":
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)
    if layout == "strided":  # every other element of a twice-as-wide buffer
        wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        wide[..., ::2] = a
        return wide[..., ::2]
    raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
