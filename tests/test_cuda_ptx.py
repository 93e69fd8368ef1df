"""Every CUDA kernel specialisation compiles to PTX for sm_80 and sm_90, with no GPU.

Specialisations: input dtype (float16/bfloat16/float32/float64) x kernel (the NCHW and
channels-last layouts are separate kernels) x activation (for the kernels that apply it),
thinned to keep CI time small (see ``specializations``); ``benchmarks/cuda_sass.py``
compiles all of them. Where ``ptxas`` is installed the PTX is also assembled, and the registers,
shared memory, stack and spills per kernel are checked (no spills, no local-memory stack
in the hot kernels: the per-thread tiles must live in registers).

``python tests/test_cuda_ptx.py`` prints the resource table.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX compilation needs the real numba.cuda, not the simulator",
                allow_module_level=True)



from numba import cuda

from gnnumba import activations
from gnnumba.gpu import config, kernels

CCS = [(8, 0), (9, 0)]
DTYPES = ["float16", "float32", "float64"]  # and bfloat16, natively on sm_80/sm_90
# the kernels that stream the tensor: they must not touch local memory
HOT = set(kernels.STREAMED_INPUTS)


def specializations():
    """sm_90: every dtype (bfloat16 included), every activation for float32, None and silu
    for the others; sm_80: float16 and float32 without activation (the code that differs
    between the two architectures is the same for every activation)."""
    for cc in CCS:
        for dt in DTYPES + ["bfloat16"] if cc == (9, 0) else ["float16", "float32"]:
            for name in kernels.kernel_names():
                acts = [None]
                if name in kernels.ACT_KERNELS and cc == (9, 0):
                    acts = list(activations.CODES) if dt == "float32" else [None, "silu"]
                for act in acts:
                    yield cc, dt, name, act


def _id(spec):
    cc, dt, name, act = spec
    return f"sm_{cc[0]}{cc[1]}-{dt}-{name}{'-' + act if act else ''}"


_PTX = {}


def compile_ptx(spec, out_dtype=None):
    key = spec + (out_dtype,)
    if key not in _PTX:
        cc, dt, name, act = spec
        acc = "float64" if dt == "float64" else "float32"  # bfloat16 accumulates in float32
        K = config.ITEMS * (2 if dt in ("float16", "bfloat16") else 1)  # launch.items
        ks = kernels.build(config.THREADS, K, config.FUSED_ITEMS, config.FLUSH, acc,
                           activations.code(act))
        k = getattr(ks, name)
        ptx, _ = cuda.compile_ptx(k.py_func, kernels.signatures(dt, out_dtype)[name], cc=cc,
                                  launch_bounds=k.targetoptions.get("launch_bounds"))
        _PTX[key] = ptx
    return _PTX[key]


PTXAS = shutil.which("ptxas") or ("/usr/local/bin/ptxas"
                                  if os.path.exists("/usr/local/bin/ptxas") else None)


def ptxas_resources(ptx, cc):
    """(resources dict, note). NVVM from CUDA 13.5 writes PTX ISA 9.5; an older ptxas
    (CUDA 13.0 accepts up to 9.0) rejects the header, so the ``.version`` line is lowered
    to what ptxas names as its current version and the note says so. ptxas still rejects
    any instruction its ISA does not have, so a success is meaningful."""
    note = ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        for _ in range(2):
            with open(path, "w") as f:
                f.write(ptx)
            proc = subprocess.run([PTXAS, f"-arch=sm_{cc[0]}{cc[1]}", "-v", path, "-o",
                                   os.path.join(tmp, "k.cubin")], capture_output=True,
                                  text=True)
            m = re.search(r"Unsupported \.version (\S+); current version is '(\S+)'",
                          proc.stderr)
            if proc.returncode == 0 or not m:
                break
            ptx = re.sub(r"^\.version \S+", f".version {m.group(2)}", ptx, flags=re.M)
            note = f"PTX .version {m.group(1)} lowered to {m.group(2)} for this ptxas"
        if proc.returncode != 0:
            raise AssertionError(proc.stderr)
    out = proc.stderr + proc.stdout
    res = {"registers": int(re.search(r"Used (\d+) registers", out).group(1))}
    for key, pat in [("smem", r"(\d+) bytes smem"), ("stack", r"(\d+) bytes stack frame"),
                     ("spill_stores", r"(\d+) bytes spill stores"),
                     ("spill_loads", r"(\d+) bytes spill loads")]:
        m = re.search(pat, out)
        res[key] = int(m.group(1)) if m else 0
    return res, note


SPECS = list(specializations())


@pytest.mark.parametrize("spec", SPECS, ids=[_id(s) for s in SPECS])
def test_compiles_to_ptx(spec):
    ptx = compile_ptx(spec)
    cc = spec[0]
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert ".entry" in ptx  # a kernel, not just device functions
    assert "atom.global.add.f" not in ptx  # determinism: no float atomics


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_half_input_float32_parameter_gradients_compile(layout):
    """dx kernels of float16 input write dweight/dbias as float32 (issue 10 #7)."""
    ptx = compile_ptx(((9, 0), "float16", f"bwd_dx_{layout}", None), "float32")
    assert "st.global.f32" in ptx


# bfloat16 conversions are calls into numba-cuda's bfloat16 shim, linked when the kernel is
# loaded on a GPU: ptxas alone cannot resolve them, so test_bfloat16_links_inline checks them
# through benchmarks/cuda_sass.py (NVRTC + nvJitLink with LTO, as numba-cuda links them).
RESOURCE_SPECS = [s for s in SPECS if s[1] in ("float32", "float64") or
                  (s[1] == "float16" and s[2] in HOT)]


@pytest.mark.parametrize("spec", [s for s in SPECS if s[1] == "bfloat16" and s[2] in HOT],
                         ids=[_id(s) for s in SPECS if s[1] == "bfloat16" and s[2] in HOT])
def test_bfloat16_loads_are_16_bit(spec):
    """bfloat16 tensors are read as 16-bit values (no float32 copy of the input)."""
    assert re.search(r"ld\.global(\.nc)?\.(b16|u16)", compile_ptx(spec))


def _cuda_sass():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import cuda_sass
    finally:
        sys.path.pop(0)
    if cuda_sass.NVDISASM is None or cuda_sass.PTXAS is None:
        pytest.skip("nvdisasm (nvidia-cuda-nvdisasm) or ptxas not installed")
    pytest.importorskip("cuda.bindings.nvjitlink")
    return cuda_sass


@pytest.mark.parametrize("cc, name", [((9, 0), "bwd_dx_cl"), ((8, 0), "fwd_stats_cl")])
def test_bfloat16_links_inline(cc, name):
    """bfloat16 kernels linked with numba-cuda's bfloat16 shim with link-time optimisation
    (numba-cuda's default when nvJitLink is installed): the conversions are inlined (no
    CALL in the SASS), no stack, no spills, and the hot loop costs no more instructions per
    element than float16's (same 16-bit loads, same tile)."""
    cuda_sass = _cuda_sass()
    spec = {s["dtype"]: s for s in kernels.sass_specs(("bfloat16", "float16"), [(None, 0)])
            if s["kernel"] == name}
    bf, f16 = (cuda_sass.analyse(spec[d], cc[0] * 10 + cc[1]) for d in ("bfloat16", "float16"))
    assert bf["stack"] == 0 and bf["spills"] == 0, bf
    assert bf["loop"]["calls"] == 0, bf["loop"]
    assert bf["loop"]["inst_per_elem"] <= f16["loop"]["inst_per_elem"] * 1.25, (bf, f16)


# kernels whose register cap (launch bounds) spills in their prologue (the merge of the
# statistics partials), never in the streaming loops: test_streaming_loops_stay_in_registers
PROLOGUE_SPILLS = {"fwd_apply_cl"}


@pytest.mark.skipif(PTXAS is None, reason="ptxas not installed")
@pytest.mark.parametrize("spec", RESOURCE_SPECS, ids=[_id(s) for s in RESOURCE_SPECS])
def test_ptxas_resources(spec):
    res, _ = ptxas_resources(compile_ptx(spec), spec[0])
    assert res["registers"] <= 255
    if spec[2] in PROLOGUE_SPILLS:
        return
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0, res
    if spec[2] in HOT:
        assert res["stack"] == 0, f"per-thread tile left registers: {res}"


@pytest.mark.parametrize("cc, dtype", [(90, "float16"), (80, "float32")])  # CI time
@pytest.mark.parametrize("name", sorted(PROLOGUE_SPILLS))
def test_streaming_loops_stay_in_registers(name, dtype, cc):
    """The innermost loops that both load and store global memory (the streaming loops) have
    no local-memory access (LDL/STL) in the SASS, and the kernel keeps at least 50%
    occupancy."""
    import re

    cuda_sass = _cuda_sass()
    spec = next(s for s in kernels.sass_specs((dtype,), [(None, 0)]) if s["kernel"] == name)
    res = cuda_sass.analyse(spec, cc)
    assert res["occupancy"] >= 0.5, res
    insts, labels = res["sass"]
    loops = []
    for addr, text in insts:
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", text)
        if m and labels.get(m.group(1), addr + 1) <= addr:
            loops.append((labels[m.group(1)], addr))
    inner = [(lo, hi) for lo, hi in loops
             if not any((l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi for l2, h2 in loops)]
    streaming = [[t for a, t in insts if lo <= a <= hi] for lo, hi in inner]
    streaming = [b for b in streaming if any("LDG" in t for t in b) and any("STG" in t for t in b)]
    assert streaming
    for body in streaming:
        assert not [t for t in body if "LDL" in t or "STL" in t], body


if __name__ == "__main__":  # resource table for the docs / report
    print(f"ptxas: {PTXAS}")
    for spec in SPECS:
        ptx = compile_ptx(spec)
        if PTXAS:
            res, note = ptxas_resources(ptx, spec[0])
            print(f"{_id(spec):45s} regs {res['registers']:3d}  smem {res['smem']:5d} B  "
                  f"stack {res['stack']:3d} B  spills {res['spill_stores']}/"
                  f"{res['spill_loads']} B  {note}")
        else:
            print(f"{_id(spec):45s} PTX {len(ptx)} chars")
