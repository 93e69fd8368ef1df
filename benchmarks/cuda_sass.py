"""Machine code of every CUDA kernel specialisation, without a GPU: the speed evidence.

    python benchmarks/cuda_sass.py [--cc 80 90] [--dtype float16 float32 ...] [--kernel NAME]
                                   [--shapes] [--json PATH]

Each kernel of ``gnnumba.gpu.kernels`` is compiled by Numba to PTX for sm_80 and sm_90,
assembled by ``ptxas`` and disassembled by ``nvdisasm`` (the ``nvidia-cuda-nvdisasm`` wheel).
Per kernel it prints registers, shared memory, stack, theoretical occupancy, and for its hot
loop (the innermost loop that loads the streamed tensors):

* ``inst``: SASS instructions in the loop body (static count; subroutines it CALLs, e.g. the
  software 64-bit division, are added once per call),
* ``elem``: elements of the streamed tensor(s) per iteration (global-load bytes in the body /
  item size / number of streamed inputs),
* ``inst/elem`` and ``ldg``: the issue cost per element and the global loads per iteration
  (loads issued before the first store of the body = loads a thread has in flight).

``--shapes`` adds a bandwidth prediction per SD-UNet shape on an H100 SXM (see ``predict``).

ptxas of CUDA 13.0 accepts PTX ISA up to 9.0 while NVVM 13.5 writes 9.5: the ``.version``
line is lowered (ptxas still rejects any instruction its ISA lacks). Figures are static: the
first GPU run (``benchmarks/bench_cuda.py``) is the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# sm_80 (A100) and sm_90 (H100): 64K registers, 2048 threads, 32 blocks per SM; shared memory
# per SM usable by blocks (carve-out maximum)
SM_LIMITS = {80: dict(regs=65536, threads=2048, blocks=32, smem=164 * 1024),
             90: dict(regs=65536, threads=2048, blocks=32, smem=228 * 1024)}


def _tool(name):
    path = shutil.which(name)
    if path:
        return path
    try:
        import nvidia

        for base in nvidia.__path__:
            for cand in Path(base).glob(f"*/bin/{name}"):
                return str(cand)
    except ImportError:
        pass
    return None


PTXAS = _tool("ptxas")
NVDISASM = _tool("nvdisasm")


def assemble(ptx: str, cc: int, tmp: str):
    """(cubin path, ptxas -v text)."""
    src = os.path.join(tmp, "k.ptx")
    cubin = os.path.join(tmp, "k.cubin")
    for _ in range(2):
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([PTXAS, f"-arch=sm_{cc}", "-v", src, "-o", cubin],
                              capture_output=True, text=True)
        m = re.search(r"Unsupported \.version (\S+); current version is '(\S+)'", proc.stderr)
        if proc.returncode == 0 or not m:
            break
        ptx = re.sub(r"^\.version \S+", f".version {m.group(2)}", ptx, flags=re.M)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return cubin, proc.stderr + proc.stdout


def resources(text: str) -> dict:
    res = {"registers": int(re.search(r"Used (\d+) registers", text).group(1))}
    for key, pat in [("smem", r"(\d+) bytes smem"), ("stack", r"(\d+) bytes stack frame"),
                     ("spills", r"(\d+) bytes spill stores")]:
        m = re.search(pat, text)
        res[key] = int(m.group(1)) if m else 0
    return res


def occupancy(cc: int, regs: int, smem: int, threads: int) -> float:
    """Theoretical occupancy (resident warps / 64): register file (allocated per warp in units
    of 256), shared memory, thread and block limits."""
    lim = SM_LIMITS[cc]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // (regs_per_warp * warps)
    by_smem = lim["smem"] // max(smem + 1024, 1)  # 1 KiB reserved per block
    by_threads = lim["threads"] // (warps * 32)
    blocks = min(by_regs, by_smem, by_threads, lim["blocks"])
    return blocks * warps / (lim["threads"] // 32)


_INST = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+|\$[\w$]+):")
_WIDTH = {"": 4, ".U8": 1, ".S8": 1, ".U16": 2, ".S16": 2, ".64": 8, ".128": 16}


def _ldg_bytes(op: str) -> int:
    m = re.match(r"LDG(\.E)?((?:\.\w+)*)", op)
    mods = m.group(2) if m else ""
    for key in (".128", ".64", ".U16", ".S16", ".U8", ".S8"):
        if key in mods.split(".") or key in mods:
            return _WIDTH[key]
    return 4


def disassemble(cubin: str):
    """[(addr, text)] of the kernel and {label: addr}, {subroutine label: size}."""
    out = subprocess.run([NVDISASM, "-c", cubin], capture_output=True, text=True, check=True)
    insts, labels = [], {}
    pending = []
    for line in out.stdout.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INST.search(line)
        if m:
            addr = int(m.group(1), 16)
            for p in pending:
                labels[p] = addr
            pending = []
            insts.append((addr, m.group(2)))
    return insts, labels


def hot_loop(insts, labels, itemsize: int, inputs: int):
    """Figures of the innermost loop (backward branch) with global loads, the one with the
    most loads, then the most instructions (the streaming loop, not its tail or the
    parameter-sum loop); for a kernel without such a loop, the whole kernel."""
    loops = []
    for addr, text in insts:
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", text)
        if m and labels.get(m.group(1), addr + 1) <= addr:
            loops.append((labels[m.group(1)], addr))
    def has_loads(lo, hi):
        return any(lo <= a <= hi and "LDG" in t for a, t in insts)

    best = None
    for lo, hi in loops:
        if any((l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi and has_loads(l2, h2)
               for l2, h2 in loops):
            continue  # an inner loop with loads is the hot one
        body = [t for a, t in insts if lo <= a <= hi]
        cand = _figures(body, itemsize, inputs)
        if cand and (best is None or (cand["ldg"], cand["inst"]) > (best["ldg"], best["inst"])):
            best = cand
    if best is None:  # fully unrolled (the on-chip kernel): the whole body
        best = _figures([t for _, t in insts], itemsize, inputs)
        if best:
            best["whole_kernel"] = True
    if best:
        best.pop("_bytes")
    return best


def _figures(body, itemsize, inputs):
    ldg = [t for t in body if "LDG" in t]
    if not ldg:
        return None
    nbytes = sum(_ldg_bytes(re.search(r"LDG\S*", t).group(0)) for t in ldg)
    first_store = next((i for i, t in enumerate(body) if "STG" in t), len(body))
    fig = dict(inst=len(body), ldg=len(ldg),
               ldg_before_store=sum(1 for t in body[:first_store] if "LDG" in t),
               calls=sum(1 for t in body if "CALL" in t),
               elem=nbytes / itemsize / inputs, _bytes=nbytes)
    fig["inst_per_elem"] = fig["inst"] / fig["elem"]
    return fig


def link(codes, cc: int, tmp: str, lto=False):
    """(cubin path, ptxas -v text) of the kernel linked with the CUDA C++ shims it calls
    (numba-cuda's bfloat16 conversions are ``__nv_bfloat16`` constructors compiled by NVRTC)
    through nvJitLink; ``lto``: LTO-IR inputs, as numba-cuda links them at load time when
    nvJitLink is installed (its default), so the shims are inlined before the SASS is
    counted (PTX inputs would keep them as calls)."""
    from cuda.bindings import nvjitlink

    opts = [f"-arch=sm_{cc}", "-verbose"] + (["-lto"] if lto else [])
    kind = nvjitlink.InputType.LTOIR if lto else nvjitlink.InputType.PTX
    h = nvjitlink.create(len(opts), opts)
    try:
        for i, code in enumerate(codes):
            code = getattr(code, "data", code)  # numba's LinkableCode wrappers
            data = code.encode() if isinstance(code, str) else bytes(code)
            nvjitlink.add_data(h, kind, data, len(data), f"m{i}")
        try:
            nvjitlink.complete(h)
        except nvjitlink.nvJitLinkError as e:
            log = bytearray(nvjitlink.get_error_log_size(h))
            nvjitlink.get_error_log(h, log)
            raise RuntimeError(f"{e}: {log.decode(errors='replace')}") from None
        info = bytearray(nvjitlink.get_info_log_size(h))
        nvjitlink.get_info_log(h, info)
        cubin = bytearray(nvjitlink.get_linked_cubin_size(h))
        nvjitlink.get_linked_cubin(h, cubin)
    finally:
        nvjitlink.destroy(h)
    path = os.path.join(tmp, "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    return path, info.decode(errors="replace")


def _nvrtc_ptx(src, name, cc, ltoir=False, lineinfo=False, debug=False):
    """PTX of a CUDA C++ shim through NVRTC's own bindings, with the include paths and
    options of ``numba.cuda.cudadrv.nvrtc.compile``: that one goes through cuda.core, which
    asks the driver's version (absent on a machine without a GPU) before compiling."""
    from cuda import pathfinder
    from cuda.bindings import nvrtc
    from numba.cuda.cuda_paths import get_cuda_paths
    from numba.cuda.cudadrv import nvrtc as nb_nvrtc

    root = os.path.dirname(os.path.dirname(os.path.abspath(nb_nvrtc.__file__)))
    includes = [os.path.join(root, "include", str(nvrtc.nvrtcVersion()[1])),
                get_cuda_paths()["include_dir"].info, os.path.join(root, "memory_management")]
    cccl = pathfinder.locate_nvidia_header_directory("cccl")
    if cccl is not None:
        includes.append(cccl.abs_path)
    if isinstance(src, str):
        src = src.encode()
    err, prog = nvrtc.nvrtcCreateProgram(src, name.encode(), 0, [], [])
    opts = [f"-arch=sm_{cc[0]}{cc[1]}".encode(), b"-rdc=true"]
    opts += [f"-I{d}".encode() for d in includes]
    if ltoir:
        opts.append(b"-dlto")
    err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC: {log.decode(errors='replace')}")
    get_size, get = ((nvrtc.nvrtcGetLTOIRSize, nvrtc.nvrtcGetLTOIR) if ltoir
                     else (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX))
    _, size = get_size(prog)
    out = b" " * size
    get(prog, out)
    nvrtc.nvrtcDestroyProgram(prog)
    return (out if ltoir else out.rstrip(b"\0 ")), ""


def analyse(spec, cc: int) -> dict:
    from unittest import mock

    from numba.cuda import compiler

    def compile_all(output):
        with mock.patch.object(compiler.nvrtc, "compile", _nvrtc_ptx):
            return compiler.compile_all(spec["pyfunc"], spec["sig"], device=False,
                                        abi="numba", cc=(cc // 10, cc % 10), output=output,
                                        launch_bounds=spec.get("launch_bounds"))[0]

    codes = compile_all("ptx")
    with tempfile.TemporaryDirectory() as tmp:
        if len(codes) == 1:
            cubin, text = assemble(codes[0], cc, tmp)
        else:  # calls into CUDA C++ shims (bfloat16): link-time optimised, as numba-cuda
            cubin, text = link(compile_all("ltoir"), cc, tmp, lto=True)
        res = resources(text)
        insts, labels = disassemble(cubin)
    res["occupancy"] = occupancy(cc, res["registers"], res["smem"], spec["threads"])
    if "_fused_" in spec["kernel"]:  # on chip: the tile loops are unrolled, the whole kernel
        res["loop"] = _figures([t for _, t in insts], spec["itemsize"], spec["inputs"])
        if res["loop"]:
            res["loop"].pop("_bytes")
            res["loop"]["whole_kernel"] = True
    else:
        res["loop"] = hot_loop(insts, labels, spec["itemsize"], spec["inputs"])
    res["total_inst"] = len(insts)
    res["sass"] = (insts, labels)  # for tests; not written to --json
    return res


# --------------------------------------------------------------------------- prediction
#
# A roofline with Little's law, per launch of a call's plan (``gnnumba.gpu.launch``), on an
# H100 SXM: time = max(bytes / effective bandwidth, instructions / issue rate) + the gap
# between dependent launches. The effective bandwidth is the copy bandwidth, or less when the
# resident threads cannot keep enough bytes in flight to cover the memory latency (loads in
# flight per thread from the SASS, resident threads from the grid and the occupancy).
# Assumptions, not measurements: the first GPU run replaces them.

H100 = dict(sms=132, copy_bw=3.0e12, latency=700e-9, issue=132 * 4 * 32 * 1.755e9 * 0.7,
            launch_gap=2.0e-6, threads_per_sm=2048)

SD_UNET = [(N, C, H) for N in (2, 8) for C, H in ((320, 64), (640, 32), (1280, 16), (1280, 8))]

# bytes each kernel streams per element, in units of the item size (reads + writes)
_TRAFFIC = {"fwd_fused_nchw": 2, "bwd_fused_nchw": 3, "fwd_stats_nchw": 1, "fwd_stats_cl": 1, "fwd_apply_nchw": 2,
            "fwd_apply_cl": 2, "bwd_sums_nchw": 2, "bwd_sums_cl": 2, "bwd_dx_nchw": 3,
            "bwd_dx_cl": 3}


def _kernel_time(row, elems, itemsize, grid_threads, hw=H100):
    from gnnumba.gpu.kernels import STREAMED_INPUTS

    base = row["kernel"].split("-")[0]
    lp = row.get("loop") or {}
    if base not in _TRAFFIC or not lp:
        return 0.0  # merges of per-group partials: small next to the launch gap
    nbytes = elems * _TRAFFIC[base] * itemsize
    resident = min(grid_threads, hw["sms"] * row["occupancy"] * hw["threads_per_sm"])
    bytes_per_load = lp["elem"] * STREAMED_INPUTS[base] * itemsize / lp["ldg"]
    in_flight = resident * max(lp["ldg_before_store"], 1) * bytes_per_load
    bw = min(hw["copy_bw"], in_flight / hw["latency"])
    return max(nbytes / bw, elems * lp["inst_per_elem"] / hw["issue"])


def predict(rows, kind, N, C, S, G, layout, dtype, act=None, before=False):
    """Predicted seconds, fraction of the copy bandwidth (ideal bytes / time / copy_bw) and
    launches of one forward or backward call, from the SASS rows (``analyse``) of its
    kernels. ``before``: the plan of the code before round 4 (channels-last forward: a
    separate ``fwd_finalize`` launch between statistics and apply; no on-chip backward)."""
    from gnnumba.gpu import config, launch

    K = config.ITEMS * (2 if dtype in ("float16", "bfloat16") else 1)
    args = (N, C, S, G, layout, H100["sms"], launch._config_key(), K)
    if kind == "forward":
        plan = launch.forward_plan(*args)[0]
    else:  # before round 4 no backward ran on chip
        plan = launch.backward_plan(*args, on_chip=dtype != "float64" and not before)[0]
    by = {(r["kernel"], r["dtype"], r["cc"]): r for r in rows}
    itemsize = 8 if dtype == "float64" else 4 if dtype == "float32" else 2
    t = 0.0
    steps = [(st[0], st[1], st[2]) for st in plan]
    if before and steps[0][0] == "fwd_stats_cl":
        steps.insert(1, ("fwd_finalize", N * G, 256))
    for name, grid, block in steps:
        row = by.get((f"{name}-{act}" if act else name, dtype, 90)) or by.get((name, dtype, 90))
        g = grid if isinstance(grid, int) else grid[0] * grid[1]
        b = block if isinstance(block, int) else block[0] * block[1]
        t += H100["launch_gap"] + (_kernel_time(row, N * C * S, itemsize, g * b) if row else 0)
    ideal = N * C * S * itemsize * (2 if kind == "forward" else 3)
    return t, ideal / t / H100["copy_bw"], len(steps)


def prediction_table(after, before=None):
    lines = [f"Predicted on an H100 SXM (model in benchmarks/cuda_sass.py; G=32, no "
             f"activation): fraction of copy bandwidth (launches, microseconds)",
             f"{'shape':16s} {'dtype':8s} {'layout':6s} {'fwd before':>17s} {'fwd after':>17s} "
             f"{'bwd before':>17s} {'bwd after':>17s}"]
    for N, C, H in SD_UNET:
        for dtype in ("float16", "float32"):
            for layout in ("nchw", "cl"):
                cells = []
                for kind in ("forward", "backward"):
                    for rows, old in ((before, True), (after, False)):
                        if rows is None:
                            cells.append(f"{'-':>17s}")
                            continue
                        t, frac, n = predict(rows, kind, N, C, H * H, 32, layout, dtype,
                                             before=old)
                        cells.append(f"{frac:5.0%} ({n}) {t * 1e6:6.1f}us")
                lines.append(f"{N}x{C}x{H}x{H}".ljust(16) + f" {dtype:8s} {layout:6s} "
                             + " ".join(cells))
    return "\n".join(lines)


def _specs(dtypes, only, acts):
    from gnnumba.gpu import kernels

    for spec in kernels.sass_specs(dtypes):
        if only and spec["kernel"] not in only:
            continue
        if acts and str(spec["act"]).lower() not in acts:
            continue
        yield spec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dtype", nargs="+",
                    default=["float16", "bfloat16", "float32", "float64"],
                    help="bfloat16's conversions are calls into numba-cuda's CUDA C++ shim: "
                    "its kernels are linked with the shim by nvJitLink (see link)")
    ap.add_argument("--kernel", nargs="*", default=None)
    ap.add_argument("--act", nargs="*", default=None, help="only these activations "
                    "(none, silu, relu, gelu)")
    ap.add_argument("--shapes", action="store_true", help="predicted bandwidth per SD-UNet "
                    "shape (H100 SXM model, see predict)")
    ap.add_argument("--from-json", help="skip compiling: predict from a --json file of "
                    "this script (implies --shapes)")
    ap.add_argument("--before-json", help="a --json file of the kernels before a change: "
                    "its predictions go beside (with the plan before round 4)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        print("cuda_sass needs the real numba.cuda: unset NUMBA_ENABLE_CUDASIM")
        return 1
    if not (PTXAS and NVDISASM):
        print(f"needs ptxas ({PTXAS}) and nvdisasm ({NVDISASM}): pip install "
              f"nvidia-cuda-nvdisasm (gnnumba[dev]) and a CUDA toolkit's ptxas")
        return 1
    if args.from_json:
        with open(args.from_json) as f:
            after = json.load(f)
        before = None
        if args.before_json:
            with open(args.before_json) as f:
                before = json.load(f)
        print(prediction_table(after, before))
        return 0
    rows = []
    hdr = (f"{'kernel':34s} {'dtype':7s} {'sm':>3s} {'regs':>4s} {'smem':>6s} {'stk':>4s} "
           f"{'occ':>5s} {'inst':>5s} {'elem':>5s} {'inst/elem':>9s} {'ldg':>4s} "
           f"{'inflight':>8s} {'calls':>5s}")
    print(hdr)
    for spec in _specs(args.dtype, args.kernel, [a.lower() for a in args.act or []]):
        for cc in args.cc:
            try:
                r = analyse(spec, cc)
            except RuntimeError as e:  # e.g. bfloat16's unresolved shim functions
                print(f"{spec['label']:34s} {spec['dtype']:7s} {cc:3d} not assembled: "
                      f"{str(e).strip().splitlines()[-1][:80]}")
                continue
            lp = r["loop"] or {}
            row = dict(kernel=spec["label"], dtype=spec["dtype"], cc=cc, **{k: v for k, v in
                       r.items() if k not in ("loop", "sass")}, loop=lp)
            rows.append(row)
            loop_txt = (f"{lp['inst']:5d} {lp['elem']:5.1f} {lp['inst_per_elem']:9.1f} "
                        f"{lp['ldg']:4d} {lp['ldg_before_store']:8d} {lp['calls']:5d}"
                        if lp else f"{'-':>5s} {'-':>5s} {'-':>9s} {'-':>4s} {'-':>8s} "
                                   f"{'-':>5s}")
            print(f"{spec['label']:34s} {spec['dtype']:7s} {cc:3d} {r['registers']:4d} "
                  f"{r['smem']:6d} {r['stack']:4d} {r['occupancy']:5.0%} {loop_txt}",
                  flush=True)
    if args.shapes:
        print()
        print(prediction_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
