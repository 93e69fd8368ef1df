"""``gnnumba bench``: side-by-side timing of the peers in ``gnnumba.peers``.

How a problem is timed (this machine is shared and noisy, so the method matters more than
the clock):

1. every contender is prepared (inputs converted, buffers allocated) and called twice outside
   the timed region: Numba compiles (or loads its cache) and first-touch page faults happen
   there;
2. each contender gets a batch size ``number`` so that one sample lasts about
   ``sample_s`` (a 5 µs call is timed 400 times per sample, a 50 ms call once);
3. samples are taken round-robin, A B C, B C A, C A B, ..., so that a slow phase of the
   machine hits every contender alike; the rotation removes any advantage of going first;
4. the reported time is the median sample / number, with the quartiles beside it.

A same-size copy (into a preallocated array on all of the kernels' threads, on CUDA a
device-to-device copy) is one of the contenders, so the "fraction of copy" column compares
with a roofline taken in the same run, under the same noise.

Whether a row can be trusted (a shared machine can make any multi-threaded call, torch's or
Numba's, cost milliseconds, and a 5 µs row then shows a 1000x "speedup"): a row is noisy
when a contender's samples spread widely (IQR/2 over the median above ``SPREAD_LIMIT``), when
its median is far above its best sample (``MIN_RATIO_LIMIT``), or when a fixed calibration
copy, timed just before the row, ran at a bandwidth far from its median over the run
(``DRIFT_LIMIT``). A noisy row is measured once more (within the run's time allowance) and,
if still noisy, marked ``?`` on screen and ``"trusted": false`` in the JSON; the geometric
means use trusted rows only. The load average before and after the run is recorded, and a
busy machine is named on screen.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from numba import prange

from . import cpu
from . import peers as P
from .cpu.compile import kernel

COPY = "copy"
# The same copy into a freshly allocated array: what any contender that returns a new array
# (no out=) pays on top, page faults and kernel zeroing of the new pages included (about
# 3x the copy itself for 32 MiB on a Linux VM). Shown for context; "of copy" uses COPY.
ALLOC_COPY = "copy+alloc"
REFERENCE_ROWS = (COPY, ALLOC_COPY)


@dataclass
class Settings:
    budget_s: float = 1.0  # timed rounds per problem stop after about this long
    sample_s: float = 0.002  # target duration of one timed sample
    min_reps: int = 5
    max_reps: int = 200
    seed: int = 0
    # a noisy row is measured again while the run has lasted less than this (None: always)
    repeat_until_s: float | None = None


QUICK = Settings(budget_s=0.75, sample_s=0.002, min_reps=5, max_reps=100, repeat_until_s=25.0)

# Noise limits (see the module docstring). IQR/2 of 15% still leaves a ratio of 1.3 vs 1.0
# distinguishable; a median 3x the best sample means most samples waited for a core.
SPREAD_LIMIT = 0.15
MIN_RATIO_LIMIT = 3.0
DRIFT_LIMIT = 0.25
# 1-minute load average per core above which the machine is called busy before the run starts
LOAD_LIMIT = 0.5
CALIBRATION_BYTES = 8 << 20

LEGEND = """Columns: median = median time per call over interleaved samples; ±IQR/2 = half the
interquartile range of those samples, as a fraction of the median (their spread; above
{spread:.0%} the row is marked ?); vs torch = torch's median time / this contender's
(> 1: faster than torch; per-sample grads compare with Opacus' sampler); GB/s = bytes the
operation must move (forward 2x, backward 3x, forward+backward 5x, per-sample grads 2x the
input) / median; of copy = that bandwidth as a fraction of a same-size copy into a
preallocated array on all of the kernels' threads, timed in the same rounds (the memory
roofline); copy+alloc = the same copy into a newly allocated np.empty array (what a fresh
output costs on top; gnnumba's outputs reuse freed buffers, see gnnumba.cpu.pool)."""


# --------------------------------------------------------------------------- problems


# What ``gnnumba bench`` runs without --shapes: the per-call overhead, the model shapes and
# one tensor larger than the caches.
DEFAULT_SHAPE_SETS = ("tiny", "models", "dram")


def quick_problems(dtype="float32", device="cpu", modes=None, layouts=None) -> list[P.Problem]:
    """A few representative problems: tiny (dispatch overhead), model shapes (an SD-UNet
    level in both layouts, a ResNet-50 stage and a video block, forward and forward+backward)
    and a DRAM-sized tensor in both layouts. ``modes``/``layouts`` keep only those."""
    tiny, = P.SHAPE_SETS["tiny"]
    models = {c.label: c for c in P.SHAPE_SETS["models"]}
    sd, r50 = models["SD-UNet C320 64²"], models["R50-GN b8 C512 28²"]
    video = models["video C128 8×32²"]
    dram, = P.SHAPE_SETS["dram"]
    table = [
        (tiny, "forward", "nchw"),
        (sd, "forward", "nchw"),
        (sd, "forward", "channels_last"),
        (sd, "forward+backward", "nchw"),
        (r50, "forward+backward", "channels_last"),
        (video, "forward", "channels_last"),
        (dram, "forward", "nchw"),
        (dram, "forward", "channels_last"),
    ]
    return [P.Problem.from_case(case, mode=mode, layout=layout, dtype=dtype, device=device)
            for case, mode, layout in table
            if (modes is None or mode in modes) and (layouts is None or layout in layouts)]


def full_problems(shape_sets, modes, layouts, dtype="float32", device="cpu",
                  activation=None) -> list[P.Problem]:
    out = []
    for name in shape_sets:
        for case in P.SHAPE_SETS[name]:
            for mode in modes:
                for layout in layouts:
                    if layout == "channels_last" and len(case.shape) < 3:
                        continue
                    out.append(P.Problem.from_case(case, mode=mode, layout=layout, dtype=dtype,
                                                   device=device, activation=activation))
    return out


# --------------------------------------------------------------------------- timing


@dataclass
class Contender:
    name: str
    run: object
    sync: object
    number: int = 1
    samples: list = field(default_factory=list)  # seconds per call, one per round


def _copy_contender(p: P.Problem) -> Contender:
    """Same-size copy: moves 2 x nbytes, the floor any forward pass has to pay."""
    if p.device == "cuda":
        from numba import cuda

        src = cuda.device_array(p.numel * p.itemsize, dtype=np.uint8)
        dst = cuda.device_array_like(src)
        return Contender(COPY, lambda: dst.copy_to_device(src), cuda.synchronize)
    # the copy does not care about the element type; bytes of the same count will do
    src = np.ones(p.numel * p.itemsize // 2, dtype=np.uint16)
    dst = np.empty_like(src)
    return Contender(COPY, lambda: parallel_copy(src, dst), lambda: None)


def _alloc_copy_contender(p: P.Problem) -> Contender:
    src = np.ones(p.numel * p.itemsize // 2, dtype=np.uint16)

    def run():
        dst = np.empty_like(src)  # fresh memory, as a library without a buffer pool gets
        parallel_copy(src, dst)
        return dst

    return Contender(ALLOC_COPY, run, lambda: None)


def parallel_copy(src: np.ndarray, dst: np.ndarray) -> None:
    """dst[:] = src on every thread the kernels use (np.copyto is single-threaded: on two
    cores it is not the bandwidth limit that the two-thread kernels and torch run against).
    Serial below the kernels' serial cut, as they are."""
    if cpu.run_serially(src.size // 2):  # uint16 counts: two per float32 element
        np.copyto(dst, src)
    else:
        _copy_kernel(src, dst)


@kernel(parallel=True)
def _copy_kernel(src, dst):
    blocks = 64  # fixed: the copy's schedule does not depend on the thread count
    n = src.shape[0]
    step = (n + blocks - 1) // blocks
    for k in prange(blocks):
        lo = k * step
        hi = min(lo + step, n)
        if lo < hi:
            dst[lo:hi] = src[lo:hi]


def _timed(c: Contender, number: int) -> float:
    run, sync = c.run, c.sync
    t0 = time.perf_counter_ns()
    for _ in range(number):
        run()
    sync()
    return (time.perf_counter_ns() - t0) * 1e-9 / number


def measure(contenders: list[Contender], s: Settings, on_round=None) -> None:
    """Fills each contender's ``samples``; warm-up and calibration happen here too."""
    for c in contenders:  # warm-up: compile / load cache, first touch
        c.run()
        c.run()
        c.sync()
    round_s = 0.0
    for c in contenders:  # calibrate the batch size from one more call
        t1 = max(_timed(c, 1), 1e-9)
        c.number = max(1, min(100_000, int(s.sample_s / t1)))
        round_s += c.number * t1
    reps = int(min(s.max_reps, max(s.min_reps, s.budget_s / max(round_s, 1e-9))))
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection inside one sample is not the callee's cost
    try:
        k = len(contenders)
        for r in range(reps):
            for i in range(k):
                c = contenders[(r + i) % k]
                c.samples.append(_timed(c, c.number))
            if on_round is not None:
                on_round(r + 1, reps)
    finally:
        if gc_was_enabled:
            gc.enable()


def run_problem(p: P.Problem, s: Settings, peer_names=None, on_round=None) -> dict:
    a = p.arrays(s.seed)
    contenders, skipped = [_copy_contender(p)], {}
    if p.device == "cpu":
        contenders.append(_alloc_copy_contender(p))
    for pe in P.available_peers(p, peer_names):
        try:
            pr = pe.prepare(p, a)
        except Exception as e:  # one broken peer must not take the whole run down
            skipped[pe.name] = f"{type(e).__name__}: {e}"
            continue
        contenders.append(Contender(pe.name, pr.run, pr.sync))
    measure(contenders, s, on_round)
    return summarise(p, contenders, skipped)


def summarise(p: P.Problem, contenders: list[Contender], skipped: dict) -> dict:
    rows = {}
    for c in contenders:
        q = np.percentile(c.samples, [25, 50, 75])
        rows[c.name] = {"median_s": float(q[1]), "q1_s": float(q[0]), "q3_s": float(q[2]),
                        "min_s": float(min(c.samples)), "reps": len(c.samples),
                        "number": c.number}
    copy_gbps = 2 * p.numel * p.itemsize / rows[COPY]["median_s"] / 1e9
    base_name = P.baseline_of(rows)
    base = rows.get(base_name)
    for name, r in rows.items():
        traffic = 2 * p.numel * p.itemsize if name in REFERENCE_ROWS else p.bytes_moved
        r["gbps"] = traffic / r["median_s"] / 1e9
        r["frac_copy"] = r["gbps"] / copy_gbps
        r["spread"] = (r["q3_s"] - r["q1_s"]) / 2 / r["median_s"]
        # speedup over torch native (Opacus for per-sample grads): > 1 means faster
        r["speedup_vs_torch"] = base["median_s"] / r["median_s"] if base else None
    return {"id": p.id, "label": p.label, "shape": list(p.shape), "groups": p.groups,
            "dtype": p.dtype, "layout": p.layout, "activation": p.activation, "mode": p.mode,
            "device": p.device, "bytes_moved": p.bytes_moved, "copy_gbps": copy_gbps,
            "baseline": base_name, "contenders": rows, "skipped": skipped}


# --------------------------------------------------------------------------- noise


def calibrate(nbytes: int = CALIBRATION_BYTES, samples: int = 9) -> float:
    """Bandwidth (GB/s) of a fixed-size copy, median of a few: the same work every time, so
    a change between two calls is the machine's, not the code's."""
    src = np.ones(nbytes // 2, dtype=np.uint16)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(samples):
        t0 = time.perf_counter_ns()
        np.copyto(dst, src)
        times.append(time.perf_counter_ns() - t0)
    return 2 * nbytes / max(statistics.median(times), 1)  # bytes per ns = GB/s


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None


def noise_reasons(res: dict, calibration_gbps: float | None = None,
                  typical_gbps: float | None = None) -> list[str]:
    """Why a row's ratios cannot be trusted ([] when they can). Looks at the contenders the
    ratios are made of (not the copies: they are context)."""
    reasons = []
    for name, r in res["contenders"].items():
        if name in REFERENCE_ROWS:
            continue
        if r["spread"] > SPREAD_LIMIT:
            reasons.append(f"{name}: samples spread ±{r['spread']:.0%} (limit "
                           f"{SPREAD_LIMIT:.0%})")
        if r["median_s"] > MIN_RATIO_LIMIT * r["min_s"]:
            reasons.append(f"{name}: median {r['median_s'] / r['min_s']:.1f}x its best sample")
    if calibration_gbps and typical_gbps:
        drift = calibration_gbps / typical_gbps - 1
        if abs(drift) > DRIFT_LIMIT:
            reasons.append(f"calibration copy {drift:+.0%} off its run median")
    return reasons


def _worst(reasons_a: list, reasons_b: list) -> bool:
    return len(reasons_a) > len(reasons_b)


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def machine_info(device: str = "cpu") -> dict:
    import numba

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "gnnumba": _version("gnnumba"),
        "torch": _version("torch"),
        "opacus": _version("opacus"),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    if device == "cuda":
        from numba import cuda

        import numba

        dev = cuda.get_current_device()
        name = getattr(dev, "name", "")
        info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        if numba.config.ENABLE_CUDASIM:  # timings in the simulator are not GPU timings
            info["gpu"] = "Numba CUDA simulator (NOT GPU timings)"
        info["compute_capability"] = ".".join(map(str, getattr(dev, "compute_capability", ())))
    return info


def machine_line(m: dict) -> str:
    parts = []
    if m.get("gpu"):
        cc = m["compute_capability"].replace(".", "")
        parts.append(f"{m['gpu']} (sm_{cc})" if cc else m["gpu"])
    threads = f"Numba {m['numba_threads']} threads"
    if m.get("torch_threads") is not None:
        threads += f", torch {m['torch_threads']}"
    parts.append(f"{m['cpu']}, {m['cores']} cores ({threads})")
    parts.append(m["os"])
    libs = [f"Python {m['python']}", f"NumPy {m['numpy']}", f"Numba {m['numba']}"]
    if m.get("torch"):
        libs.append(f"torch {m['torch']}")
    libs.append(f"gnnumba {m['gnnumba']}")
    parts.append(", ".join(libs))
    return "; ".join(parts)


# --------------------------------------------------------------------------- report


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def format_table(res: dict) -> str:
    """One problem: a row per contender, fastest first, copies last; ``?`` marks ratios of
    a row that did not pass the noise checks."""
    shape = "×".join(map(str, res["shape"]))
    act = f", {res['activation']}" if res["activation"] else ""
    head = (f"{res['label'] or shape}  ({res['mode']}, {shape}, G={res['groups']}, "
            f"{res['layout']}, {res['dtype']}{act}, {res['device']})")
    untrusted = not res.get("trusted", True)
    mark = "?" if untrusted else ""
    cols = ["contender", "median", "±IQR/2", f"vs {res['baseline'] or 'torch'}", "GB/s",
            "of copy"]
    rows = []
    items = sorted(res["contenders"].items(),
                   key=lambda kv: (kv[0] in REFERENCE_ROWS, kv[1]["median_s"]))
    for name, r in items:
        sp = r["speedup_vs_torch"]
        rows.append([name, _fmt_time(r["median_s"]), f"{r['spread']:.0%}",
                     "—" if sp is None or name in REFERENCE_ROWS else f"{sp:.2f}×{mark}",
                     f"{r['gbps']:.1f}",
                     f"{r['frac_copy']:.0%}"])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = [head, "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                     for i, (c, w) in enumerate(zip(cols, widths)))]
    for r in rows:
        lines.append("  " + "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                      for i, (v, w) in enumerate(zip(r, widths))))
    for name, why in res["skipped"].items():
        lines.append(f"  ({name} skipped: {why})")
    if untrusted:
        lines.append(f"  ? noisy after {res.get('attempts', 1)} measurement(s), do not "
                     f"trust these ratios: {'; '.join(res['noise'])}")
    return "\n".join(lines)


def _geomean(values) -> float:
    return math.exp(statistics.fmean(map(math.log, values)))


def summary_line(results: list[dict]) -> str:
    """Geometric mean speedup of each gnnumba contender over torch, across the rows that
    passed the noise checks."""
    by_name, untrusted = {}, 0
    for r in results:
        if not r.get("trusted", True):
            untrusted += 1
            continue
        for name, c in r["contenders"].items():
            if c["speedup_vs_torch"] is not None and name not in (*REFERENCE_ROWS,
                                                                  r["baseline"]):
                by_name.setdefault(name, []).append(c["speedup_vs_torch"])
    if not any(r["baseline"] for r in results):
        return "no torch baseline (torch not importable): ratios are not available"
    parts = [f"{n} {_geomean(v):.2f}× (n={len(v)})" for n, v in by_name.items()]
    text = ("geometric-mean speedup vs torch (vs Opacus for per-sample grads): "
            + (", ".join(parts) or "no trusted row"))
    if untrusted:
        text += f"; {untrusted} noisy row(s) marked ? left out"
    return text


def noise_summary(noise: dict) -> str | None:
    """The screen warning for a run that cannot be trusted as a whole (None when quiet)."""
    if not noise["reasons"]:
        return None
    return ("WARNING: noisy run, treat its ratios with suspicion and rerun on a quiet machine: "
            + "; ".join(noise["reasons"]))


# --------------------------------------------------------------------------- plot


def plot(results: list[dict], path: str, machine: str) -> None:
    """PNG: speedup over torch per problem with quartile error bars (top; the baseline
    itself is the line at 1) and achieved bandwidth with the measured copy roofline
    (bottom). Noisy rows are hatched and their labels end in ``?``; bars beyond the axis
    (one outlier would squash a log axis) are clipped and labelled with their value."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    order = [n for n in _contender_order(results) if n not in REFERENCE_ROWS]
    names = [n for n in order if n not in P.BASELINES]
    labels = [f"{r['label']}{'' if r.get('trusted', True) else ' ?'}\n{r['mode']}, "
              f"{r['layout']}" for r in results]
    xs = np.arange(len(results))
    width = 0.8 / max(1, len(names))
    many = len(results) > 16  # narrower columns, upright labels
    width_in = min(max(8, (0.5 if many else 1.3) * len(results) + 3), 30)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(width_in, 10.5 if many else 9.5),
                                   sharex=True)
    ratios = [c["speedup_vs_torch"] for r in results for n, c in r["contenders"].items()
              if n in names and c.get("speedup_vs_torch")]
    lo, hi = _ratio_limits(ratios)
    for k, n in enumerate(names):
        off = xs - 0.4 + width * (k + 0.5)
        sp, err_lo, err_hi, hatch = [], [], [], []
        for r in results:
            c, base = r["contenders"].get(n), r["contenders"].get(r["baseline"] or "")
            v = c.get("speedup_vs_torch") if c else None
            if v is None or base is None:
                sp.append(np.nan), err_lo.append(0), err_hi.append(0), hatch.append("")
                continue
            # the ratio's range from the quartiles of both times, clipped to the axis
            shown = min(max(v, lo), hi)
            sp.append(shown)
            err_lo.append(max(0.0, shown - max(base["q1_s"] / c["q3_s"], lo)))
            err_hi.append(max(0.0, min(base["q3_s"] / c["q1_s"], hi) - shown))
            hatch.append("" if r.get("trusted", True) else "//")
        bars = ax1.bar(off, sp, width, label=n, yerr=[err_lo, err_hi], capsize=2,
                       error_kw={"lw": 0.8})
        for bar, h, v, r in zip(bars, hatch, sp, results):
            bar.set_hatch(h)
            full = r["contenders"].get(n, {}).get("speedup_vs_torch")
            if full is not None and not lo <= full <= hi:  # clipped: say its value
                ax1.annotate(f"{full:.3g}×", (bar.get_x() + bar.get_width() / 2, v),
                             ha="center", va="bottom", fontsize=7, rotation=90)
        bw = [r["contenders"].get(n, {}).get("gbps", np.nan) for r in results]
        ax2.bar(off, bw, width, label=n)
    ax1.axhline(1.0, color="k", lw=0.8, label=f"{P.BASELINE} (= 1)")
    ax1.set_yscale("log")
    ax1.set_ylim(lo / 1.1, hi * 1.6)
    ax1.set_ylabel("speedup vs torch (×, log)\n> 1 faster; per-sample grads: vs Opacus")
    ax1.legend(fontsize=8, ncol=3)
    copy = [r["copy_gbps"] for r in results]
    ax2.step(np.r_[xs - 0.5, xs[-1] + 0.5], np.r_[copy, copy[-1]], where="post", color="k",
             lw=1.2, label="same-size copy (roofline)")
    ax2.set_ylabel("achieved GB/s")
    ax2.legend(fontsize=8, ncol=3)
    ax2.set_xticks(xs, labels, rotation=90 if many else 45, ha="center" if many else "right",
                   fontsize=7)
    ax1.set_xlim(-0.6, len(results) - 0.4)
    title = "gnnumba bench\n" + "\n".join(textwrap.wrap(machine, 110))
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.014 * (title.count("\n") + 1)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ratio_limits(ratios) -> tuple[float, float]:
    """Log-axis limits that show the bulk of the ratios (Tukey's fences on the log ratios,
    so a few outliers cannot squash the axis), always including 0.5-2 around the baseline."""
    if not ratios:
        return 0.5, 2.0
    q1, q3 = np.percentile(np.log(ratios), [25, 75])
    fence = 1.5 * (q3 - q1) + 0.3
    return min(0.5, math.exp(q1 - fence)), max(2.0, math.exp(q3 + fence))


def _contender_order(results):
    seen = []
    for r in results:
        for n in r["contenders"]:
            if n not in seen:
                seen.append(n)
    return seen


# --------------------------------------------------------------------------- driver


def run(problems: list[P.Problem], settings: Settings, *, peer_names=None, progress=True,
        out=None, device="cpu") -> dict:
    from tqdm import tqdm

    out = sys.stdout if out is None else out
    t_start = time.perf_counter()

    machine = machine_info(device)
    print(machine_line(machine), file=out)
    load_start = load_average()
    cores = os.cpu_count() or 1
    calibration = [calibrate()]
    results = []
    # disable=None: the bar shows on a terminal and stays out of logs and pipes
    bar = tqdm(total=len(problems), unit="problem", disable=None if progress else True,
               file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        for p in problems:
            bar.set_postfix_str(f"{p.label} {p.mode} {p.layout}")

            def on_round(r, reps):
                bar.set_postfix_str(f"{p.label} {p.mode} {p.layout} round {r}/{reps}")
            res, cal = _measure_trusted(p, settings, peer_names,
                                        on_round if progress else None, calibration, t_start)
            results.append(res)
            bar.update(1)
            tqdm.write("\n" + format_table(res), file=out)
    finally:
        bar.close()
    calibration.append(calibrate())
    noise = _run_noise(results, calibration, load_start, load_average(), cores)
    print("\n" + LEGEND.format(spread=SPREAD_LIMIT), file=out)
    warning = noise_summary(noise)
    if warning:
        print("\n" + warning, file=out)
    print("\n" + summary_line(results), file=out)
    return {"machine": machine, "machine_line": machine_line(machine),
            "settings": settings.__dict__, "noise": noise, "results": results,
            "method": "interleaved round-robin samples, median of per-call time; bytes: "
                      "forward 2x, backward 3x, forward+backward 5x, per-sample grads 2x "
                      "x.nbytes; copy = a copy of the same byte count into a preallocated array "
                      "on the kernels' threads, same run; copy+alloc = the same into a new array; noise checks: "
                      f"spread (IQR/2) <= {SPREAD_LIMIT}, median <= {MIN_RATIO_LIMIT}x best "
                      f"sample, calibration copy within {DRIFT_LIMIT:.0%} of its run median"}


def _measure_trusted(p, settings, peer_names, on_round, calibration, t_start):
    """Measure ``p``; measure again once if noisy (time allowing); mark what stays noisy.
    Appends the calibration bandwidths taken to ``calibration``."""
    best = best_reasons = None
    attempts = 0
    while True:
        cal = calibrate()
        calibration.append(cal)
        res = run_problem(p, settings, peer_names, on_round)
        attempts += 1
        reasons = noise_reasons(res, cal, statistics.median(calibration))
        if best is None or _worst(best_reasons, reasons):
            best, best_reasons = res, reasons
        elapsed = time.perf_counter() - t_start
        may_repeat = settings.repeat_until_s is None or elapsed < settings.repeat_until_s
        if not best_reasons or attempts >= 2 or not may_repeat:
            break
    best.update(trusted=not best_reasons, noise=best_reasons, attempts=attempts,
                calibration_gbps=cal)
    return best, cal


def _run_noise(results, calibration, load_start, load_end, cores) -> dict:
    """The run-level noise record (JSON ``noise``) and the reasons to warn on screen."""
    reasons = []
    untrusted = sum(not r["trusted"] for r in results)
    if untrusted:
        reasons.append(f"{untrusted} of {len(results)} rows stayed noisy after a repeat "
                       f"(marked ?)")
    drift = max(calibration) / min(calibration) - 1 if calibration else 0.0
    if drift > DRIFT_LIMIT:
        reasons.append(f"a fixed calibration copy ran between {min(calibration):.1f} and "
                       f"{max(calibration):.1f} GB/s during the run ({drift:.0%} apart)")
    if load_start is not None and load_start > LOAD_LIMIT * cores:
        reasons.append(f"the machine was busy before the run (load average {load_start:.1f} "
                       f"on {cores} cores)")
    return {"noisy": bool(reasons), "reasons": reasons, "untrusted_rows": untrusted,
            "load_average_start": load_start, "load_average_end": load_end, "cores": cores,
            "calibration_gbps": [round(c, 2) for c in calibration],
            "calibration_drift": drift,
            "limits": {"spread": SPREAD_LIMIT, "median_over_best": MIN_RATIO_LIMIT,
                       "calibration_drift": DRIFT_LIMIT, "load_per_core": LOAD_LIMIT}}


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
