"""The ``gnnumba`` command line: ``bench`` (smoke runs with a tiny time budget), ``check``
(exit status follows the results) and argument errors; and scripts/readme_table.py."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

import gnnumba
from gnnumba import check
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
    # --peers keeps the smoke run short; --quick still picks its five problems
    assert main(["bench", "--quick", "--budget", "0.01", "--peers", "gnnumba,torch",
                 "--no-progress", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cores" in text.splitlines()[0]  # the machine line comes first
    assert "geometric-mean speedup" in text
    report = json.loads(out.read_text())
    results = report["results"]
    assert [(r["mode"], r["layout"]) for r in results] == [
        ("forward", "nchw"), ("forward", "nchw"), ("forward", "nchw"),
        ("forward", "channels_last"), ("forward+backward", "nchw")]
    assert {tuple(r["shape"]) for r in results} >= {(1, 32, 8, 8), (8, 256, 64, 64)}
    for r in results:
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
        assert r["bytes_moved"] == factor * 4 * r["shape"][0] * r["shape"][1] * \
            r["shape"][2] * r["shape"][3]


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
    proc = subprocess.run([sys.executable, "-m", "gnnumba.cli", "check", "--backends", "cpu"],
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


def test_check_cuda_runs_the_selftest():
    # on a GPU the kernels, elsewhere Numba's CUDA simulator
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
    assert "| tiny | 1×32×8×8 (8) | forward | nchw |" in md


def test_readme_table_reports_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert _readme_table().main([str(bad)]) == 1
    assert "cannot read" in capsys.readouterr().err
