"""Launch plans of the CUDA kernels (pure host arithmetic, no GPU and no simulator needed):
launch counts per path, grids that fill the device from its SM count, channel tiles."""

import os

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("plans are tested with the real numba.cuda import", allow_module_level=True)
pytest.importorskip("numba.cuda")

from gnnumba.gpu import config, launch  # noqa: E402

CFG = launch._config_key()


def _blocks(grid):
    return grid if isinstance(grid, int) else grid[0] * grid[1]


@pytest.mark.parametrize("shape, layout, launches", [
    ((2, 1280, 8, 8), "nchw", ["fwd_fused_nchw"]),  # 40 x 64 = 2560 elements per group
    ((2, 1280, 16, 16), "nchw", ["fwd_stats_nchw", "fwd_apply_nchw"]),
    ((2, 1280, 8, 8), "cl", ["fwd_stats_cl", "fwd_apply_cl"]),
])
def test_forward_launches(shape, layout, launches):
    N, C, H, W = shape
    steps, _ = launch.forward_plan(N, C, H * W, 32, layout, 132, CFG, 4)
    assert [s[0] for s in steps] == launches


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_backward_is_three_launches(layout):
    steps, _ = launch.backward_plan(2, 320, 64 * 64, 32, layout, 132, CFG, 4)
    assert [s[0] for s in steps] == [f"bwd_sums_{layout}", "bwd_finalize", f"bwd_dx_{layout}"]


@pytest.mark.parametrize("C, H, teams", [(1280, 8, 8), (640, 8, 8), (64, 32, 2)])
def test_backward_on_chip_where_a_group_fits(C, H, teams):
    """NCHW groups of at most THREADS*FUSED_ITEMS elements (2x1280x8x8: 40 x 64 = 2560):
    one pass over x and dy and one over dx (bwd_fused_nchw), then the sums over n; the
    channels of a group are summed by up to 8 teams of 32 lanes. float64 (on_chip=False)
    and channels-last take the split path."""
    steps, nparts = launch.backward_plan(2, C, H * H, 32, "nchw", 132, CFG, 4)
    assert [s[0] for s in steps] == ["bwd_fused_nchw", "bwd_params"] and nparts == 0
    assert steps[0][3][-1] == config.THREADS // teams
    for layout, on_chip in (("nchw", False), ("cl", True)):
        steps, _ = launch.backward_plan(2, C, H * H, 32, layout, 132, CFG, 4, on_chip)
        assert steps[0][0] == f"bwd_sums_{layout}"


@pytest.mark.parametrize("shape, layout", [((2, 1280, 16, 16), "nchw"),
                                           ((8, 1280, 8, 8), "cl")])
def test_statistics_grid_fills_an_h100(shape, layout):
    """The two grids the review found too small (64 and 20 blocks on 132 SMs)."""
    N, C, H, W = shape
    steps, _ = launch.forward_plan(N, C, H * W, 32, layout, 132, CFG, 4)
    assert _blocks(steps[0][1]) >= 132, steps[0]


def test_grid_follows_the_sm_count():
    """Statistics blocks scale with the device (A100: 108 SMs, H100: 132)."""
    grids = [_blocks(launch.forward_plan(1, 32, 256 * 256, 32, "nchw", sms, CFG, 4)[0][0][1])
             for sms in (108, 132)]
    assert 108 <= grids[0] < grids[1] <= config.BLOCKS_PER_SM * 132


@pytest.mark.parametrize("C, G, TC, expected", [
    (1280, 32, 256, 2),  # groups of 40 channels: some straddle a tile boundary
    (256, 32, 256, 1),  # 8 channels per group, tiles of 256: each group in one tile
    (12, 2, 4, 2),  # 6 channels per group in tiles of 4: each group spans 2 tiles
    (20, 2, 4, 3),  # 10 channels per group: channels 0-9 span tiles 0-2, 10-19 tiles 2-4
])
def test_tiles_per_group(C, G, TC, expected):
    assert launch._tiles_per_group(C, G, TC) == expected


def test_half_types_keep_16_bytes_in_flight():
    """Twice the values per tile for 2-byte types: as many bytes in flight as float32."""
    import numpy as np

    assert launch.items(np.float16) * 2 == launch.items(np.float32) * 4 == 16


class _FakeMemory:
    """Device memory stand-in: DeviceNDArray with given gpu_data allocates nothing."""

    device_ctypes_pointer = type("Ptr", (), {"value": 1 << 20})()
    handle = 1 << 20
    owner = None

    def view(self, *args):
        return self


