"""Every peer in gnnumba.peers (the table the benchmarks time) against the float64 reference.

If a peer computed something else than the others, its benchmark numbers would compare
different work; these tests are what makes the ratios in ``gnnumba bench`` meaningful.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from gnnumba import peers as P

CASES = [
    P.Case("4-D, odd spatial", (2, 8, 5, 6), 4),
    P.Case("5-D video-like", (1, 8, 3, 4, 5), 2),
    P.Case("(N, C, L)", (3, 6, 7), 3),
]


def _problems():
    for case in CASES:
        for mode in ("forward", "backward", "forward+backward"):
            for layout in ("nchw", "channels_last", "strided"):
                for act in (None, "silu"):
                    yield P.Problem.from_case(case, mode=mode, layout=layout, activation=act)
    four_d = CASES[0]
    for dtype in ("float64", "bfloat16", "float16"):  # half types: torch-based peers only
        for mode in ("forward", "forward+backward"):
            yield P.Problem.from_case(four_d, mode=mode, dtype=dtype)
    for case in CASES:  # per-sample gradients (the DP peers)
        for layout in ("nchw", "channels_last"):
            yield P.Problem.from_case(case, mode="per_sample_grads", layout=layout)


PAIRS = [(p, pe) for p in _problems() for pe in P.PEERS if pe.supports(p)]


@pytest.mark.parametrize("problem,peer", PAIRS,
                         ids=[f"{pe.name}-{p.id}" for p, pe in PAIRS])
def test_peer_matches_reference(problem, peer):
    why = peer.unavailable_reason()
    if why:
        pytest.skip(why)
    if peer not in P.available_peers(problem):
        pytest.skip(f"{peer.name} is not available for {problem.id}")
    a = problem.arrays(seed=3)
    pr = peer.prepare(problem, a)
    got = pr.outputs(pr.run())
    want = P.reference_outputs(problem, a)
    assert len(got) == len(P.OUTPUTS[problem.mode])
    err = P.max_error(got, want)
    assert err <= P.tolerance(problem), f"{peer.name}: scaled error {err:.3e}"


def test_the_timed_call_is_repeatable():
    # the benchmark calls run() many times: every call must give the same answer
    p = P.Problem((2, 8, 5, 6), 4, mode="forward+backward")
    a = p.arrays()
    for pe in P.available_peers(p):
        pr = pe.prepare(p, a)
        first = pr.outputs(pr.run())
        again = pr.outputs(pr.run())
        for f, g in zip(first, again):
            np.testing.assert_array_equal(f, g, err_msg=pe.name)


def test_gnnumba_and_torch_agree_with_each_other():
    pytest.importorskip("torch")
    p = P.Problem((2, 16, 6, 6), 4, mode="forward+backward", layout="channels_last",
                  activation="silu")
    a = p.arrays(seed=5)
    outs = {n: P.peer(n).prepare(p, a) for n in ("gnnumba", "torch")}
    g, t = (pr.outputs(pr.run()) for pr in outs.values())
    assert P.max_error(g, t) < P.tolerance(p)


# --------------------------------------------------------------------------- the table


def test_table_names_are_unique_and_baseline_is_in_it():
    names = [pe.name for pe in P.PEERS]
    assert len(names) == len(set(names))
    assert P.BASELINE in names
    for want in ("gnnumba", "gnnumba out=", "gnnumba.torch", "torch", "numpy", "opacus", "dp"):
        assert want in names


def test_unknown_peer_name_lists_the_peers():
    with pytest.raises(KeyError, match="peers: gnnumba"):
        P.peer("jax")


def test_shape_sets_are_valid_group_norms():
    for name in ("tiny", "resnet50-b2", "resnet50-b32", "sd-unet", "video", "dram"):
        assert P.SHAPE_SETS[name], name
    for cases in P.SHAPE_SETS.values():
        for c in cases:
            assert c.shape[1] % c.groups == 0, c
    sd = {c.shape for c in P.SHAPE_SETS["sd-unet"]}
    assert sd == {(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)}
    assert {c.shape[0] for c in P.SHAPE_SETS["resnet50-b32"]} == {32}
    assert P.SHAPE_SETS["dram"][0].shape == (8, 256, 64, 64)
    assert P.SHAPE_SETS["video"][0].shape == (1, 128, 8, 64, 64)


@pytest.mark.parametrize("mode,factor", [("forward", 2), ("backward", 3),
                                         ("forward+backward", 5), ("per_sample_grads", 2)])
def test_bytes_moved(mode, factor):
    p = P.Problem((2, 4, 3, 5), 2, mode=mode)
    assert p.bytes_moved == factor * 2 * 4 * 3 * 5 * 4
    assert P.Problem((2, 4, 3, 5), 2, mode=mode, dtype="bfloat16").bytes_moved == \
        factor * 2 * 4 * 3 * 5 * 2


def test_problem_rejects_unknown_values_with_the_choices():
    with pytest.raises(ValueError, match="mode='fwd'.*forward"):
        P.Problem((2, 4, 3), 2, mode="fwd")
    with pytest.raises(ValueError, match="channels_last needs a spatial dim"):
        P.Problem((2, 4), 2, layout="channels_last")


def test_lay_out_keeps_values_and_sets_strides():
    from gnnumba.api import is_channels_last

    a = np.arange(2 * 6 * 3 * 4, dtype=np.float64).reshape(2, 6, 3, 4)
    cl = P.lay_out(a, "channels_last")
    st = P.lay_out(a, "strided")
    assert is_channels_last(cl) and not cl.flags.c_contiguous
    assert not st.flags.c_contiguous and not is_channels_last(st)
    np.testing.assert_array_equal(cl, a)
    np.testing.assert_array_equal(st, a)


def test_max_error_catches_shape_mismatch_and_nan():
    ok = (np.ones((2, 3)),)
    assert P.max_error(ok, ok) == 0.0
    assert P.max_error((np.ones((3, 2)),), ok) == math.inf
    assert P.max_error((np.full((2, 3), np.nan),), ok) == math.inf
    assert P.max_error((np.ones((2, 3)) + 0.5,), ok) == pytest.approx(0.5)


def test_without_torch_only_the_numpy_peers_remain(monkeypatch):
    # None in sys.modules makes `import torch` raise ImportError, as if not installed
    for mod in ("torch", "gnnumba.torch", "opacus", "dp"):
        monkeypatch.setitem(sys.modules, mod, None)
    p = P.Problem((2, 8, 4, 4), 4)
    assert [pe.name for pe in P.available_peers(p)] == ["gnnumba", "gnnumba out=", "numpy"]
    assert "cannot import torch" in P.peer("torch").unavailable_reason()


_SIM_SCRIPT = """
import json
from gnnumba import peers as P
from gnnumba.gpu import config, selftest
for k, v in selftest.SMALL_CONFIG.items():  # simulator: small blocks, fast enough
    setattr(config, k, v)
out = []
for mode in ("forward", "backward", "forward+backward"):
    p = P.Problem((2, 4, 3, 5), 2, mode=mode, device="cuda", activation="silu")
    a = p.arrays()
    for pe in P.available_peers(p):
        pr = pe.prepare(p, a)
        got = pr.outputs(pr.run())
        pr.sync()
        out.append([pe.name, mode, P.max_error(got, P.reference_outputs(p, a))])
print("RESULT", json.dumps(out))
"""


def test_cuda_peers_in_the_simulator():
    # the CUDA side of the table (device arrays in, sync, copy back) in Numba's simulator
    pytest.importorskip("numba.cuda")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", _SIM_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT "):])
    assert {(n, m) for n, m, _ in results} >= {
        ("gnnumba", "forward"), ("gnnumba out=", "forward"), ("gnnumba", "backward"),
        ("gnnumba", "forward+backward")}
    for name, mode, err in results:
        assert err <= P.tolerance(P.Problem((2, 4, 3, 5), 2, mode=mode)), (name, mode, err)
