"""Launch configuration of the CUDA kernels, in one place.

Tests lower these (``monkeypatch.setattr(gnnumba.gpu.config, "THREADS", 32)``) so that the
small inputs the simulator can afford still span several blocks, several tiles and several
partials per group. Kernels are built per value (``kernels.build``), so a change takes
effect on the next call. Results never depend on these values beyond rounding: every
partial result is merged in a fixed order.
"""

# Threads per block of every kernel (a power of two, 32..1024). 256 gives 6-8 resident
# blocks per SM on sm_80/sm_90 for the register counts ptxas reports (see
# benchmarks/cuda_sass.py), with ITEMS loads in flight per thread.
THREADS = 256

# Elements each thread loads per tile in every streaming kernel (statistics, apply, backward
# sums, dx): the K loads of a tile are issued before any of them is used or any store is made,
# so K loads per thread are in flight (memory-level parallelism).
ITEMS = 4

# The statistics kernels keep shifted sums for FLUSH tiles (FLUSH*ITEMS values per thread)
# before turning them into a (count, mean, M2) partial with one division and a Chan merge;
# the next tiles are shifted by the running mean. Larger: fewer divisions; smaller: shorter
# float32 sums.
FLUSH = 8

# A group of at most THREADS * FUSED_ITEMS elements (NCHW) is normalised by ONE block that
# keeps it in registers: x is read once, y written once, one launch ("on-chip" path); its
# backward (float32 accumulation) keeps x - mean and dz in shared memory (2 x 16 KiB at the
# defaults): x and dy read once, dx written once. Larger groups take the split path:
# stats (several blocks per group) -> apply (merging the partials first); its second read
# of x mostly hits L2 (50 MB on H100) when the tensor fits.
FUSED_ITEMS = 16

# Split path: aim for about BLOCKS_PER_SM blocks per streaming multiprocessor in the
# statistics / backward-sums grids, so that N*G = 64 groups still fill the GPU. The SM count
# is the device's (MULTIPROCESSOR_COUNT: 108 on an A100, 132 on an H100 SXM); the simulator
# has none and uses FALLBACK_SM_COUNT.
BLOCKS_PER_SM = 8
FALLBACK_SM_COUNT = 4

# ... but never give a block fewer than this many elements (per-block partials and their
# merge would then cost more than the reads they parallelise). 2048 is 8 per thread of a
# 256-thread block: SD-UNet 2x1280x16x16 gets 320 statistics blocks, not 64 (8192 left
# half of an H100's SMs idle there).
MIN_BLOCK_ELEMS = 2048

# Elements each thread handles (at least) in the elementwise apply / dx kernels.
APPLY_ITEMS = 8

# Channels-last kernels give each thread one channel of a tile of TC channels (a power of
# two, at least this many, chosen to waste the fewest threads on C): 32 float32 channels
# is a full 128-byte line per spatial position, so loads stay coalesced.
CL_MIN_TILE_C = 32