def test_numba_bfloat16_arrays_keep_their_dtype():
    """A Numba device array of ml_dtypes.bfloat16 says "<V2" in its array interface; the
    host side reads the dtype from the array itself and flattens it without the interface."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import numpy as np
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    bf16 = np.dtype(ml_dtypes.bfloat16)
    a = DeviceNDArray((2, 3, 4), (24, 8, 2), bf16, gpu_data=_FakeMemory())
    assert a.__cuda_array_interface__["typestr"] == "<V2"
    d = launch.DevArray(a, "x")
    assert (d.dtype, d.layout) == (bf16, launch.NCHW)
    flat = d.flat()
    assert flat == launch.Flat(1 << 20, 24, bf16)
    cl = DeviceNDArray((2, 3, 4), (24, 2, 6), bf16, gpu_data=_FakeMemory())  # channels-last
    assert launch.DevArray(cl, "x").layout == launch.CL


def test_launcher_cached_and_grid_warning_silenced():
    """A kernel's configured launcher is built once per (grid, block, stream), and Numba's
    "grid size < 128 blocks" performance warning, raised when it is built, does not reach
    the caller (small grids are deliberate here: one block per group on chip)."""
    import types
    import warnings

    from numba.core.errors import NumbaPerformanceWarning

    configured, calls = [], []

    class FakeKernel:
        def __getitem__(self, cfg):
            configured.append(cfg)
            warnings.warn("Grid size 4 will likely result in GPU under-utilization",
                          NumbaPerformanceWarning)
            return lambda *args: calls.append(args)

    ks = types.SimpleNamespace(k=FakeKernel())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(3):
            launch._launch(ks, "k", 4, 256, 0, i)
    assert configured == [(4, 256, 0)] and calls == [(0,), (1,), (2,)]


def _numba_params(ty, val):
    """What Numba's own launch path passes to the driver for one argument."""
    from numba.cuda.dispatcher import _Kernel

    kernel = type("K", (), {"extensions": [], "_prepare_args": _Kernel._prepare_args})()
    out = []
    kernel._prepare_args(ty, val, 0, [], out)
    return out


@pytest.mark.parametrize("value", [
    "flat float32", "flat float16", "flat bfloat16", 7, -3, True, False, 1.5,
    "float32 scalar", (4, -20, 3)], ids=str)
def test_direct_launch_packs_arguments_as_numba_does(value):
    """The direct launch (``launch._launch`` on a GPU) packs each argument kind exactly as
    Numba's ``_Kernel._prepare_args`` does for the type it infers, and infers that type."""
    import numpy as np
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    from numba.cuda.typing.typeof import Purpose, typeof

    if isinstance(value, str) and value.startswith("flat"):
        dtype = np.dtype(launch.BFLOAT16 if "bfloat16" in value else value.split()[1])
        numba_value = DeviceNDArray((24,), (dtype.itemsize,), dtype, gpu_data=_FakeMemory())
        value = launch.DevArray(numba_value, "x").flat()
    elif value == "float32 scalar":
        value = numba_value = np.float32(0.25)
    else:
        numba_value = value
    packer, ty = launch._packer(value)
    assert ty == typeof(numba_value, Purpose.argument)
    got = []
    packer(got, value)
    want = _numba_params(ty, numba_value)
    assert [type(v) for v in got] == [type(v) for v in want]
    assert [getattr(v, "value", v) for v in got] == [getattr(v, "value", v) for v in want]


def test_direct_launch_leaves_other_arguments_to_numba():
    """A Numba device array (not a ``Flat`` view) has no direct packing: that launch goes
    through Numba's configured launcher."""
    import numpy as np
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    a = DeviceNDArray((24,), (4,), np.dtype(np.float32), gpu_data=_FakeMemory())
    assert launch._packer(a) == (None, None)


@pytest.mark.parametrize("shape, G, R", [
    ((8, 1280, 16 * 16), 32, 8),  # 40 channels per group, rows of 256: 8 rows (2048 elements)
    ((8, 640, 32 * 32), 32, 2),
    ((2, 320, 64 * 64), 32, 1),  # long rows are split into column chunks instead
    ((2, 96, 33 * 33), 8, 1),  # rows of 1089: a second one would not fit
])
def test_apply_blocks_take_whole_short_rows_of_one_group(shape, G, R):
    """The NCHW apply block merges its group's partials first: short rows share that merge,
    R rows to a block, R dividing the group's channels so that a block never spans two
    groups, and every row covered once."""
    N, C, S = shape
    steps, _ = launch.forward_plan(N, C, S, G, "nchw", 132, CFG, 4)
    name, grid, _, dims = steps[-1]
    assert name == "fwd_apply_nchw" and dims[-1] == R
    assert (C // G) % R == 0 and grid[0] * R == N * C
