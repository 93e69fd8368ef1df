"""Launch configuration of the CUDA kernels, in one place.

Tests lower these (``monkeypatch.setattr(gnnumba.gpu.config, "THREADS", 32)``) so that the
small inputs the simulator can afford still span several blocks, several tiles and several
partials per group. Kernels are built per value (``kernels.build``), so a change takes
effect on the next call. Results never depend on these values beyond rounding: every
partial result is merged in a fixed order.
"""

# Threads per block of every kernel (a power of two, 32..1024). 256 gives 8 resident blocks
# per SM on sm_80/sm_90 for the register counts ptxas reports (see tests/test_cuda_ptx.py),
# enough loads in flight to saturate HBM.
THREADS = 256

# Elements each thread loads per tile in the statistics kernels. The K loads of a tile are
# independent (memory-level parallelism) and a tile is reduced exactly in two passes from
# registers before one Chan merge, so the merge's division is paid once per K elements.
ITEMS = 4

# A group of at most THREADS * FUSED_ITEMS elements (NCHW) is normalised by ONE block that
# keeps it in registers: x is read once, y written once, one launch ("on-chip" path).
# Larger groups take the split path: stats (several blocks per group) -> finalize -> apply;
# its second read of x mostly hits L2 (50 MB on H100) when the tensor fits.
FUSED_ITEMS = 16

# Split path: aim for about this many blocks in the statistics / backward-sums grids
# (about 8 per SM on a 132-SM H100), so that N*G = 64 groups still fill the GPU ...
TARGET_BLOCKS = 1056

# ... but never give a block fewer than this many elements (per-block partials and their
# merge would then cost more than the reads they parallelise).
MIN_BLOCK_ELEMS = 8192

# Elements each thread handles (at least) in the elementwise apply / dx kernels.
APPLY_ITEMS = 8

# Channels-last kernels give each thread one channel of a tile of TC channels (a power of
# two, at least this many, chosen to waste the fewest threads on C): 32 float32 channels
# is a full 128-byte line per spatial position, so loads stay coalesced.
CL_MIN_TILE_C = 32
