"""GroupNorm forward, backward and per-sample parameter gradients as Numba CUDA kernels.

Every array the kernels see is a flat 1-D view of a tensor in one of two memory layouts:

* NCHW: element (n, c, s) at ``(n*C + c)*S + s``; group (n, g) is one contiguous run of
  ``D = Cg*S`` elements starting at ``(n*G + g)*D``.
* channels-last (N, spatial..., C): element (n, s, c) at ``(n*S + s)*C + c``.

Forward (``mean``/``rstd``/``y``):

* ``fwd_fused_nchw`` -- NCHW groups of at most THREADS*FUSED_ITEMS elements: one block per
  group keeps the group in registers (exact two-pass mean/M2), then applies. One read of x,
  one write of y, one launch.
* otherwise ``fwd_stats_nchw`` / ``fwd_stats_cl`` (partial (count, mean, M2) per block) ->
  ``fwd_apply_nchw`` / ``fwd_apply_cl``, each block first merging the partials of the
  group(s) it touches itself, in a fixed order (every block of a group gets the same bits;
  one of them writes mean/rstd): two launches, two passes over x, no grid-wide barrier.

Backward and per-sample parameter gradients share their sums (x and dy read once for them).
NCHW groups of at most THREADS*FUSED_ITEMS elements (float32 accumulation): ``bwd_fused_nchw``,
one block per group, reads x and dy once into shared memory, forms the per-channel sums, the
per-sample gradients and the dx coefficients on chip and writes dx once; ``bwd_params`` then
sums the per-sample gradients over n (two launches, three passes; per-sample gradients: one
launch, no dx). Otherwise:

1. ``bwd_sums_nchw`` / ``bwd_sums_cl`` -- per (n, c) and spatial chunk, partial sums of dz and
   dz*(x - mean), with dz = dy * act'(z) and z recomputed from x, mean, rstd, weight, bias.
2. ``bwd_finalize`` -- one block per group: ``dbias_per_sample = sum dz`` and
   ``dweight_per_sample = rstd * sum dz*(x - mean)`` per channel, and the two per-group
   coefficients of ``dx = rstd*w*dz + k1*(x - mean) + k0``.
   ``per_sample_param_grads`` stops here: two launches.
3. ``bwd_dx_nchw`` / ``bwd_dx_cl`` -- dx; its first blocks also sum the per-sample
   gradients over n into dweight/dbias (in order of n: the deterministic replacement for
   atomics). The backward is three launches.

Statistics: each thread accumulates shifted sums ``sum (x - k)`` and ``sum (x - k)^2`` (k:
the thread's first value, then its running mean) over FLUSH tiles of ITEMS values, and turns
them into a (count, mean, M2) partial merged with Chan's formula: one division per
FLUSH*ITEMS elements, none per element; exact (M2 = 0) for constant groups, and the offset
of the data never enters a square. Threads, blocks and partials are merged with Chan's
formula in a fixed order.

Tiles: each thread loads its ITEMS values of a tile into registers before it computes or
stores anything, so ITEMS loads are in flight per thread (the compiler may not move a load
above a store that could alias it).

Determinism: no atomics. Every reduction is a per-thread loop in index order followed by a
shared-memory tree of fixed shape, and partials are merged in index order, so the same
launch configuration gives bit-identical results.

Precision: ``acc`` is float32 for float16/bfloat16/float32 input and float64 for float64 input; all
statistics and sums are formed in ``acc`` and converted to the output's dtype on store
(dweight/dbias of half input may be float32 outputs: they are never rounded to half on the
way).

Activations come from ``gnnumba.activations`` (the one table), compiled here as inlined
device functions; the activation code is a compile-time constant of ``build``.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numba
import numpy as np
from numba import cuda

from .. import activations

# Device helpers are inlined at Numba-IR level (inline="always"), before typing: a device
# function typed as a separate dispatcher asks the driver for the current device's compute
# capability, which would stop ``compile_ptx`` from working on a machine without a GPU.
_device = cuda.jit(device=True, inline="always")

# Indices of the streamed arrays are cast to unsigned: Numba then skips the negative-index
# wraparound (5 integer instructions per access in the SASS of every hot loop). The cast is
# free (same bits) and the indices are never negative.
U = numba.uint64


def _jit(**options):
    """``cuda.jit`` with code-generation options, which the simulator does not take."""
    if numba.config.ENABLE_CUDASIM:
        return cuda.jit
    return cuda.jit(**options)
_act_forward = _device(activations.forward)
_act_derivative = _device(activations.derivative)


@functools.lru_cache(maxsize=None)
def build(threads: int, items: int, fused_items: int, flush: int, acc_name: str, act: int):
    """The kernels for one configuration (see the module docstring). ``act`` is an
    ``activations`` code."""
    T = threads
    K = items
    KF = fused_items
    F = flush
    acc = numba.float32 if acc_name == "float32" else numba.float64
    W = min(32, T)  # lanes that merge one group's partials (group_stats)
    # on-chip backward: a group's x - mean and dz in shared memory (float32 only: 2 x 16 KiB
    # at the defaults; float64 groups take the split path)
    SB = T * KF if acc_name == "float32" else 1
    ACT = act

    # ------------------------------------------------------------------ device helpers

    @_device
    def merge(na, ma, qa, nb, mb, qb):
        """Chan et al.'s merge of (count, mean, M2) partials, counts as floats (order
        matters: callers merge in a fixed order). Equal means give M2 = qa + qb exactly."""
        if nb == 0:
            return na, ma, qa
        if na == 0:
            return nb, mb, qb
        n = na + nb
        d = mb - ma
        f = nb / n
        return n, ma + d * f, qa + qb + d * d * na * f

    @_device
    def flush_shifted(cnt, mu, m2, k, nf, s1, s2):
        """Merge the shifted sums (nf values: s1 = sum(x - k), s2 = sum((x - k)^2)) into the
        running (cnt, mu, m2)."""
        if nf == 0:
            return cnt, mu, m2
        n = acc(nf)
        d = s1 / n
        q = s2 - s1 * d
        if q < 0:  # rounding can make a tiny variance negative
            q = acc(0)
        return merge(cnt, mu, m2, n, k + d, q)

    @_device
    def block_merge(tid, nthreads, cnt, mu, m2, s_n, s_m, s_q):
        """Merge one (count, mean, M2) per thread over the block; fixed tree; the result is
        returned to every thread."""
        cuda.syncthreads()  # the shared arrays may still be read from a previous call
        s_n[tid] = cnt
        s_m[tid] = mu
        s_q[tid] = m2
        cuda.syncthreads()
        stride = nthreads // 2
        while stride > 0:
            if tid < stride:
                n, m, q = merge(s_n[tid], s_m[tid], s_q[tid], s_n[tid + stride],
                                s_m[tid + stride], s_q[tid + stride])
                s_n[tid] = n
                s_m[tid] = m
                s_q[tid] = q
            cuda.syncthreads()
            stride //= 2
        return s_n[0], s_m[0], s_q[0]

    @_device
    def group_stats(shift, part, n, S, C, G, nsp, tpg, TC, eps, writer, mean, rstd, s_mu,
                    s_r, s_n, s_m, s_q):
        """Channels-last: mean and rstd of every group that channel tile blockIdx.y touches,
        into s_mu[gi], s_r[gi] (gi = group - first group of the tile), from fwd_stats_cl's
        partials. Each group is merged by a team of W = 32 lanes (lane l merges the partials
        of chunks l, l + W, ... in order, then a fixed tree over the lanes): the same bits in every block that needs the
        group, whichever team slot it lands in. ``writer``: this block writes mean/rstd of
        the groups whose first channel is in its tile."""
        tid = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        nthreads = cuda.blockDim.x * cuda.blockDim.y
        lane = tid % W
        team = tid // W
        Cg = C // G
        c0 = cuda.blockIdx.y * TC
        g0 = c0 // Cg
        ngr = (min(C, c0 + TC) - 1) // Cg - g0 + 1  # groups in this tile
        for r0 in range(0, ngr, nthreads // W):  # uniform trip count: barriers inside
            gi = r0 + team
            g = g0 + gi
            ng = n * G + g
            cnt = acc(0)
            mu = acc(0)
            m2 = acc(0)
            if gi < ngr:  # lane l: chunks l, l + W, ... in order, each chunk's tiles
                span = ((g + 1) * Cg - 1) // TC - (g * Cg) // TC + 1
                for kk in range(lane, nsp, W):
                    o = (ng * nsp * tpg + kk * tpg) * 3
                    for j in range(span):
                        cnt, mu, m2 = merge(cnt, mu, m2, part[o], part[o + 1], part[o + 2])
                        o += 3
            cuda.syncthreads()  # the previous round's results have been read
            s_n[tid] = cnt
            s_m[tid] = mu
            s_q[tid] = m2
            cuda.syncthreads()
            stride = W // 2
            while stride > 0:
                if lane < stride:
                    nn, mm, qq = merge(s_n[tid], s_m[tid], s_q[tid], s_n[tid + stride],
                                       s_m[tid + stride], s_q[tid + stride])
                    s_n[tid] = nn
                    s_m[tid] = mm
                    s_q[tid] = qq
                cuda.syncthreads()
                stride //= 2
            if lane == 0 and gi < ngr:
                mg = s_m[tid] + shift[ng]  # fwd_stats_cl's shift
                rg = acc(1) / math.sqrt(s_q[tid] / s_n[tid] + eps)
                s_mu[gi] = mg
                s_r[gi] = rg
                if writer and g * Cg >= c0:  # the group's first channel is in this tile
                    mean[ng] = mg
                    rstd[ng] = rg
        cuda.syncthreads()

    @_device
    def block_sum2(tid, nthreads, a, b, s_a, s_b):
        """Sums of a and b over the block (fixed tree), returned to every thread."""
        cuda.syncthreads()
        s_a[tid] = a
        s_b[tid] = b
        cuda.syncthreads()
        stride = nthreads // 2
        while stride > 0:
            if tid < stride:
                s_a[tid] += s_a[tid + stride]
                s_b[tid] += s_b[tid + stride]
            cuda.syncthreads()
            stride //= 2
        return s_a[0], s_b[0]

    @_device
    def coefficients(r, w, b, has_w, has_b, c):
        """y = act((x - mean)*a + sh) with a = gamma*rstd, sh = beta for channel c. The mean
        stays subtracted: the folded x*a + (beta - mean*a) cancels catastrophically when
        |mean|*rstd is large (a near-constant group with an offset)."""
        a = r
        if has_w:
            a = r * acc(w[c])
        sh = acc(0)
        if has_b:
            sh = acc(b[c])
        return a, sh

    @_device
    def activate(z):
        return _act_forward(ACT, z, acc(1))

    @_device
    def grad_pre(dy, z):
        """d loss / d z from d loss / d y."""
        if ACT == 0:
            return dy
        return dy * _act_derivative(ACT, z, acc(1))

    # ------------------------------------------------------------------ forward

    # At most 80 registers for float32 accumulation: 3 blocks of 256 threads per SM instead of
    # 2 (ptxas chose 82-86), without spills; a float64 tile needs its registers.
    @_jit(launch_bounds=(T, 3) if acc_name == "float32" and T == 256 else None)
    def fwd_fused_nchw(x, D, S, Cg, G, eps, w, b, has_w, has_b, y, mean, rstd):
        """grid (N*G,), block (T,). Whole group in registers: x read once."""
        s_a = cuda.shared.array(T, acc)
        s_b = cuda.shared.array(T, acc)
        v = cuda.local.array(KF, acc)
        tid = cuda.threadIdx.x
        ng = cuda.blockIdx.x
        xb = x[ng * D:ng * D + D]  # the group: indices below are group-relative
        yb = y[ng * D:ng * D + D]
        for j in range(KF):  # all loads first
            i = j * T + tid
            v[j] = acc(xb[U(i)]) if i < D else acc(0)
        s = acc(0)
        for j in range(KF):
            s += v[j]
        tot, _ = block_sum2(tid, T, s, acc(0), s_a, s_b)
        mu = tot / acc(D)
        q = acc(0)
        for j in range(KF):
            if j * T + tid < D:
                d = v[j] - mu
                q += d * d
        m2, _ = block_sum2(tid, T, q, acc(0), s_a, s_b)
        r = acc(1) / math.sqrt(m2 / acc(D) + eps)
        if tid == 0:
            mean[ng] = mu
            rstd[ng] = r
        g = ng % G
        # channel of element j*T + tid, advanced without a division per element
        c = g * Cg + tid // S
        so = tid % S
        dc = T // S
        ds = T % S
        for j in range(KF):
            if j * T + tid < D:
                a, sh = coefficients(r, w, b, has_w, has_b, c)
                yb[U(j * T + tid)] = activate((v[j] - mu) * a + sh)
            so += ds
            c += dc
            if so >= S:
                so -= S
                c += 1

    @cuda.jit
    def fwd_stats_nchw(x, D, chunk, nchunks, part, shift):
        """grid (N*G*nchunks,), block (T,). Partial (count, mean, M2) of elements
        [k*chunk, (k+1)*chunk) of group ng, written to part[ng, k, :]. Values are taken
        relative to the group's first element kg: the partials' means are then small
        numbers whose float32 rounding is relative to the spread of the data, not to its
        offset (the apply kernel adds kg back once, read from ``shift[ng]``: in place, x's
        first element may already hold y by then)."""
        s_n = cuda.shared.array(T, acc)
        s_m = cuda.shared.array(T, acc)
        s_q = cuda.shared.array(T, acc)
        v = cuda.local.array(K, acc)
        tid = cuda.threadIdx.x
        bid = cuda.blockIdx.x
        ng = bid // nchunks
        kk = bid - ng * nchunks
        kg = acc(x[ng * D])
        s0 = ng * D + kk * chunk
        m = min(chunk, D - kk * chunk)
        xb = x[s0:s0 + m]
        cnt = acc(0)
        mu = acc(0)
        m2 = acc(0)
        k = acc(0)  # the thread's shift (relative to kg): 0, then its running mean
        full = m - m % (T * K)
        for r0 in range(0, full, T * K * F):  # F whole tiles per flush, no bounds checks
            s1 = acc(0)
            s2 = acc(0)
            nf = 0
            for t0 in range(r0 + tid, min(r0 + T * K * F, full), T * K):
                for j in range(K):  # K independent loads; coalesced across the block
                    v[j] = acc(xb[U(t0 + j * T)])
                for j in range(K):
                    d = v[j] - kg - k
                    s1 += d
                    s2 += d * d
                nf += K
            cnt, mu, m2 = flush_shifted(cnt, mu, m2, k, nf, s1, s2)
            k = mu
        s1 = acc(0)
        s2 = acc(0)
        nf = 0
        for i in range(full + tid, m, T):  # the tail: fewer than K values per thread
            d = acc(xb[U(i)]) - kg - k
            s1 += d
            s2 += d * d
            nf += 1
        cnt, mu, m2 = flush_shifted(cnt, mu, m2, k, nf, s1, s2)
        cnt, mu, m2 = block_merge(tid, T, cnt, mu, m2, s_n, s_m, s_q)
        if tid == 0:
            o = (ng * nchunks + kk) * 3
            part[o] = cnt
            part[o + 1] = mu
            part[o + 2] = m2
            if kk == 0:
                shift[ng] = kg

    @cuda.jit
    def fwd_stats_cl(x, S, C, G, spos, nsb, tpg, part, shift):
        """grid (N*nsb, ceil(C/TC)), block (TC, TS). Thread column tx owns channel c of the
        tile and walks spatial positions [kk*spos, (kk+1)*spos) with stride TS (loads are
        coalesced along C), relative to its group's first element as in fwd_stats_nchw;
        columns are merged down the TS rows, then the channels of each group within the
        tile, in order. Partial of group (n, g) for this chunk and tile goes to slot
        kk*tpg + (tile - first tile of g)."""
        s_n = cuda.shared.array(T, acc)
        s_m = cuda.shared.array(T, acc)
        s_q = cuda.shared.array(T, acc)
        v = cuda.local.array(K, acc)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        TC = cuda.blockDim.x
        TS = cuda.blockDim.y
        bx = cuda.blockIdx.x
        n = bx // nsb
        kk = bx - n * nsb
        tile = cuda.blockIdx.y
        c = tile * TC + tx
        Cg = C // G
        cnt = acc(0)
        mu = acc(0)
        m2 = acc(0)
        if c < C:
            kg = acc(x[n * S * C + (c // Cg) * Cg])
            if kk == 0 and ty == 0 and c % Cg == 0:
                shift[n * G + c // Cg] = kg  # for the apply (x may be overwritten in place)
            m = min(spos, S - kk * spos)
            o0 = (n * S + kk * spos) * C + c
            xb = x[o0:o0 + (m - 1) * C + 1]
            step = TS * C
            full = m - m % (TS * K)
            k = acc(0)
            o = ty * C
            for r0 in range(0, full, TS * K * F):
                s1 = acc(0)
                s2 = acc(0)
                nf = 0
                for _ in range(r0 + ty, min(r0 + TS * K * F, full), TS * K):
                    for j in range(K):
                        v[j] = acc(xb[U(o + j * step)])
                    for j in range(K):
                        d = v[j] - kg - k
                        s1 += d
                        s2 += d * d
                    nf += K
                    o += K * step
                cnt, mu, m2 = flush_shifted(cnt, mu, m2, k, nf, s1, s2)
                k = mu
            s1 = acc(0)
            s2 = acc(0)
            nf = 0
            for s in range(full + ty, m, TS):
                d = acc(xb[U(s * C)]) - kg - k
                s1 += d
                s2 += d * d
                nf += 1
            cnt, mu, m2 = flush_shifted(cnt, mu, m2, k, nf, s1, s2)
        # merge down the TS rows of each column: slot ty*TC + tx, tree over ty
        s_n[ty * TC + tx] = cnt
        s_m[ty * TC + tx] = mu
        s_q[ty * TC + tx] = m2
        cuda.syncthreads()
        stride = TS // 2
        while stride > 0:
            if ty < stride:
                a = ty * TC + tx
                o = a + stride * TC
                nn, mm, qq = merge(s_n[a], s_m[a], s_q[a], s_n[o], s_m[o], s_q[o])
                s_n[a] = nn
                s_m[a] = mm
                s_q[a] = qq
            cuda.syncthreads()
            stride //= 2
        if ty == 0 and c < C:
            g = c // Cg
            if tx == 0 or c == g * Cg:  # first channel of group g in this tile
                pn = s_n[tx]
                pm = s_m[tx]
                pq = s_q[tx]
                j = tx + 1
                while j < TC and tile * TC + j < min(C, (g + 1) * Cg):
                    pn, pm, pq = merge(pn, pm, pq, s_n[j], s_m[j], s_q[j])
                    j += 1
                o = ((n * G + g) * nsb * tpg + kk * tpg + tile - (g * Cg) // TC) * 3
                part[o] = pn
                part[o + 1] = pm
                part[o + 2] = pq

    @cuda.jit
    def fwd_apply_nchw(x, part, shift, L, D, C, G, S, colchunk, R, eps, mean, rstd, w, b,
                       has_w, has_b, y):
        """grid (N*C/R, ceil(S/colchunk)), block (<= T,). R consecutive (n, c) rows of one
        group per block (R > 1 only for whole short rows), or one row slice. The block first
        merges the L partials of its group (same loop and tree in every block of the group,
        so each gets the same bits; the group's first block writes mean/rstd): no separate
        merge launch, and with R rows a block amortises that merge over R*S elements (one
        row of 256 per block, at SD-UNet 8x1280x16x16, was 4x slower than torch on an H100).
        Then per row whole tiles of K values per thread (loads first, no bounds checks),
        then the tail."""
        s_n = cuda.shared.array(T, acc)
        s_m = cuda.shared.array(T, acc)
        s_q = cuda.shared.array(T, acc)
        v = cuda.local.array(K, acc)
        row0 = cuda.blockIdx.x * R
        n = row0 // C
        c0 = row0 - n * C
        Cg = C // G
        ng = n * G + c0 // Cg
        cnt = acc(0)
        mu = acc(0)
        m2 = acc(0)
        for i in range(cuda.threadIdx.x, L, cuda.blockDim.x):
            o = (ng * L + i) * 3
            cnt, mu, m2 = merge(cnt, mu, m2, part[o], part[o + 1], part[o + 2])
        cnt, mu, m2 = block_merge(cuda.threadIdx.x, cuda.blockDim.x, cnt, mu, m2, s_n, s_m,
                                  s_q)
        mu += shift[ng]  # fwd_stats_nchw's shift (x[ng * D] may already be y in place)
        r = acc(1) / math.sqrt(m2 / cnt + eps)
        if cuda.threadIdx.x == 0 and cuda.blockIdx.y == 0 and c0 % Cg == 0:
            mean[ng] = mu
            rstd[ng] = r
        nt = cuda.blockDim.x
        tid = cuda.threadIdx.x
        m = min(colchunk, S - cuda.blockIdx.y * colchunk)
        full = m - m % (nt * K)
        for rr in range(R):
            a, sh = coefficients(r, w, b, has_w, has_b, c0 + rr)
            s0 = (row0 + rr) * S + cuda.blockIdx.y * colchunk
            xb = x[s0:s0 + m]  # the row's run: indices below are run-relative
            yb = y[s0:s0 + m]
            for t0 in range(tid, full, nt * K):
                for j in range(K):
                    v[j] = acc(xb[U(t0 + j * nt)])
                for j in range(K):
                    yb[U(t0 + j * nt)] = activate((v[j] - mu) * a + sh)
            for i in range(full + tid, m, nt):
                yb[U(i)] = activate((acc(xb[U(i)]) - mu) * a + sh)

    # ptxas unrolls the prologue's merge loop 4x (12 loads in flight) and took 104 registers
    # (25% occupancy); capped at 64 (50%), its spills stay in the prologue: the streaming
    # loops have no local-memory access (tests/test_cuda_ptx.py checks the SASS).
    @_jit(launch_bounds=(T, 4) if T == 256 else None)
    def fwd_apply_cl(x, part, shift, S, C, G, spos, nsb, nsp, tpg, eps, mean, rstd, w, b,
                     has_w, has_b, y):
        """grid (N*nsb, ceil(C/TC)), block (TC, TS). Prologue: the block merges the
        partials of every group its channel tile touches (``group_stats``; the block that
        holds a group's first channel at spatial block 0 writes mean/rstd): no separate
        merge launch. Then each thread owns one channel: whole tiles of K positions
        (stride TS), then the tail. ``nsp`` is the statistics grid's spatial blocks (the
        partials' layout), ``nsb`` this grid's."""
        s_n = cuda.shared.array(T, acc)
        s_m = cuda.shared.array(T, acc)
        s_q = cuda.shared.array(T, acc)
        s_mu = cuda.shared.array(T, acc)  # per group of the tile: mean, rstd
        s_r = cuda.shared.array(T, acc)
        v = cuda.local.array(K, acc)
        TC = cuda.blockDim.x
        TS = cuda.blockDim.y
        bx = cuda.blockIdx.x
        n = bx // nsb
        kk = bx - n * nsb
        Cg = C // G
        c0 = cuda.blockIdx.y * TC
        g0 = c0 // Cg
        group_stats(shift, part, n, S, C, G, nsp, tpg, TC, eps, kk == 0, mean, rstd, s_mu,
                    s_r, s_n, s_m, s_q)
        c = c0 + cuda.threadIdx.x
        if c < C:
            gi = c // Cg - g0
            mu = s_mu[gi]
            a, sh = coefficients(s_r[gi], w, b, has_w, has_b, c)
            m = min(spos, S - kk * spos)  # positions of this block
            o0 = (n * S + kk * spos) * C + c
            xb = x[o0:o0 + (m - 1) * C + 1]  # position s of the channel at s*C
            yb = y[o0:o0 + (m - 1) * C + 1]
            step = TS * C
            full = m - m % (TS * K)
            o = cuda.threadIdx.y * C
            for _ in range(cuda.threadIdx.y, full, TS * K):
                for j in range(K):
                    v[j] = acc(xb[U(o + j * step)])
                for j in range(K):
                    yb[U(o + j * step)] = activate((v[j] - mu) * a + sh)
                o += K * step
            for s in range(full + cuda.threadIdx.y, m, TS):
                yb[U(s * C)] = activate((acc(xb[U(s * C)]) - mu) * a + sh)

    @cuda.jit
    def fill_stats(mean, rstd, rstd_value):
        """Statistics of empty groups (no elements): mean 0 and the given rstd (NaN); also
        zero per-sample gradients (rstd_value 0)."""
        i = cuda.grid(1)
        if i < mean.shape[0]:
            mean[i] = 0
            rstd[i] = rstd_value

    # ------------------------------------------------------------------ backward

    @cuda.jit
    def bwd_fused_nchw(dy, x, D, S, Cg, G, TW, mean, rstd, w, b, has_w, has_b, want_dx, dx,
                       dweight_n, dbias_n):
        """grid (N*G,), block (T,). NCHW group of at most T*KF elements, on chip: x and dy
        are read once (all loads of a thread first), x - mean and dz kept in shared memory;
        teams of TW threads (a power of two) sum each channel's dz and dz*(x - mean) (lane
        order, then a fixed tree), giving dweight/dbias_per_sample; the block sums them into
        the dx coefficients (fixed tree) and, if ``want_dx``, writes dx once. Float32
        accumulation only (float64 groups would not fit in shared memory)."""
        s_xc = cuda.shared.array(SB, acc)
        s_dz = cuda.shared.array(SB, acc)
        s_a = cuda.shared.array(T, acc)
        s_b = cuda.shared.array(T, acc)
        vx = cuda.local.array(KF, acc)
        vd = cuda.local.array(KF, acc)
        tid = cuda.threadIdx.x
        ng = cuda.blockIdx.x
        n = ng // G
        g = ng - n * G
        C = G * Cg
        mu = acc(mean[ng])
        r = acc(rstd[ng])
        xb = x[ng * D:ng * D + D]
        db = dy[ng * D:ng * D + D]
        for j in range(KF):  # all loads first
            i = j * T + tid
            if i < D:
                vx[j] = acc(xb[U(i)])
                vd[j] = acc(db[U(i)])
        cc = tid // S  # channel (within the group) and position of element j*T + tid
        so = tid - cc * S
        dc = T // S
        ds = T - dc * S
        for j in range(KF):
            i = j * T + tid
            if i < D:
                c = g * Cg + cc
                a, sh = coefficients(r, w, b, has_w, has_b, c)
                xc = vx[j] - mu
                s_xc[i] = xc
                s_dz[i] = grad_pre(vd[j], xc * a + sh)
            so += ds
            cc += dc
            if so >= S:
                so -= S
                cc += 1
        cuda.syncthreads()  # the group is in shared memory
        nteams = T // TW
        team = tid // TW
        lane = tid - team * TW
        A = acc(0)  # lane 0 of each team: its channels' sums, in channel order
        B = acc(0)
        for c0 in range(0, Cg, nteams):  # uniform trip count: barriers inside
            k = c0 + team
            t1 = acc(0)
            t2 = acc(0)
            if k < Cg:
                for sp in range(lane, S, TW):
                    dz = s_dz[k * S + sp]
                    t1 += dz
                    t2 += dz * s_xc[k * S + sp]
            cuda.syncthreads()
            s_a[tid] = t1
            s_b[tid] = t2
            cuda.syncthreads()
            stride = TW // 2
            while stride > 0:
                if lane < stride:
                    s_a[tid] += s_a[tid + stride]
                    s_b[tid] += s_b[tid + stride]
                cuda.syncthreads()
                stride //= 2
            if lane == 0 and k < Cg:
                c = g * Cg + k
                t1 = s_a[tid]
                t2 = s_b[tid] * r
                dbias_n[n * C + c] = t1
                dweight_n[n * C + c] = t2
                wc = acc(w[c]) if has_w else acc(1)
                A += wc * t1
                B += wc * t2
        A, B = block_sum2(tid, T, A, B, s_a, s_b)
        if want_dx:
            M = acc(D)
            q1 = -r * r * B / M
            q0 = -r * A / M
            ob = dx[ng * D:ng * D + D]
            cc = tid // S
            so = tid - cc * S
            for j in range(KF):
                i = j * T + tid
                if i < D:
                    rw = r * acc(w[g * Cg + cc]) if has_w else r
                    ob[U(i)] = rw * s_dz[i] + q1 * s_xc[i] + q0
                so += ds
                cc += dc
                if so >= S:
                    so -= S
                    cc += 1

    @cuda.jit
    def bwd_sums_nchw(dy, x, C, G, S, colchunk, mean, rstd, w, b, has_w, has_b, p):
        """grid (N*C, ncol), block (<= T,). p[row, k, 0] = sum dz, p[row, k, 1] =
        sum dz*(x - mean) over columns [k*colchunk, (k+1)*colchunk) of row (n, c)."""
        s_a = cuda.shared.array(T, acc)
        s_b = cuda.shared.array(T, acc)
        vx = cuda.local.array(K, acc)
        vd = cuda.local.array(K, acc)
        tid = cuda.threadIdx.x
        row = cuda.blockIdx.x
        kk = cuda.blockIdx.y
        n = row // C
        c = row - n * C
        ng = n * G + c // (C // G)
        mu = acc(mean[ng])
        a, sh = coefficients(acc(rstd[ng]), w, b, has_w, has_b, c)
        s0 = row * S + kk * colchunk
        m = min(colchunk, S - kk * colchunk)
        xb = x[s0:s0 + m]
        db = dy[s0:s0 + m]
        t1 = acc(0)
        t2 = acc(0)
        nt = cuda.blockDim.x  # a power of two <= T; short rows get small blocks
        full = m - m % (nt * K)
        for t0 in range(tid, full, nt * K):
            for j in range(K):  # 2K independent loads
                vx[j] = acc(xb[U(t0 + j * nt)])
                vd[j] = acc(db[U(t0 + j * nt)])
            for j in range(K):
                xc = vx[j] - mu
                dz = grad_pre(vd[j], xc * a + sh)
                t1 += dz
                t2 += dz * xc
        for i in range(full + tid, m, nt):
            xc = acc(xb[U(i)]) - mu
            dz = grad_pre(acc(db[U(i)]), xc * a + sh)
            t1 += dz
            t2 += dz * xc
        t1, t2 = block_sum2(tid, nt, t1, t2, s_a, s_b)
        if tid == 0:
            o = (row * cuda.gridDim.y + kk) * 2
            p[o] = t1
            p[o + 1] = t2

    @cuda.jit
    def bwd_sums_cl(dy, x, S, C, G, spos, nsb, mean, rstd, w, b, has_w, has_b, p):
        """grid (N*nsb, ceil(C/TC)), block (TC, TS): as bwd_sums_nchw, for channels-last;
        the TS rows of a column are summed with a fixed tree. Slot (n*C + c, kk)."""
        s_a = cuda.shared.array(T, acc)
        s_b = cuda.shared.array(T, acc)
        vx = cuda.local.array(K, acc)
        vd = cuda.local.array(K, acc)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        TC = cuda.blockDim.x
        TS = cuda.blockDim.y
        bx = cuda.blockIdx.x
        n = bx // nsb
        kk = bx - n * nsb
        c = cuda.blockIdx.y * TC + tx
        t1 = acc(0)
        t2 = acc(0)
        if c < C:
            ng = n * G + c // (C // G)
            mu = acc(mean[ng])
            a, sh = coefficients(acc(rstd[ng]), w, b, has_w, has_b, c)
            m = min(spos, S - kk * spos)
            o0 = (n * S + kk * spos) * C + c
            xb = x[o0:o0 + (m - 1) * C + 1]
            db = dy[o0:o0 + (m - 1) * C + 1]
            step = TS * C
            full = m - m % (TS * K)
            o = ty * C
            for _ in range(ty, full, TS * K):
                for j in range(K):
                    vx[j] = acc(xb[U(o + j * step)])
                    vd[j] = acc(db[U(o + j * step)])
                for j in range(K):
                    xc = vx[j] - mu
                    dz = grad_pre(vd[j], xc * a + sh)
                    t1 += dz
                    t2 += dz * xc
                o += K * step
            for s in range(full + ty, m, TS):
                xc = acc(xb[U(s * C)]) - mu
                dz = grad_pre(acc(db[U(s * C)]), xc * a + sh)
                t1 += dz
                t2 += dz * xc
        s_a[ty * TC + tx] = t1
        s_b[ty * TC + tx] = t2
        cuda.syncthreads()
        stride = TS // 2
        while stride > 0:
            if ty < stride:
                s_a[ty * TC + tx] += s_a[(ty + stride) * TC + tx]
                s_b[ty * TC + tx] += s_b[(ty + stride) * TC + tx]
            cuda.syncthreads()
            stride //= 2
        if ty == 0 and c < C:
            o = ((n * C + c) * nsb + kk) * 2
            p[o] = s_a[tx]
            p[o + 1] = s_b[tx]

    @cuda.jit
    def bwd_finalize(p, ncol, C, G, S, rstd, w, has_w, dweight_n, dbias_n, coef):
        """grid (N*G,), block (T,). Per channel c of group ng: dbias_per_sample = sum_k p0,
        dweight_per_sample = rstd * sum_k p1 (chunks in order); per group: the dx
        coefficients k1 = coef[2*ng], k0 = coef[2*ng + 1]."""
        s_a = cuda.shared.array(T, acc)
        s_b = cuda.shared.array(T, acc)
        tid = cuda.threadIdx.x
        ng = cuda.blockIdx.x
        n = ng // G
        g = ng - n * G
        Cg = C // G
        r = acc(rstd[ng])
        A = acc(0)
        B = acc(0)
        for j in range(tid, Cg, T):
            c = g * Cg + j
            row = n * C + c
            t1 = acc(0)
            t2 = acc(0)
            for kk in range(ncol):
                t1 += p[(row * ncol + kk) * 2]
                t2 += p[(row * ncol + kk) * 2 + 1]
            t2 *= r
            dbias_n[row] = t1
            dweight_n[row] = t2
            wc = acc(w[c]) if has_w else acc(1)
            A += wc * t1
            B += wc * t2
        A, B = block_sum2(tid, T, A, B, s_a, s_b)
        if tid == 0:
            M = acc(Cg) * acc(S)
            coef[2 * ng] = -r * r * B / M
            coef[2 * ng + 1] = -r * A / M

    @_device
    def param_sums(N, C, dweight_n, dbias_n, dweight, dbias, want_w, want_b):
        """The first ceil(C / block size) blocks of a dx grid: dweight[c] = sum_n
        dweight_per_sample[n, c] in order of n (dbias likewise): no atomics."""
        nthreads = cuda.blockDim.x * cuda.blockDim.y
        lb = cuda.blockIdx.x + cuda.blockIdx.y * cuda.gridDim.x
        c = lb * nthreads + cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        if (want_w or want_b) and c < C:
            t1 = acc(0)
            t2 = acc(0)
            for n in range(N):
                t1 += dweight_n[n * C + c]
                t2 += dbias_n[n * C + c]
            if want_w:
                dweight[c] = t1
            if want_b:
                dbias[c] = t2

    @cuda.jit
    def bwd_params(N, C, dweight_n, dbias_n, dweight, dbias, want_w, want_b):
        """grid (ceil(C/T),), block (T,). dweight/dbias from the per-sample gradients
        (``param_sums``), after ``bwd_fused_nchw``."""
        param_sums(N, C, dweight_n, dbias_n, dweight, dbias, want_w, want_b)

    @cuda.jit
    def bwd_dx_nchw(dy, x, N, C, G, S, colchunk, mean, rstd, w, b, has_w, has_b, coef, dx,
                    dweight_n, dbias_n, dweight, dbias, want_w, want_b):
        """grid (N*C, ncol), block (<= T,). dx = rstd*w*dz + k1*(x - mean) + k0, and
        dweight/dbias (``param_sums``)."""
        param_sums(N, C, dweight_n, dbias_n, dweight, dbias, want_w, want_b)
        vx = cuda.local.array(K, acc)
        vd = cuda.local.array(K, acc)
        row = cuda.blockIdx.x
        n = row // C
        c = row - n * C
        ng = n * G + c // (C // G)
        mu = acc(mean[ng])
        r = acc(rstd[ng])
        a, sh = coefficients(r, w, b, has_w, has_b, c)
        rw = r * acc(w[c]) if has_w else r
        q1 = coef[2 * ng]
        q0 = coef[2 * ng + 1]
        s0 = row * S + cuda.blockIdx.y * colchunk
        m = min(colchunk, S - cuda.blockIdx.y * colchunk)
        xb = x[s0:s0 + m]
        db = dy[s0:s0 + m]
        ob = dx[s0:s0 + m]
        nt = cuda.blockDim.x
        tid = cuda.threadIdx.x
        full = m - m % (nt * K)
        for t0 in range(tid, full, nt * K):
            for j in range(K):
                vx[j] = acc(xb[U(t0 + j * nt)])
                vd[j] = acc(db[U(t0 + j * nt)])
            for j in range(K):
                xc = vx[j] - mu
                dz = grad_pre(vd[j], xc * a + sh)
                ob[U(t0 + j * nt)] = rw * dz + q1 * xc + q0
        for i in range(full + tid, m, nt):
            xc = acc(xb[U(i)]) - mu
            dz = grad_pre(acc(db[U(i)]), xc * a + sh)
            ob[U(i)] = rw * dz + q1 * xc + q0

    @cuda.jit
    def bwd_dx_cl(dy, x, N, S, C, G, spos, nsb, mean, rstd, w, b, has_w, has_b, coef, dx,
                  dweight_n, dbias_n, dweight, dbias, want_w, want_b):
        """grid (N*nsb, ceil(C/TC)), block (TC, TS). As bwd_dx_nchw, channels-last."""
        param_sums(N, C, dweight_n, dbias_n, dweight, dbias, want_w, want_b)
        vx = cuda.local.array(K, acc)
        vd = cuda.local.array(K, acc)
        TC = cuda.blockDim.x
        TS = cuda.blockDim.y
        ty = cuda.threadIdx.y
        bx = cuda.blockIdx.x
        n = bx // nsb
        kk = bx - n * nsb
        c = cuda.blockIdx.y * TC + cuda.threadIdx.x
        if c < C:
            ng = n * G + c // (C // G)
            mu = acc(mean[ng])
            r = acc(rstd[ng])
            a, sh = coefficients(r, w, b, has_w, has_b, c)
            rw = r * acc(w[c]) if has_w else r
            q1 = coef[2 * ng]
            q0 = coef[2 * ng + 1]
            m = min(spos, S - kk * spos)
            o0 = (n * S + kk * spos) * C + c
            xb = x[o0:o0 + (m - 1) * C + 1]
            db = dy[o0:o0 + (m - 1) * C + 1]
            ob = dx[o0:o0 + (m - 1) * C + 1]
            step = TS * C
            full = m - m % (TS * K)
            o = ty * C
            for _ in range(ty, full, TS * K):
                for j in range(K):
                    vx[j] = acc(xb[U(o + j * step)])
                    vd[j] = acc(db[U(o + j * step)])
                for j in range(K):
                    xc = vx[j] - mu
                    dz = grad_pre(vd[j], xc * a + sh)
                    ob[U(o + j * step)] = rw * dz + q1 * xc + q0
                o += K * step
            for s in range(full + ty, m, TS):
                xc = acc(xb[U(s * C)]) - mu
                dz = grad_pre(acc(db[U(s * C)]), xc * a + sh)
                ob[U(s * C)] = rw * dz + q1 * xc + q0

    # ------------------------------------------------------------------ layout helper

    @cuda.jit
    def strided_copy(src, src_off, src_strides, dst, dst_off, dst_strides, shape):
        """dst[idx] = src[idx] for every multi-index of ``shape``; src/dst are flat 1-D
        spans and strides are in elements (any sign). Used once to bring arbitrary
        strides to a fast layout, and to write into an ``out`` of another layout."""
        i = cuda.grid(1)
        total = 1
        for d in range(len(shape)):
            total *= shape[d]
        if i < total:
            rem = i
            so = src_off
            do = dst_off
            for d in range(len(shape) - 1, -1, -1):
                q = rem // shape[d]
                idx = rem - q * shape[d]
                rem = q
                so += idx * src_strides[d]
                do += idx * dst_strides[d]
            dst[do] = src[so]

    return SimpleNamespace(**{k: v for k, v in locals().items()
                              if hasattr(v, "py_func") and not k.startswith("_")
                              and k in KERNELS})


KERNELS = ("fwd_fused_nchw", "fwd_stats_nchw", "fwd_stats_cl", "fwd_apply_nchw",
           "fwd_apply_cl", "fill_stats", "bwd_fused_nchw", "bwd_sums_nchw", "bwd_sums_cl",
           "bwd_finalize", "bwd_params", "bwd_dx_nchw", "bwd_dx_cl", "strided_copy")

# kernels whose code depends on the activation (the others are built once per dtype)
ACT_KERNELS = ("fwd_fused_nchw", "fwd_apply_nchw", "fwd_apply_cl", "bwd_fused_nchw",
               "bwd_sums_nchw",
               "bwd_sums_cl", "bwd_dx_nchw", "bwd_dx_cl")

# the kernels that stream the tensor, and how many tensors each streams in (for SASS figures)
STREAMED_INPUTS = {"fwd_fused_nchw": 1, "fwd_stats_nchw": 1, "fwd_stats_cl": 1,
                   "fwd_apply_nchw": 1, "fwd_apply_cl": 1, "bwd_fused_nchw": 2,
                   "bwd_sums_nchw": 2,
                   "bwd_sums_cl": 2, "bwd_dx_nchw": 2, "bwd_dx_cl": 2}


def kernel_names():
    """Names of the launchable kernels, in the order of the module docstring."""
    return list(KERNELS)


def signatures(dtype_name: str, out_name: str | None = None):
    """Argument types of every kernel as the host code launches them for input dtype
    ``dtype_name`` (float16/bfloat16/float32/float64); ``out_name`` is the dtype of dweight/dbias
    (x's by default; float32 for half input with float32 parameters). The PTX tests and
    ``benchmarks/cuda_sass.py`` compile each one."""
    from numba import types
    from numba.cuda import types as cuda_types

    def scalar(name):
        return cuda_types.bfloat16 if name == "bfloat16" else getattr(types, name)

    dt = scalar(dtype_name)
    acc = types.float64 if dtype_name == "float64" else types.float32
    v = types.Array(dt, 1, "C")  # x, y, dy, dx, weight, bias (flat views)
    o = types.Array(scalar(out_name or dtype_name), 1, "C")  # dweight, dbias
    st = types.Array(acc, 1, "C")  # mean, rstd, coefficients, per-sample grads, partials
    i, f, bo = types.int64, acc, types.boolean
    return {
        "fwd_fused_nchw": (v, i, i, i, i, f, v, v, bo, bo, v, st, st),
        "fwd_stats_nchw": (v, i, i, i, st, st),
        "fwd_stats_cl": (v, i, i, i, i, i, i, st, st),
        "fwd_apply_nchw": (v, st, st, i, i, i, i, i, i, i, f, st, st, v, v, bo, bo, v),
        "fwd_apply_cl": (v, st, st, i, i, i, i, i, i, i, f, st, st, v, v, bo, bo, v),
        "fill_stats": (st, st, f),
        "bwd_fused_nchw": (v, v, i, i, i, i, i, st, st, v, v, bo, bo, bo, v, st, st),
        "bwd_params": (i, i, st, st, o, o, bo, bo),
        "bwd_sums_nchw": (v, v, i, i, i, i, st, st, v, v, bo, bo, st),
        "bwd_sums_cl": (v, v, i, i, i, i, i, st, st, v, v, bo, bo, st),
        "bwd_finalize": (st, i, i, i, i, st, v, bo, st, st, st),
        "bwd_dx_nchw": (v, v, i, i, i, i, i, st, st, v, v, bo, bo, st, v, st, st, o, o, bo, bo),
        "bwd_dx_cl": (v, v, i, i, i, i, i, i, st, st, v, v, bo, bo, st, v, st, st, o, o, bo, bo),
        "strided_copy": (v, i, types.UniTuple(i, 4), v, i, types.UniTuple(i, 4),
                         types.UniTuple(i, 4)),
    }


def sass_specs(dtypes=("float16", "bfloat16", "float32", "float64"), acts=None):
    """Every specialisation ``benchmarks/cuda_sass.py`` and the PTX tests compile: per input
    dtype, kernel and (for ``ACT_KERNELS``) activation, with the default configuration."""
    from . import config

    acts = list(activations.CODES.items()) if acts is None else acts
    for dt in dtypes:
        acc = "float64" if dt == "float64" else "float32"
        for name in KERNELS:
            for act_name, code in (acts if name in ACT_KERNELS else [(None, 0)]):
                K = config.ITEMS * (2 if dt in ("float16", "bfloat16") else 1)  # launch.items
                ks = build(config.THREADS, K, config.FUSED_ITEMS, config.FLUSH,
                           acc, code)
                k = getattr(ks, name)
                yield dict(kernel=name, label=name + (f"-{act_name}" if act_name else ""),
                           dtype=dt, act=act_name, pyfunc=k.py_func,
                           launch_bounds=k.targetoptions.get("launch_bounds"),
                           sig=signatures(dt)[name], threads=config.THREADS,
                           itemsize=8 if dt == "float64" else 4 if dt == "float32" else 2,
                           inputs=STREAMED_INPUTS.get(name, 1))
