"""Tunables for the kernels, in one place.

Tests lower these (``monkeypatch.setattr(config, "CPU_CHUNK", 64)``) so that small inputs
still exercise the chunked and split code paths. Results never depend on the thread count:
every blocking below is a fixed constant, and partial results are merged in a fixed order.
"""

# CPU, NCHW layout: a group is reduced in chunks of this many elements. Each chunk is read
# twice (mean, then squared deviations) while it sits in L1 (16 KiB of float32), and the
# chunks are merged with Chan's formula. One DRAM read, numerically stable.
CPU_CHUNK = 4096

# CPU, channels-last layout: a sample is cut into blocks of whole spatial positions holding
# about this many elements; each block is one task of the parallel loops (per-channel
# accumulators are vectorised over C). 512 KiB of float32: the statistics read a block twice
# and it stays in a 1 MiB L2 between the passes; larger blocks spread the per-block
# per-channel work (shifts, flushes, group sums) over more positions: 32768 elements took
# 136 us for the statistics of 8x2048x7x7, 131072 68 us (2 threads).
CPU_CL_BLOCK = 131072

# CPU, NCHW layout: a group whose bytes fit in this budget is normalised right after its
# statistics while it is still in L2 ("fused" path: one DRAM read, one write). Larger groups,
# or too few groups to keep every thread busy, take the "split" path, which spreads the chunks
# of every group over all threads. Both paths give bit-identical results.
CPU_FUSED_MAX_BYTES = 512 * 1024
# Below this many elements (torch's grain size) the NCHW kernels run serially on the calling
# thread: at (1, 32, 8, 8) the parallel kernel takes ~5.2 us against ~3.2 us serially, and under
# load a parallel region waits for a core another process holds.
CPU_SERIAL_MAX_ELEMENTS = 32768
CPU_FUSED_MIN_TASKS_PER_THREAD = 4
# Channels-last: one task per sample in one parallel region ("fused") up to this many bytes
# per sample (x, and dy in the backward); larger samples are spread block by block ("split").
CPU_CL_FUSED_MAX_BYTES = 64 << 20

# Kernel outputs (gnnumba.cpu.pool): from this size up, freed output buffers are kept and
# reused (their pages stay mapped); at most this many bytes of free buffers are kept.
CPU_POOL_MIN_BYTES = 256 << 10
CPU_POOL_MAX_FREE_BYTES = 512 << 20
# A new output buffer of at least this many bytes has its pages mapped, on the calling thread,
# before a parallel kernel writes it (see gnnumba.cpu.pool._new); smaller ones are left to
# fault in: touching them cost 35 us at 2x320x64x64 float32 (10 MiB), 12% of the forward.
CPU_PREFAULT_MIN_BYTES = 32 << 20
