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

A same-size copy (``np.copyto`` into a preallocated array, on CUDA a device-to-device copy)
is one of the contenders, so the "fraction of copy" column compares with a roofline taken
in the same run, under the same noise.
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

from . import peers as P

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


QUICK = Settings(budget_s=1.5, sample_s=0.002, min_reps=5, max_reps=100)


# --------------------------------------------------------------------------- problems


def quick_problems(dtype="float32", device="cpu") -> list[P.Problem]:
    """A few representative problems: tiny (launch/dispatch overhead), one cache-sized
    SD-UNet layer, a DRAM-sized tensor in both layouts, and forward+backward."""
    tiny, = P.SHAPE_SETS["tiny"]
    sd = P.SHAPE_SETS["sd-unet"][0]
    dram, = P.SHAPE_SETS["dram"]
    mk = P.Problem.from_case
    kw = {"dtype": dtype, "device": device}
    return [
        mk(tiny, mode="forward", **kw),
        mk(sd, mode="forward", **kw),
        mk(dram, mode="forward", **kw),
        mk(dram, mode="forward", layout="channels_last", **kw),
        mk(sd, mode="forward+backward", **kw),
    ]


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
    return Contender(COPY, lambda: np.copyto(dst, src), lambda: None)


def _alloc_copy_contender(p: P.Problem) -> Contender:
    src = np.ones(p.numel * p.itemsize // 2, dtype=np.uint16)
    return Contender(ALLOC_COPY, src.copy, lambda: None)


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
        # speedup over torch native (Opacus for per-sample grads): > 1 means faster
        r["speedup_vs_torch"] = base["median_s"] / r["median_s"] if base else None
    return {"id": p.id, "label": p.label, "shape": list(p.shape), "groups": p.groups,
            "dtype": p.dtype, "layout": p.layout, "activation": p.activation, "mode": p.mode,
            "device": p.device, "bytes_moved": p.bytes_moved, "copy_gbps": copy_gbps,
            "baseline": base_name, "contenders": rows, "skipped": skipped}


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
    """One problem: a row per contender, fastest first, copy last."""
    shape = "×".join(map(str, res["shape"]))
    act = f", {res['activation']}" if res["activation"] else ""
    head = (f"{res['label'] or shape}  ({res['mode']}, {shape}, G={res['groups']}, "
            f"{res['layout']}, {res['dtype']}{act}, {res['device']})")
    cols = ["contender", "median", "±IQR/2", f"vs {res['baseline'] or 'torch'}", "GB/s",
            "of copy"]
    rows = []
    items = sorted(res["contenders"].items(),
                   key=lambda kv: (kv[0] in REFERENCE_ROWS, kv[1]["median_s"]))
    for name, r in items:
        spread = (r["q3_s"] - r["q1_s"]) / 2 / r["median_s"]
        sp = r["speedup_vs_torch"]
        rows.append([name, _fmt_time(r["median_s"]), f"{spread:.0%}",
                     "—" if sp is None or name in REFERENCE_ROWS else f"{sp:.2f}×",
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
    return "\n".join(lines)


def summary_line(results: list[dict]) -> str:
    """Geometric mean speedup of each gnnumba contender over torch, across problems."""
    by_name = {}
    for r in results:
        for name, c in r["contenders"].items():
            if c["speedup_vs_torch"] is not None and name not in (*REFERENCE_ROWS,
                                                                  r["baseline"]):
                by_name.setdefault(name, []).append(c["speedup_vs_torch"])
    if not by_name:
        return "no torch baseline (torch not importable): ratios are not available"
    parts = [f"{n} {math.exp(statistics.fmean(map(math.log, v))):.2f}× (n={len(v)})"
             for n, v in by_name.items()]
    return ("geometric-mean speedup vs torch (vs Opacus for per-sample grads): "
            + ", ".join(parts))


# --------------------------------------------------------------------------- plot


def plot(results: list[dict], path: str, machine: str) -> None:
    """PNG: speedup over torch per problem (top) and achieved bandwidth with the measured
    copy roofline (bottom)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    names = [n for n in _contender_order(results) if n not in REFERENCE_ROWS]
    labels = [f"{r['label']}\n{r['mode']}, {r['layout']}" for r in results]
    xs = np.arange(len(results))
    width = 0.8 / max(1, len(names))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(results) + 3), 9),
                                   sharex=True)
    for k, n in enumerate(names):
        off = xs - 0.4 + width * (k + 0.5)
        sp = [r["contenders"].get(n, {}).get("speedup_vs_torch") or np.nan for r in results]
        bw = [r["contenders"].get(n, {}).get("gbps", np.nan) for r in results]
        ax1.bar(off, sp, width, label=n)
        ax2.bar(off, bw, width, label=n)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_yscale("log")
    ax1.set_ylabel("speedup vs torch\n(vs Opacus for per-sample grads; ×, log)")
    ax1.legend(fontsize=8, ncol=3)
    copy = [r["copy_gbps"] for r in results]
    ax2.step(np.r_[xs - 0.5, xs[-1] + 0.5], np.r_[copy, copy[-1]], where="post", color="k",
             lw=1.2, label="same-size copy (roofline)")
    ax2.set_ylabel("achieved GB/s")
    ax2.legend(fontsize=8, ncol=3)
    ax2.set_xticks(xs, labels, rotation=45, ha="right", fontsize=7)
    fig.suptitle(f"gnnumba bench — {machine}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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

    machine = machine_info(device)
    print(machine_line(machine), file=out)
    results = []
    # disable=None: the bar shows on a terminal and stays out of logs and pipes
    bar = tqdm(total=len(problems), unit="problem", disable=None if progress else True,
               file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        for p in problems:
            bar.set_postfix_str(f"{p.label} {p.mode} {p.layout}")

            def on_round(r, reps):
                bar.set_postfix_str(f"{p.label} {p.mode} {p.layout} round {r}/{reps}")
            res = run_problem(p, settings, peer_names, on_round if progress else None)
            results.append(res)
            bar.update(1)
            tqdm.write("\n" + format_table(res), file=out)
    finally:
        bar.close()
    print("\n" + summary_line(results), file=out)
    return {"machine": machine, "machine_line": machine_line(machine),
            "settings": settings.__dict__, "results": results,
            "method": "interleaved round-robin samples, median of per-call time; bytes: "
                      "forward 2x, backward 3x, forward+backward 5x, per-sample grads 2x "
                      "x.nbytes; copy = np.copyto of the same byte count into a preallocated "
                      "array, same run; copy+alloc = the same into a new array"}


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
