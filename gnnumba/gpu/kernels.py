"""GroupNorm forward and backward as Numba ``@cuda.jit`` kernels.

Every array the kernels see is a flat 1-D view of a tensor in one of two memory layouts:

* NCHW: element (n, c, s) at ``(n*C + c)*S + s``; group (n, g) is one contiguous run of
  ``D = Cg*S`` elements starting at ``(n*G + g)*D``.
* channels-last (N, spatial..., C): element (n, s, c) at ``(n*S + s)*C + c``.

Forward (``mean``/``rstd``/``y``):

1. ``fwd_fused_nchw`` -- NCHW groups of at most THREADS*FUSED_ITEMS elements: one block per
   group keeps the group in registers; exact two-pass mean/M2 with block reductions, then
   applies. One read of x, one write of y, one launch.
2. otherwise three kernels:
   ``fwd_stats_nchw`` / ``fwd_stats_cl`` -- each block reduces a slice of one group (NCHW) or
   a channel tile x spatial chunk (channels-last, so loads stay coalesced along C) into
   (count, mean, M2) partials; ``fwd_finalize`` -- one block per group merges its partials
   with Chan's formula in a fixed order; ``fwd_apply_nchw`` / ``fwd_apply_cl`` -- y.

Backward (``dx``, per-sample ``dweight_n = sum dz*xhat`` and ``dbias_n = sum dz``, then
``dweight``/``dbias``):

1. ``bwd_sums_nchw`` / ``bwd_sums_cl`` -- per (n, c) and spatial chunk, partial sums of dz and
   dz*(x - mean), where dz = dy, or dy*silu'(z) with z recomputed from x, mean, rstd, weight
   and bias.
2. ``bwd_finalize`` -- one block per group: sums the chunks of each channel in order, writes
   the per-sample parameter gradients and the two per-group coefficients of
   ``dx = rstd*w*dz + k1*(x - mean) + k0``.
3. ``bwd_dx_nchw`` / ``bwd_dx_cl`` -- dx.  4. ``bwd_params`` -- dweight/dbias = sums over n.

Determinism: no atomics. Every reduction is a per-thread loop in index order followed by a
shared-memory tree of fixed shape, and partials are merged in index order, so a launch with
the same configuration gives bit-identical results.

Precision: ``acc`` is float32 for float16/float32 input and float64 for float64 input; all
statistics and sums are formed in ``acc`` and converted to the output dtype on store.
Within a thread, K values are reduced exactly in two passes before one Chan merge, so the
variance never comes from E[x^2] - E[x]^2.

Kernels are built by ``build(threads, items, fused_items, acc, silu)`` because shared and
local array sizes, the accumulation type and the activation are compile-time constants;
``numba.cuda.jit`` then specialises each kernel lazily on the array dtypes.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numba
from numba import cuda

# Device helpers are inlined at Numba-IR level (inline="always"), before typing: a device
# function typed as a separate dispatcher asks the driver for the current device's compute
# capability, which would stop ``compile_ptx`` from working on a machine without a GPU.
_device = cuda.jit(device=True, inline="always")


@functools.lru_cache(maxsize=None)
def build(threads: int, items: int, fused_items: int, acc_name: str, silu: bool):
    """The kernels for one launch configuration (see the module docstring)."""
    T = threads
    K = items
    KF = fused_items
    acc = numba.float32 if acc_name == "float32" else numba.float64
    SILU = silu

    # ------------------------------------------------------------------ device helpers

    @_device
    def merge(na, ma, qa, nb, mb, qb):
        """Chan et al.'s merge of (count, mean, M2) partials (order matters: callers merge
        in a fixed order)."""
        if nb == 0:
            return na, ma, qa
        if na == 0:
            return nb, mb, qb
        n = na + nb
        d = mb - ma
        f = acc(nb) / acc(n)
        return n, ma + d * f, qa + qb + d * d * acc(na) * f

    @_device
    def block_merge(tid, nthreads, cnt, mu, m2, s_n, s_m, s_q):
        """Merge one (count, mean, M2) per thread over the block; fixed tree; result in
        slot 0 (read after the final syncthreads by every thread)."""
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
    def block_sum2(tid, nthreads, a, b, s_a, s_b):
        """Sums of a and b over the block (fixed tree), returned to every thread."""
        cuda.syncthreads()  # s_a/s_b may still be read from a previous call
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
    def tile_merge(v, nloc, cnt, mu, m2):
        """Two-pass (mean, M2) of the nloc values in v[:nloc], merged into a running
        (cnt, mu, m2)."""
        if nloc == 0:
            return cnt, mu, m2
        s = acc(0)
        for j in range(K):
            if j < nloc:
                s += v[j]
        m = s / acc(nloc)
        q = acc(0)
        for j in range(K):
            if j < nloc:
                d = v[j] - m
                q += d * d
        return merge(cnt, mu, m2, nloc, m, q)

    @_device
    def scale_shift(r, w, b, has_w, has_b, c):
        """y = (x - mean)*a + sh is gamma*(x - mean)*rstd + beta for channel c. The mean stays
        subtracted: the folded x*a + (beta - mean*a) cancels catastrophically when |mean|*rstd
        is large (a near-constant group with an offset)."""
        a = r
        if has_w:
            a = r * acc(w[c])
        sh = acc(0)
        if has_b:
            sh = acc(b[c])
        return a, sh

    @_device
    def activate(z):
        if SILU:
            return z / (acc(1) + math.exp(-z))
        return z

    @_device
    def grad_pre(dy, z):
        """d loss / d z from d loss / d y."""
        if SILU:
            sg = acc(1) / (acc(1) + math.exp(-z))
            return dy * (sg * (acc(1) + z * (acc(1) - sg)))
        return dy

    # ------------------------------------------------------------------ forward

    @cuda.jit
    def fwd_fused_nchw(x, D, S, Cg, G, eps, w, b, has_w, has_b, y, mean, rstd):
        """grid (N*G,), block (T,). Whole group in registers: x read once."""
        s_a = cuda.shared.array(T, acc)
        s_b = cuda.shared.array(T, acc)
        v = cuda.local.array(KF, acc)
        tid = cuda.threadIdx.x
        ng = cuda.blockIdx.x
        base = ng * D
        s = acc(0)
        for j in range(KF):
            i = j * T + tid
            v[j] = acc(0)
            if i < D:
                v[j] = acc(x[base + i])
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
                a, sh = scale_shift(r, w, b, has_w, has_b, c)
                y[base + j * T + tid] = activate((v[j] - mu) * a + sh)
            so += ds
            c += dc
            if so >= S:
                so -= S
                c += 1

    @cuda.jit
    def fwd_stats_nchw(x, D, chunk, nchunks, pc, pm, pq):
        """grid (N*G*nchunks,), block (T,). Partial (count, mean, M2) of elements
        [k*chunk, (k+1)*chunk) of group ng, written to partial slot (ng, k)."""
        s_n = cuda.shared.array(T, numba.int64)
        s_m = cuda.shared.array(T, acc)
        s_q = cuda.shared.array(T, acc)
        v = cuda.local.array(K, acc)
        tid = cuda.threadIdx.x
        bid = cuda.blockIdx.x
        ng = bid // nchunks
        k = bid - ng * nchunks
        lo = k * chunk
        hi = min(lo + chunk, D)
        base = ng * D
        cnt = 0
        mu = acc(0)
        m2 = acc(0)
        for t0 in range(lo, hi, T * K):
            nloc = 0
            for j in range(K):  # coalesced: for each j, the block reads T consecutive values
                i = t0 + j * T + tid
                if i < hi:  # the valid j form a prefix, so v[:nloc] is filled
                    v[j] = acc(x[base + i])
                    nloc += 1
            cnt, mu, m2 = tile_merge(v, nloc, cnt, mu, m2)
        cnt, mu, m2 = block_merge(tid, T, cnt, mu, m2, s_n, s_m, s_q)
        if tid == 0:
            pc[ng, k] = cnt
            pm[ng, k] = mu
            pq[ng, k] = m2

    @cuda.jit
    def fwd_stats_cl(x, S, C, G, spos, nsb, pc, pm, pq):
        """grid (N*nsb, ceil(C/TC)), block (TC, TS). Thread column tx owns channel c of the
        tile and walks spatial positions [k*spos, (k+1)*spos) with stride TS (loads are
        coalesced along C). Writes the partial of channel c over chunk k to slot
        (n*G + g, k*Cg + c - g*Cg)."""
        s_n = cuda.shared.array(T, numba.int64)
        s_m = cuda.shared.array(T, acc)
        s_q = cuda.shared.array(T, acc)
        v = cuda.local.array(K, acc)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        TC = cuda.blockDim.x
        TS = cuda.blockDim.y
        bx = cuda.blockIdx.x
        n = bx // nsb
        k = bx - n * nsb
        c = cuda.blockIdx.y * TC + tx
        s0 = k * spos
        s1 = min(s0 + spos, S)
        cnt = 0
        mu = acc(0)
        m2 = acc(0)
        if c < C:
            base = n * S * C + c
            for t0 in range(s0 + ty, s1, TS * K):
                nloc = 0
                for j in range(K):
                    s = t0 + j * TS
                    if s < s1:
                        v[j] = acc(x[base + s * C])
                        nloc += 1
                cnt, mu, m2 = tile_merge(v, nloc, cnt, mu, m2)
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
            Cg = C // G
            g = c // Cg
            slot = k * Cg + c - g * Cg
            pc[n * G + g, slot] = s_n[tx]
            pm[n * G + g, slot] = s_m[tx]
            pq[n * G + g, slot] = s_q[tx]

    @cuda.jit
    def fwd_finalize(pc, pm, pq, eps, mean, rstd):
        """grid (N*G,), block (T,). Merges the L partials of group ng in a fixed order."""
        s_n = cuda.shared.array(T, numba.int64)
        s_m = cuda.shared.array(T, acc)
        s_q = cuda.shared.array(T, acc)
        tid = cuda.threadIdx.x
        ng = cuda.blockIdx.x
        L = pc.shape[1]
        cnt = 0
        mu = acc(0)
        m2 = acc(0)
        for i in range(tid, L, T):
            cnt, mu, m2 = merge(cnt, mu, m2, pc[ng, i], pm[ng, i], pq[ng, i])
        cnt, mu, m2 = block_merge(tid, T, cnt, mu, m2, s_n, s_m, s_q)
        if tid == 0:
            mean[ng] = mu
            rstd[ng] = acc(1) / math.sqrt(m2 / acc(cnt) + eps)

    @cuda.jit
    def fwd_apply_nchw(x, C, G, S, colchunk, mean, rstd, w, b, has_w, has_b, y):
        """grid (N*C, ceil(S/colchunk)), block (<= T,). One (n, c) row slice per block."""
        row = cuda.blockIdx.x
        n = row // C
        c = row - n * C
        ng = n * G + c // (C // G)
        mu = acc(mean[ng])
        a, sh = scale_shift(acc(rstd[ng]), w, b, has_w, has_b, c)
        s0 = cuda.blockIdx.y * colchunk
        s1 = min(s0 + colchunk, S)
        base = row * S
        for s in range(s0 + cuda.threadIdx.x, s1, cuda.blockDim.x):
            y[base + s] = activate((acc(x[base + s]) - mu) * a + sh)

    @cuda.jit
    def fwd_apply_cl(x, S, C, G, spos, nsb, mean, rstd, w, b, has_w, has_b, y):
        """grid (N*nsb, ceil(C/TC)), block (TC, TS). Thread owns one channel."""
        TC = cuda.blockDim.x
        bx = cuda.blockIdx.x
        n = bx // nsb
        k = bx - n * nsb
        c = cuda.blockIdx.y * TC + cuda.threadIdx.x
        if c < C:
            ng = n * G + c // (C // G)
            mu = acc(mean[ng])
            a, sh = scale_shift(acc(rstd[ng]), w, b, has_w, has_b, c)
            s0 = k * spos
            s1 = min(s0 + spos, S)
            base = n * S * C + c
            for s in range(s0 + cuda.threadIdx.y, s1, cuda.blockDim.y):
                y[base + s * C] = activate((acc(x[base + s * C]) - mu) * a + sh)

    @cuda.jit
    def fill_stats(mean, rstd, rstd_value):
        """Statistics of empty groups (no elements): mean 0 and the given rstd (NaN)."""
        i = cuda.grid(1)
        if i < mean.shape[0]:
            mean[i] = 0
            rstd[i] = rstd_value

    # ------------------------------------------------------------------ backward

    @cuda.jit
    def bwd_sums_nchw(dy, x, C, G, S, colchunk, mean, rstd, w, b, has_w, has_b, p1, p2):
        """grid (N*C, ncol), block (<= T,). p1[row, k] = sum dz, p2[row, k] = sum dz*(x-mean)
        over columns [k*colchunk, (k+1)*colchunk) of row (n, c)."""
        s_a = cuda.shared.array(T, acc)
        s_b = cuda.shared.array(T, acc)
        tid = cuda.threadIdx.x
        row = cuda.blockIdx.x
        k = cuda.blockIdx.y
        n = row // C
        c = row - n * C
        ng = n * G + c // (C // G)
        mu = acc(mean[ng])
        a, sh = scale_shift(acc(rstd[ng]), w, b, has_w, has_b, c)
        s0 = k * colchunk
        s1 = min(s0 + colchunk, S)
        base = row * S
        t1 = acc(0)
        t2 = acc(0)
        nt = cuda.blockDim.x  # a power of two <= T; short rows get small blocks
        for s in range(s0 + tid, s1, nt):
            xv = acc(x[base + s])
            dz = grad_pre(acc(dy[base + s]), (xv - mu) * a + sh)
            t1 += dz
            t2 += dz * (xv - mu)
        t1, t2 = block_sum2(tid, nt, t1, t2, s_a, s_b)
        if tid == 0:
            p1[row, k] = t1
            p2[row, k] = t2

    @cuda.jit
    def bwd_sums_cl(dy, x, S, C, G, spos, nsb, mean, rstd, w, b, has_w, has_b, p1, p2):
        """grid (N*nsb, ceil(C/TC)), block (TC, TS): as bwd_sums_nchw, for channels-last;
        the TS rows of a column are summed with a fixed tree."""
        s_a = cuda.shared.array(T, acc)
        s_b = cuda.shared.array(T, acc)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        TC = cuda.blockDim.x
        TS = cuda.blockDim.y
        bx = cuda.blockIdx.x
        n = bx // nsb
        k = bx - n * nsb
        c = cuda.blockIdx.y * TC + tx
        t1 = acc(0)
        t2 = acc(0)
        if c < C:
            ng = n * G + c // (C // G)
            mu = acc(mean[ng])
            a, sh = scale_shift(acc(rstd[ng]), w, b, has_w, has_b, c)
            s0 = k * spos
            s1 = min(s0 + spos, S)
            base = n * S * C + c
            for s in range(s0 + ty, s1, TS):
                xv = acc(x[base + s * C])
                dz = grad_pre(acc(dy[base + s * C]), (xv - mu) * a + sh)
                t1 += dz
                t2 += dz * (xv - mu)
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
            p1[n * C + c, k] = s_a[tx]
            p2[n * C + c, k] = s_b[tx]

    @cuda.jit
    def bwd_finalize(p1, p2, C, G, S, rstd, w, has_w, dweight_n, dbias_n, k1, k0):
        """grid (N*G,), block (T,). Per channel c of group ng: dbias_n = sum_k p1,
        dweight_n = rstd * sum_k p2 (chunks in order); per group: k1, k0."""
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
            for k in range(p1.shape[1]):
                t1 += p1[row, k]
                t2 += p2[row, k]
            t2 *= r
            dbias_n[row] = t1
            dweight_n[row] = t2
            wc = acc(w[c]) if has_w else acc(1)
            A += wc * t1
            B += wc * t2
        A, B = block_sum2(tid, T, A, B, s_a, s_b)
        if tid == 0:
            M = acc(Cg * S)
            k1[ng] = -r * r * B / M
            k0[ng] = -r * A / M

    @cuda.jit
    def bwd_dx_nchw(dy, x, C, G, S, colchunk, mean, rstd, w, b, has_w, has_b, k1, k0, dx):
        """grid (N*C, ncol), block (<= T,). dx = rstd*w*dz + k1*(x - mean) + k0."""
        row = cuda.blockIdx.x
        n = row // C
        c = row - n * C
        ng = n * G + c // (C // G)
        mu = acc(mean[ng])
        r = acc(rstd[ng])
        a, sh = scale_shift(r, w, b, has_w, has_b, c)
        rw = r * acc(w[c]) if has_w else r
        q1 = k1[ng]
        q0 = k0[ng]
        s0 = cuda.blockIdx.y * colchunk
        s1 = min(s0 + colchunk, S)
        base = row * S
        for s in range(s0 + cuda.threadIdx.x, s1, cuda.blockDim.x):
            xv = acc(x[base + s])
            dz = grad_pre(acc(dy[base + s]), (xv - mu) * a + sh)
            dx[base + s] = rw * dz + q1 * (xv - mu) + q0

    @cuda.jit
    def bwd_dx_cl(dy, x, S, C, G, spos, nsb, mean, rstd, w, b, has_w, has_b, k1, k0, dx):
        """grid (N*nsb, ceil(C/TC)), block (TC, TS). As bwd_dx_nchw, channels-last."""
        TC = cuda.blockDim.x
        bx = cuda.blockIdx.x
        n = bx // nsb
        k = bx - n * nsb
        c = cuda.blockIdx.y * TC + cuda.threadIdx.x
        if c < C:
            ng = n * G + c // (C // G)
            mu = acc(mean[ng])
            r = acc(rstd[ng])
            a, sh = scale_shift(r, w, b, has_w, has_b, c)
            rw = r * acc(w[c]) if has_w else r
            q1 = k1[ng]
            q0 = k0[ng]
            s0 = k * spos
            s1 = min(s0 + spos, S)
            base = n * S * C + c
            for s in range(s0 + cuda.threadIdx.y, s1, cuda.blockDim.y):
                xv = acc(x[base + s * C])
                dz = grad_pre(acc(dy[base + s * C]), (xv - mu) * a + sh)
                dx[base + s * C] = rw * dz + q1 * (xv - mu) + q0

    @cuda.jit
    def bwd_params(dweight_n, dbias_n, N, C, dweight, dbias, want_w, want_b):
        """grid (ceil(C/T),), block (T,). dweight[c] = sum_n dweight_n[n, c] in order of n
        (and dbias likewise): the deterministic replacement for atomics."""
        c = cuda.grid(1)
        if c < C:
            t1 = acc(0)
            t2 = acc(0)
            for n in range(N):
                t1 += dweight_n[n * C + c]
                t2 += dbias_n[n * C + c]
            if want_w:
                dweight[c] = t1
            if want_b:
                dbias[c] = t2

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

    return SimpleNamespace(**{k: v for k, v in locals().items() if hasattr(v, "py_func")})


def kernel_names():
    """Names of the launchable kernels, in the order of the module docstring."""
    return ["fwd_fused_nchw", "fwd_stats_nchw", "fwd_stats_cl", "fwd_finalize",
            "fwd_apply_nchw", "fwd_apply_cl", "fill_stats", "bwd_sums_nchw", "bwd_sums_cl",
            "bwd_finalize", "bwd_dx_nchw", "bwd_dx_cl", "bwd_params", "strided_copy"]


def signatures(dtype_name: str):
    """Argument types of every kernel as the host code launches them for input dtype
    ``dtype_name`` (float16/float32/float64); the PTX tests compile each one."""
    from numba import types

    dt = getattr(types, dtype_name)
    acc = types.float64 if dtype_name == "float64" else types.float32
    v = types.Array(dt, 1, "C")  # x, y, dy, dx, weight, bias (flat views)
    st = types.Array(acc, 1, "C")  # mean, rstd, k1, k0, per-sample grads
    pa = types.Array(acc, 2, "C")  # partials
    pc = types.Array(types.int64, 2, "C")
    i, f, bo = types.int64, acc, types.boolean
    return {
        "fwd_fused_nchw": (v, i, i, i, i, f, v, v, bo, bo, v, st, st),
        "fwd_stats_nchw": (v, i, i, i, pc, pa, pa),
        "fwd_stats_cl": (v, i, i, i, i, i, pc, pa, pa),
        "fwd_finalize": (pc, pa, pa, f, st, st),
        "fwd_apply_nchw": (v, i, i, i, i, st, st, v, v, bo, bo, v),
        "fwd_apply_cl": (v, i, i, i, i, i, st, st, v, v, bo, bo, v),
        "fill_stats": (st, st, f),
        "bwd_sums_nchw": (v, v, i, i, i, i, st, st, v, v, bo, bo, pa, pa),
        "bwd_sums_cl": (v, v, i, i, i, i, i, st, st, v, v, bo, bo, pa, pa),
        "bwd_finalize": (pa, pa, i, i, i, st, v, bo, st, st, st, st),
        "bwd_dx_nchw": (v, v, i, i, i, i, st, st, v, v, bo, bo, st, st, v),
        "bwd_dx_cl": (v, v, i, i, i, i, i, st, st, v, v, bo, bo, st, st, v),
        "bwd_params": (st, st, i, i, v, v, bo, bo),
        "strided_copy": (v, i, types.UniTuple(i, 4), v, i, types.UniTuple(i, 4),
                         types.UniTuple(i, 4)),
    }
