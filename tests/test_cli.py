"""The ``gnnumba`` command line: ``bench`` (smoke runs with a tiny time budget), ``check``
(exit status follows the results) and argument errors; and scripts/readme_table.py."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

import gnnumba
from gnnumba import bench, check
from gnnumba import peers as P
from gnnumba.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["bench", "--shapes", "tiny", "--modes", "forward", "--layouts", "nchw",
        "--budget", "0.02", "--no-progress"]


def _hide_torch(monkeypatch):
    # None in sys.modules makes the import raise ImportError, as if not installed
    for mod in ("torch", "gnnumba.torch", "opacus", "dp"):
        monkeypatch.setitem(sys.modules, mod, None)


# --------------------------------------------------------------------------- bench


def test_bench_quick_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # --peers keeps the smoke run short; --quick still picks its eight problems
    assert main(["bench", "--quick", "--budget", "0.01", "--peers", "gnnumba,torch",
                 "--no-progress", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cores" in text.splitlines()[0]  # the machine line comes first
    assert "geometric-mean speedup" in text
    assert "±IQR/2 = half the" in text and "vs torch = torch's median" in text  # legend
    assert "of copy = " in text and "copy+alloc = " in text
    report = json.loads(out.read_text())
    results = report["results"]
    assert [(r["mode"], r["layout"]) for r in results] == [
        ("forward", "nchw"), ("forward", "nchw"), ("forward", "channels_last"),
        ("forward+backward", "nchw"), ("forward+backward", "channels_last"),
        ("forward", "channels_last"), ("forward", "nchw"), ("forward", "channels_last")]
    shapes = {tuple(r["shape"]) for r in results}
    assert shapes >= {(1, 32, 8, 8), (2, 320, 64, 64), (8, 512, 28, 28), (1, 128, 8, 32, 32),
                      (8, 256, 64, 64)}
    noise = report["noise"]
    assert set(noise) >= {"noisy", "reasons", "load_average_start", "calibration_gbps",
                          "calibration_drift", "untrusted_rows"}
    assert len(noise["calibration_gbps"]) >= len(results) + 2  # start, per row, end
    assert noise["untrusted_rows"] == sum(not r["trusted"] for r in results)
    for r in results:
        assert r["trusted"] == (not r["noise"]) and r["attempts"] in (1, 2)
        cs = r["contenders"]
        assert set(cs) == {"copy", "copy+alloc", "gnnumba", "torch"}
        assert cs["copy"]["frac_copy"] == pytest.approx(1.0)
        assert cs["copy+alloc"]["gbps"] == pytest.approx(cs["copy"]["gbps"] * cs["copy"][
            "median_s"] / cs["copy+alloc"]["median_s"])
        for c in cs.values():
            assert c["median_s"] > 0 and c["reps"] >= 5
            assert c["q1_s"] <= c["median_s"] <= c["q3_s"]
        assert cs["torch"]["speedup_vs_torch"] == pytest.approx(1.0)
        want = cs["torch"]["median_s"] / cs["gnnumba"]["median_s"]
        assert cs["gnnumba"]["speedup_vs_torch"] == pytest.approx(want)
        factor = 5 if r["mode"] == "forward+backward" else 2
        assert r["bytes_moved"] == factor * 4 * math.prod(r["shape"])


@pytest.mark.parametrize("extra,want", [
    (["--layouts", "channels_last", "--modes", "forward"],
     [("forward", "channels_last")] * 3),
    (["--shapes", "tiny", "--modes", "forward", "--layouts", "nchw"], [("forward", "nchw")]),
])
def test_quick_honours_shapes_modes_layouts(tmp_path, extra, want):
    out = tmp_path / "q.json"
    assert main(["bench", "--quick", "--budget", "0.01", "--peers", "gnnumba", "--no-progress",
                 "--json", str(out)] + extra) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["layout"]) for r in results] == want
    assert json.loads(out.read_text())["settings"]["budget_s"] == 0.01


def test_quick_selecting_nothing_says_so(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quick", "--modes", "backward"])
    assert e.value.code == 2
    assert "selects no problem" in capsys.readouterr().err


def test_budget_help_states_the_real_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {bench.Settings().budget_s:g}, {bench.QUICK.budget_s:g} with --quick)" \
        in text
    assert "ignored with --quick" not in text


def _row(times: dict, base="torch"):
    """A summarised row from {contender: list of per-call seconds}."""
    p = P.Problem((1, 32, 8, 8), 8)
    cs = [bench.Contender(n, None, None, samples=list(v)) for n, v in times.items()]
    return bench.summarise(p, cs, {})


def test_noise_checks_flag_spread_stalls_and_drift():
    steady = [1e-3, 1.01e-3, 0.99e-3, 1e-3, 1.02e-3]
    quiet = _row({"copy": steady, "copy+alloc": steady, "torch": steady, "gnnumba": steady})
    assert bench.noise_reasons(quiet, 10.0, 10.5) == []
    spread = _row({"copy": steady, "torch": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3],
                   "gnnumba": steady})
    assert any("torch: samples spread" in why for why in bench.noise_reasons(spread))
    # a 12 ms stall in most samples of a 5 us call: the 1000x 'speedups' of a loaded machine
    stall = _row({"copy": steady, "torch": [5e-6, 12e-3, 12e-3, 12e-3, 12e-3],
                  "gnnumba": steady})
    assert any("its best sample" in why for why in bench.noise_reasons(stall))
    # the reference copies alone never make a row noisy
    noisy_copy = _row({"copy": [1e-3, 5e-3, 9e-3], "torch": steady, "gnnumba": steady})
    assert bench.noise_reasons(noisy_copy) == []
    assert any("calibration copy -50%" in w for w in bench.noise_reasons(quiet, 5.0, 10.0))


def test_run_level_noise_is_reported():
    rows = [{"trusted": False}, {"trusted": True}]
    loud = bench._run_noise(rows, [10.0, 20.0], 9.0, 9.5, 2)
    assert loud["noisy"] and loud["untrusted_rows"] == 1
    text = bench.noise_summary(loud)
    assert text.startswith("WARNING: noisy run")
    assert "1 of 2 rows" in text and "busy" in text and "calibration copy" in text
    quiet = bench._run_noise([{"trusted": True}], [10.0, 10.5], 0.1, 0.2, 2)
    assert not quiet["noisy"] and bench.noise_summary(quiet) is None


def test_untrusted_rows_are_marked_and_left_out_of_the_mean():
    steady = [1e-3] * 5
    good = _row({"copy": steady, "torch": steady, "gnnumba": [0.5e-3] * 5})
    bad = dict(_row({"copy": steady, "torch": steady, "gnnumba": [1e-5] * 5}),
               trusted=False, noise=["torch: samples spread ±40%"], attempts=2)
    assert "100.00×?" in bench.format_table(bad)
    assert "do not trust these ratios: torch: samples spread" in bench.format_table(bad)
    line = bench.summary_line([good, bad])
    assert "gnnumba 2.00× (n=1)" in line and "1 noisy row(s) marked ? left out" in line


def test_models_shape_set():
    cases = P.SHAPE_SETS["models"]
    assert {c.shape for c in cases} >= {
        (2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8),
        (8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14), (8, 2048, 7, 7)}
    assert any(len(c.shape) == 5 for c in cases)  # 3-D video blocks
    assert all(c.groups == 32 for c in cases)
    probs = bench.full_problems(["models"], ["forward", "forward+backward"],
                                ["nchw", "channels_last"])
    assert len(probs) == 4 * len(cases)


# --------------------------------------------------------------------------- conventions


def test_version_and_python_m_gnnumba():
    from importlib.metadata import version

    assert gnnumba.__version__ == version("gnnumba")
    proc = subprocess.run([sys.executable, "-m", "gnnumba", "--version"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"gnnumba {gnnumba.__version__}"


def test_license_and_typing_marker_ship():
    assert "BSD 3-Clause License" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "gnnumba" / "py.typed").exists()
    text = (ROOT / "pyproject.toml").read_text()
    assert 'license = "BSD-3-Clause"' in text and '"py.typed"' in text


def test_warmup_command_compiles_and_names_the_cache(capsys):
    assert main(["warmup", "--dtypes", "float64", "--layouts", "nchw", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "kernel sets compiled or loaded" in out and "Numba's cache: " in out
    from gnnumba import warmup

    n_act = len(gnnumba.activations.CODES)
    assert len(warmup.jobs(["float64"], ["nchw"])) == n_act * len(warmup.SHAPES)
    for d in warmup.cache_dirs():
        assert pathlib.Path(d).is_dir(), d


def test_precompile_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown dtype 'int8'; choose from float32"):
        gnnumba.precompile(["int8"])
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        gnnumba.precompile(activations=["tanh"])


def test_bench_runs_without_torch(tmp_path, monkeypatch, capsys):
    _hide_torch(monkeypatch)
    out = tmp_path / "b.json"
    assert main(TINY + ["--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert set(r["contenders"]) == {"copy", "copy+alloc", "gnnumba", "gnnumba out=", "numpy"}
    assert r["contenders"]["gnnumba"]["speedup_vs_torch"] is None
    assert "no torch baseline" in capsys.readouterr().out


def test_bench_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "b.png"
    assert main(TINY + ["--peers", "gnnumba,numpy", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,message", [
    (["bench", "--device", "tpu"], "invalid choice"),
    (["bench", "--dtype", "int8"], "invalid choice"),
    (["bench", "--shapes", "resnet"], "choose from: tiny"),
    (["bench", "--modes", ""], "unknown mode"),
    (["bench", "--peers", "jax"], "unknown peer 'jax'"),
    (["bench", "--budget", "-1"], "positive number of seconds"),
    (["bench", "--budget", "soon"], "expected a number"),
    (["check", "--backends", "gpu"], "choose from: cpu, torch, dp, cuda"),
    ([], "required"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_cuda_without_a_gpu_says_so(capsys):
    try:
        from numba import cuda

        if cuda.is_available():
            pytest.skip("a GPU is present here")
    except ImportError:
        pass
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cuda", "--quick"])
    assert e.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bench_half_precision_without_torch_says_what_to_do(monkeypatch, capsys):
    _hide_torch(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--dtype", "bfloat16"])
    assert e.value.code == 2
    assert "--dtype float32" in capsys.readouterr().err


# --------------------------------------------------------------------------- check


def test_check_cpu_passes_as_a_command():
    proc = subprocess.run([sys.executable, "-m", "gnnumba", "check", "--backends", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cpu    passed" in proc.stdout
    assert "1 passed, 0 failed" in proc.stdout


def test_check_fails_on_a_wrong_answer(monkeypatch, capsys):
    real = gnnumba.group_norm
    monkeypatch.setattr(gnnumba, "group_norm", lambda *a, **k: real(*a, **k) * 1.001)
    assert main(["check", "--backends", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "cpu    FAILED" in out
    assert "gnnumba: NCHW 4-D, odd spatial [forward" in out  # names the failing case


def test_check_counts_an_unavailable_backend_as_neither_pass_nor_fail(monkeypatch, capsys):
    monkeypatch.setattr(check, "check_cuda", lambda timeout: check._parse_cuda(
        0, "GNNUMBA-CHECK-UNAVAILABLE No module named 'gnnumba.gpu.selftest'\n", "",
        "simulator", 0.1))
    assert main(["check", "--backends", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "cuda   unavailable" in out
    assert "0 passed, 0 failed, 1 unavailable" in out


@pytest.mark.parametrize("rc,stdout,stderr,status", [
    (0, 'GNNUMBA-CHECK-RESULT [["fwd", true, 1e-7], ["bwd", true, 2e-7]]\n', "", "passed"),
    (0, 'GNNUMBA-CHECK-RESULT [["fwd", true, 1e-7], ["bwd", false, 0.5]]\n', "", "FAILED"),
    (0, "GNNUMBA-CHECK-RESULT []\n", "", "FAILED"),  # a self-test that checks nothing
    (1, "", "Traceback ...\nRecursionError: maximum recursion depth", "FAILED"),
])
def test_cuda_selftest_output_is_read_strictly(rc, stdout, stderr, status):
    o = check._parse_cuda(rc, stdout, stderr, "simulator", 1.0)
    assert o.status == status
    if status == "FAILED" and rc == 1:
        assert "RecursionError" in o.detail


def test_check_cuda_runs_the_selftest(monkeypatch):
    """On a GPU the kernels, elsewhere Numba's CUDA simulator: the subprocess, its result
    line and the report. Without a GPU only the first case runs (the simulator suite in
    tests/test_cuda.py checks every case; all of them here took 26 s of CI)."""
    if not check._gpu_present()[0]:
        monkeypatch.setattr(check, "_CUDA_SCRIPT", check._CUDA_SCRIPT.replace(
            "res = selftest.run()", "selftest.CASES = selftest.CASES[:1]\nres = selftest.run()"))
        assert "CASES[:1]" in check._CUDA_SCRIPT
    o = check.check_cuda(timeout=600)
    if o.status == "unavailable":  # numba-cuda not installed
        pytest.skip(o.detail)
    assert o.status == "passed", (o.detail, o.failures)
    assert "checks" in o.detail


# --------------------------------------------------------------------------- README table


def _readme_table():
    spec = importlib.util.spec_from_file_location("readme_table",
                                                  ROOT / "scripts" / "readme_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_table_from_bench_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(TINY + ["--json", str(out)]) == 0
    capsys.readouterr()
    rt = _readme_table()
    assert rt.main([str(out)]) == 0
    md = capsys.readouterr().out
    assert md.startswith("Measured on: ")
    assert "| problem | shape (G) | mode | layout | gnnumba |" in md
    assert "| gnnumba vs torch | GB/s | of copy |" in md
    assert "| tiny | 1×32×8×8 (8) | forward | nchw |" in md
    report = json.loads(out.read_text())
    report["results"][0]["trusted"] = False
    report["noise"] = {"reasons": ["1 of 1 rows stayed noisy"]}
    md = rt.table(report)
    assert "**This run was noisy** (1 of 1 rows stayed noisy)" in md
    assert "×** ?" in md  # the untrusted row's ratios are marked


def test_readme_table_reports_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert _readme_table().main([str(bad)]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_readme_standing_is_computed_from_the_rows():
    """The README's summary of where gnnumba stands is the geometric mean of the model rows'
    ratios, by mode and layout, never typed in."""
    def row(label, mode, layout, torch_ratio, numpy_ratio):
        return {"label": label, "mode": mode, "layout": layout,
                "contenders": {"gnnumba.torch": {"speedup_vs_torch": torch_ratio},
                               "gnnumba": {"speedup_vs_torch": numpy_ratio}}}

    report = {"results": [row("SD-UNet C320 64²", "forward", "nchw", 0.5, 1.0),
                          row("R50-GN b8 C512 28²", "forward", "nchw", 2.0, 1.0),
                          row("DRAM 8×256×64²", "forward", "nchw", 3.0, 2.5),
                          row("tiny", "forward", "nchw", 9.0, 9.0)]}
    text = _readme_table().standing(report)
    assert "through `gnnumba.torch`: 1.00× over the 2 model rows (nchw forward 1.00×; " \
           "1 rows at 0.95× or better), 3.00–3.00× on the DRAM rows" in text
    assert "through the NumPy API: 1.00× over the 2 model rows" in text


def test_cuda_table_from_the_first_gpu_run():
    """README's CUDA table is rendered from the committed H100 run (no GPU needed): one row
    per shape and layout, ratios that follow from the stored times, and the correctness
    summary over every row."""
    import json

    spec = importlib.util.spec_from_file_location("bench_cuda",
                                                  ROOT / "benchmarks" / "bench_cuda.py")
    bench_cuda = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_cuda)
    path = ROOT / "benchmarks" / "results" / "cuda_h100.json"
    report = json.loads(path.read_text())
    text = bench_cuda.table(report)
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and "µs" in ln]
    assert len(lines) == len(bench_cuda.SHAPES) * 2
    first = next(r for r in report["rows"] if r["shape"] == lines[0].split(" | ")[0][2:]
                 and r["dtype"] == "float16" and r["layout"] == "nchw" and r["act"] is None)
    assert f"{first['torch_fwd_graph_s'] / first['fwd_graph_s']:.2f}×" in lines[0]
    assert f"{len(report['rows'])} rows of the run" in text
    assert report["machine"]["device"] in text
    readme = (ROOT / "README.md").read_text()
    assert text.strip() in readme  # README holds the rendered table, not a typed one
