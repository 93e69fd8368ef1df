"""``python -m dp``: GroupNorm versus BatchNorm under differential privacy, in numbers.

1. Coupling — replace one sample of a batch: how much do the OTHER samples' outputs and
   per-sample gradients move? (BatchNorm: they do; gnnumba GroupNorm: exactly 0.)
2. Sensitivity — add one sample to a batch: how far does the sum of clipped per-sample
   gradients move? DP-SGD's noise assumes at most C. Three candidate samples are tried (a
   real digit and the same digit scaled by +-100), so the figures are empirical lower bounds
   on the sensitivity, shown per candidate. (GroupNorm: <= C for every candidate; BatchNorm:
   slightly above C for a real digit, far above for the outliers.)
3. DP-SGD on scikit-learn's digits with the GroupNorm CNN at several ε, beside non-private
   baselines, and ``convert_batchnorm`` making the BatchNorm CNN acceptable to Opacus.

``--quick`` runs a reduced version (CI smoke test, < 1 minute); ``--plot PATH`` draws a PNG.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
import warnings

FULL = {"coupling": [2, 4, 8, 16, 32, 64, 128, 256],
        "sensitivity": [2, 4, 8, 16, 32, 64, 128, 256],
        "epsilons": [1.0, 3.0, 8.0], "epochs": 15}
QUICK = {"coupling": [2, 16, 64], "sensitivity": [2, 8, 32], "epsilons": [8.0], "epochs": 3}
CLIP = 0.1


def _fmt(v: float) -> str:
    return "0 (exact)" if v == 0.0 else f"{v:.3g}"


def section_coupling(cfg, seed):
    from .sensitivity import run_coupling

    print("\n1. Coupling: replace sample 0 of a batch; largest |change| in the OTHER samples")
    rows = run_coupling(cfg["coupling"], seed)
    print(f"   {'B':>5} | {'BN outputs':>11} {'BN grads':>11} | {'GN outputs':>11} "
          f"{'GN grads':>11} | grad rows checked")
    by = {(r["norm"], r["batch"]): r for r in rows}
    for B in cfg["coupling"]:
        bn, gn = by["bn", B], by["gn", B]
        print(f"   {B:>5} | {_fmt(bn['output_change']):>11} {_fmt(bn['grad_change']):>11} | "
              f"{_fmt(gn['output_change']):>11} {_fmt(gn['grad_change']):>11} | "
              f"{gn['rows_checked']} of {B - 1}")
    return rows


def section_sensitivity(cfg, seed):
    from .sensitivity import run_sensitivity

    print(f"\n2. Sensitivity: add one sample to a batch of B; L2 change of the sum of "
          f"per-sample\n   gradients clipped to C = {CLIP}, in units of C, for each candidate "
          "sample added.\n   DP-SGD's noise assumes <= 1 C; with batch coupling only (2B+1) C "
          "is guaranteed.\n   The largest change over 3 candidates is an EMPIRICAL LOWER BOUND "
          "on the\n   sensitivity, not the sensitivity: a worse sample may exist.")
    rows = run_sensitivity(cfg["sensitivity"], clip=CLIP, seed=seed)
    by = {(r["norm"], r["batch"]): r for r in rows}
    names = list(rows[0]["ratios"])
    width = max(map(len, names)) + 1
    span = len(names) * (width + 1) - 1
    print(f"   {'':>5} | {'BatchNorm':^{span}} | {'gnnumba GroupNorm':^{span}} |")
    print(f"   {'B':>5} | " + " ".join(f"{n:>{width}}" for n in names) + " | "
          + " ".join(f"{n:>{width}}" for n in names) + f" | {'(2B+1)':>7}")
    for B in cfg["sensitivity"]:
        bn, gn = by["bn", B], by["gn", B]
        flag = "  <- BN exceeds C" if bn["ratio"] > 1.0 + 1e-6 else ""
        print(f"   {B:>5} | " + " ".join(f"{bn['ratios'][n]:>{width - 1}.3f}C" for n in names)
              + " | " + " ".join(f"{gn['ratios'][n]:>{width - 1}.3f}C" for n in names)
              + f" | {2 * B + 1:>6}C{flag}")
    print("   Two more reasons BatchNorm cannot be used as is under DP-SGD: its running "
          "mean and\n   variance are computed from the private batches and released with the "
          "model without\n   any noise (a non-private release of their own); and with Poisson "
          "sampling, which\n   DP-SGD's accounting assumes, the batch size B is random and "
          "unbounded, so no (2B+1) C\n   bound can be fixed in advance.")
    return rows


def section_training(cfg, seed):
    from opacus.validators import ModuleValidator

    from gnnumba.torch import convert_batchnorm

    from .data import cnn, digits
    from .train import DELTA, accuracy, train_nonprivate, train_private

    print("\n3. DP-SGD on sklearn's digits (1437 train / 360 test, 8x8), "
          f"{cfg['epochs']} epochs, delta = {DELTA:g}")
    bn = cnn("bn", seed)
    errors = ModuleValidator.validate(bn, strict=False)
    first = textwrap.shorten(str(errors[0]).splitlines()[0], 100, placeholder=" ...")
    print(f"   Opacus ModuleValidator on the BatchNorm CNN: {len(errors)} error(s), e.g.\n"
          f"   {first!r}")
    gn = convert_batchnorm(bn)
    gn_names = sorted({f"{type(m).__name__}(G={m.num_groups}, C={m.num_channels})"
                       for m in gn.modules() if hasattr(m, "num_groups")})
    print(f"   after gnnumba.torch.convert_batchnorm: {ModuleValidator.validate(gn, strict=False)}"
          f" (no errors; {', '.join(gn_names)})")
    xtr, ytr, xte, yte = digits(seed)
    rows = []
    for norm in ("bn", "gn"):
        t = time.perf_counter()
        m = train_nonprivate(cnn(norm, seed), xtr, ytr, epochs=cfg["epochs"], seed=seed)
        rows.append({"model": f"{norm.upper()} non-private", "epsilon": float("inf"),
                     "accuracy": accuracy(m, xte, yte), "seconds": time.perf_counter() - t})
    for eps in cfg["epsilons"]:
        t = time.perf_counter()
        m, spent, sigma = train_private(cnn("gn", seed), xtr, ytr, target_epsilon=eps,
                                        epochs=cfg["epochs"], lr=0.25, seed=seed)
        rows.append({"model": "GN DP-SGD", "epsilon": spent, "sigma": sigma,
                     "accuracy": accuracy(m, xte, yte), "seconds": time.perf_counter() - t})
    print(f"   {'model':<18} {'epsilon':>8} {'sigma':>6} {'test acc':>9} {'time':>6}")
    for r in rows:
        eps = "inf" if r["epsilon"] == float("inf") else f"{r['epsilon']:.2f}"
        sigma = f"{r['sigma']:.2f}" if "sigma" in r else "-"
        print(f"   {r['model']:<18} {eps:>8} {sigma:>6} {100 * r['accuracy']:>8.1f}% "
              f"{r['seconds']:>5.1f}s")
    return rows


def plot(path, coupling, sens, training):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for norm, style in (("bn", "o-"), ("gn", "s--")):
        rs = [r for r in coupling if r["norm"] == norm]
        label = "BatchNorm" if norm == "bn" else "gnnumba GroupNorm (exactly 0)"
        ax[0].plot([r["batch"] for r in rs], [r["grad_change"] for r in rs], style, label=label)
    ax[0].set_yscale("symlog", linthresh=1e-6)  # linear near 0, so GN's exact 0 shows
    ax[0].set(xlabel="batch size B", ylabel="max |change| of other samples' grads",
              title="1. Coupling (replace one sample)")
    ax[0].legend()
    for norm, style in (("bn", "o-"), ("gn", "s--")):
        rs = [r for r in sens if r["norm"] == norm]
        ax[1].plot([r["batch"] for r in rs], [r["ratio"] for r in rs], style,
                   label="BatchNorm" if norm == "bn" else "gnnumba GroupNorm")
    bs = sorted({r["batch"] for r in sens})
    ax[1].plot(bs, [2 * b + 1 for b in bs], ":", color="gray", label="(2B+1) C bound")
    ax[1].axhline(1.0, color="red", lw=1, label="C (what DP-SGD assumes)")
    ax[1].set(yscale="log", xlabel="batch size B", ylabel="||change of clipped sum|| / C",
              title="2. Sensitivity (add one sample):\n"
                    "empirical lower bound, largest of 3 candidates")
    ax[1].legend()
    for a, rows in ((ax[0], coupling), (ax[1], sens)):
        ticks = sorted({r["batch"] for r in rows})
        a.set_xscale("log", base=2)
        a.set_xticks(ticks, [str(t) for t in ticks])
        a.minorticks_off()
    labels = [r["model"] if r["epsilon"] == float("inf") else f"GN eps={r['epsilon']:.1f}"
              for r in training]
    ax[2].bar(labels, [100 * r["accuracy"] for r in training], color="tab:blue")
    ax[2].set(ylabel="test accuracy (%)", ylim=(0, 100), title="3. DP-SGD on digits")
    ax[2].tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dp", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reduced run (< 1 minute)")
    p.add_argument("--plot", metavar="PATH", help="also draw the three results into a PNG")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the data split, the models' initial weights, the candidate "
                        "sample and training (default 0); results are reproducible per seed")
    args = p.parse_args(argv)
    for mod in ("torch", "opacus", "sklearn"):
        try:
            __import__(mod)
        except ImportError:
            p.exit(2, f"python -m dp: the demonstration needs torch, Opacus and scikit-learn "
                      f"({mod} is missing): pip install \"gnnumba[dp]\"\n")
    cfg = QUICK if args.quick else FULL
    warnings.filterwarnings("ignore", message="Full backward hook")
    import torch

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    print(f"gnnumba DP demonstration ({'quick' if args.quick else 'full'} run, seed {args.seed},"
          f" torch threads {torch.get_num_threads()})")
    coupling = section_coupling(cfg, args.seed)
    sens = section_sensitivity(cfg, args.seed)
    training = section_training(cfg, args.seed)
    if args.plot:
        plot(args.plot, coupling, sens, training)
        print(f"\nplot written to {args.plot}")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
