#!/usr/bin/env python
"""Turn ``gnnumba bench --json PATH`` output into the README's Markdown performance table.

    gnnumba bench --shapes tiny,models,dram --modes forward,forward+backward --json bench.json
    python scripts/readme_table.py bench.json --readme README.md

``--readme`` replaces what stands between README's ``<!-- bench-table -->`` and
``<!-- /bench-table -->`` markers (without it the table goes to stdout). The table names the
machine it was measured on: figures are regenerated, never typed in.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

# Columns, left to right; a contender that no problem has is left out.
TIME_COLUMNS = ("gnnumba", "gnnumba out=", "gnnumba.torch", "torch", "numpy", "dp", "opacus")
# Whose ratio to the baseline gets a column (the first two: issue 9's "through gnnumba.torch"
# and the array API; dp for per-sample gradients).
RATIO_COLUMNS = ("gnnumba.torch", "gnnumba", "dp")
# Whose bandwidth the right-hand columns show: the kernel alone when it was timed.
BANDWIDTH_OF = ("gnnumba out=", "gnnumba", "dp")


def _t(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs" if s >= 1e-4 else f"{s * 1e6:.1f} µs"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _geomean(values) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def _speedups(rows, contender):
    return [r["contenders"][contender]["speedup_vs_torch"] for r in rows
            if contender in r["contenders"]
            and r["contenders"][contender]["speedup_vs_torch"] is not None]


def standing(report: dict) -> str:
    """Where gnnumba stands against torch in this run, as geometric means of its ratios over
    the `models` rows (by mode and layout) and the DRAM rows: the README's summary, computed
    here so that it is never typed in."""
    from gnnumba.cases import SHAPE_SETS  # noqa: PLC0415 (scripts/ run from the checkout)

    sets = {name: {c.label for c in SHAPE_SETS[name]} for name in ("models", "dram")}
    rows = [r for r in report["results"] if r["mode"] != "per_sample_grads"]
    parts = []
    for contender, name in (("gnnumba.torch", "through `gnnumba.torch`"),
                            ("gnnumba", "through the NumPy API")):
        models = [r for r in rows if r["label"] in sets["models"]]
        all_ = _speedups(models, contender)
        if not all_:
            continue
        groups = []
        for mode in ("forward", "forward+backward"):
            for layout in ("nchw", "channels_last"):
                v = _speedups([r for r in models if r["mode"] == mode
                               and r["layout"] == layout], contender)
                if v:
                    groups.append(f"{layout.replace('_', '-')} {mode} {_geomean(v):.2f}×")
        at_par = sum(v >= 0.95 for v in all_)
        dram = _speedups([r for r in rows if r["label"] in sets["dram"]], contender)
        parts.append(f"{name}: {_geomean(all_):.2f}× over the {len(all_)} model rows ("
                     + ", ".join(groups) + f"; {at_par} rows at 0.95× or better)"
                     + (f", {min(dram):.2f}–{max(dram):.2f}× on the DRAM rows" if dram else ""))
    return ("Geometric means of the ratio to torch in this run, " + "; ".join(parts) + "."
            if parts else "")


def table(report: dict) -> str:
    results = report["results"]
    present = [c for c in TIME_COLUMNS if any(c in r["contenders"] for r in results)]
    ratios = [c for c in RATIO_COLUMNS if any(c in r["contenders"] for r in results)]
    head = ["problem", "shape (G)", "mode", "layout", *present,
            *[f"{c} vs torch" for c in ratios], "GB/s", "of copy"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
    for r in results:
        cs = r["contenders"]
        mark = "" if r.get("trusted", True) else " ?"
        times = [_t(cs[c]["median_s"]) if c in cs else "" for c in present]
        speed = [f"**{cs[c]['speedup_vs_torch']:.2f}×**{mark}"
                 if c in cs and cs[c]["speedup_vs_torch"] is not None else "—" for c in ratios]
        ours = next((o for o in BANDWIDTH_OF if o in cs), None)
        gbps = f"{cs[ours]['gbps']:.1f}" if ours else "—"
        frac = f"{cs[ours]['frac_copy']:.0%}" if ours else "—"
        shape = "×".join(map(str, r["shape"])) + f" ({r['groups']})"
        act = f" + {r['activation']}" if r.get("activation") else ""
        lines.append("| " + " | ".join([r["label"], shape, r["mode"].replace("_", " ") + act,
                                        r["layout"].replace("_", "-"), *times, *speed, gbps,
                                        frac]) + " |")
    dtypes = sorted({r["dtype"] for r in results})
    notes = (
        f"Measured on: {report['machine_line']}. {', '.join(dtypes)}; median of interleaved "
        "repetitions (`gnnumba bench`). *X vs torch* = time of torch native `F.group_norm` "
        "(of Opacus' GroupNorm sampler for per-sample grads) / time of X; *GB/s* counts the "
        "bytes the operation must move (forward: read x, write y; backward: read x and dy, "
        "write dx; per-sample grads: read x and dy) for the kernel alone (`gnnumba out=` where "
        "timed); *of copy* compares it with a copy of the same byte count on the kernels' "
        "threads (the memory roofline), timed in the same run."
    )
    noise = report.get("noise")
    if noise and noise.get("reasons"):
        notes += (" **This run was noisy** (" + "; ".join(noise["reasons"]) + "): rows marked "
                  "? did not pass the noise checks.")
    summary = standing(report)
    return notes + ("\n\n" + summary if summary else "") + "\n\n" + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json_path", help="output of gnnumba bench --json")
    ap.add_argument("--readme", help="write the table into this README between its markers")
    args = ap.parse_args(argv)
    try:
        with open(args.json_path) as f:
            report = json.load(f)
        text = table(report)
    except (OSError, ValueError, KeyError) as e:
        print(f"readme_table: cannot read {args.json_path} as `gnnumba bench --json` output "
              f"({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    if args.readme:
        from readme_block import write_block  # scripts/ is on sys.path when run as a script

        return write_block(args.readme, "bench-table", text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
