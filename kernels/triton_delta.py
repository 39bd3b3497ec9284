"""Triton forward+backward kernels for `delta_rule` (DESIGN §3.2, §4), plus the tile helpers
that `triton_momentum.py` shares. Public entry points live in `kernels/triton_scans.py`.

    S_t = S_{t-1} (alpha_t I - eta_t k_t k_t^T) + u_t k_t^T ;   o_t = S_t q_t

The kernels hold the state transposed, h = S^T [K, V], so every update is a plain matmul.
Within a chunk of C tokens starting from h, with g_t = sum_{s<=t} log alpha_s (chunk-local),
gp_t = g_{t-1}, and delta_t = u_t - eta_t S_{t-1} k_t (the write that actually lands):

    S_t = e^{g_t} S_0 + sum_{i<=t} e^{g_t - g_i} delta_i k_i^T                   (unrolled)
    (I + A) Delta = U - diag(eta e^{gp}) K h,   A_ti = eta_t e^{gp_t - g_i} k_t.k_i  (i < t)
    => Delta = U' - W h  with  Tm = (I + A)^{-1},  U' = Tm U,  W = Tm diag(eta e^{gp}) K
    O = diag(e^g) Q h + (Gamma o Q K^T) Delta,   Gamma_ti = e^{g_t - g_i}  (i <= t)
    h_next = e^{g_L} h + (diag(e^{g_L - g}) K)^T Delta                     (L = last token)

This is the WY/UT form of the gated delta rule (fla `gated_delta_rule`), written directly in
(alpha, eta, u). Every exponent above is a sum of log-gates over a forward range, so it is
<= 0 for 0 <= alpha <= 1 (log 0 is clamped at LOG_GATE_FLOOR): no ratio can overflow, and
masked entries are exp(-inf) = 0.
Precision limit: an exponent is formed as the difference g_t - g_i of chunk-local cumsums,
so after tiny or zero gates early in a chunk (|g| in the hundreds: each zero gate adds
LOG_GATE_FLOOR) it carries ~ulp(|g|): relative errors up to ~1e-4 at C = 32-64 with 8-16
such gates (chunked.py sums each span on its own and stays at ~1e-7). That is below tf32
training precision; summing the spans in the kernels (a masked cumsum of a [BT, BT] tile)
would remove it, at a register cost to be measured on a GPU.

Kernels (all state math in fp32; grid axes: chunks or V-blocks x batch*heads):
    _delta_prep_kernel        parallel over chunks: Tm by forward substitution, W, U'
    _delta_fwd_scan_kernel    sequential over chunks: Delta, h; saves chunk-start h, Delta
    _delta_fwd_o_kernel       parallel over chunks: O from the saved h and Delta
    _delta_bwd_scan_kernel    sequential, reversed: dDelta and the carried dh (h's gradient)
    _delta_bwd_grads_kernel   parallel over chunks: dq, dk, du, dalpha, deta (reduces over V)
On a GPU the two sequential scans pick their V-block width and warps by timing
(autotune_scan), and the gradient kernel its pipelining stages (autotune_grads), as do the
momentum rule's and the linear memory layer's scans.
Each kernel is a thin wrapper of one chunk-loop body (_delta_prep, _delta_fwd_scan,
_delta_bwd_scan, _delta_bwd_grads) that triton_memory.py's linear memory layer runs too, in
its MEMORY variant (chunk C <= BT, writes formed at the chunk-start state; its scan computes
the outputs in the loop). Taking O out of the delta rule's sequential scan leaves
it two of its five products per chunk (fla splits its forward the same way).
"""
import functools
import sys

import torch
import triton
import triton.language as tl

# The kernels' integer arguments that follow the sequence: its length T, the chunk count NT,
# the interval EVERY between saved chunk starts, a CMS segment's offset and piece count (off,
# NP, SLOTS). Triton would compile one variant per class of each ("equal to 1", "divisible by
# 16", other: T = 1000 and T = 4096 are two); unspecialised, one compiled kernel serves every
# length (fla does the same for T), and the CUDA tests at odd T reuse what the training steps
# compiled (bench/precompile.py). Head and tile sizes stay specialised: their divisibility
# lets Triton vectorise the loads.
# NBH, the scans' batch x heads count (their program count per V-block), is read by their
# autotuner only (autotune_scan).
LENGTH_ARGS = ("T", "NT", "EVERY", "off", "NP", "SLOTS", "NBH")
jit_any_length = functools.partial(triton.jit, do_not_specialize=LENGTH_ARGS)   # for kernel entries

# Launch configs that only a GPU can choose between, so on a GPU those kernels autotune
# (fla autotunes its kernels the same way); the interpreter has no driver to time with: there
# each keeps its first config, and the host passes the tiles (launch_tuned).
#
# The sequential scans (one program per (V-block, batch*head), walking every chunk) are
# latency-bound and few: 64 programs at B 4, H 16, V 64 in 64-column blocks fill half of an
# H100's 132 SMs, and ptxas spills 2-8 KB per thread of their fp32 tiles at 4 warps
# (BENCHMARKS.md, fifteenth session). Narrower V-blocks give more programs and less to hold
# per program, at the price of re-reading the chunk's keys per block; more warps give fewer
# registers per thread. fla's chunk_delta_h autotunes BV 32 / 64 x 2-4 warps. The key holds
# the shape, the program count and the product precision PREC (exact fp32 products hold more
# in shared memory than tf32 ones at one shape: a choice made under one precision, e.g. by a
# test under "high", may not launch under the other); the fixed choice the scans had (BV 64,
# 4 warps) comes first.
SCAN_CONFIGS = tuple(triton.Config({"BV": bv}, num_warps=w) for bv in (64, 32, 16) for w in (4, 8))
SCAN_TUNING_KEY = ["K", "V", "BT", "BK", "NBH", "SAVE", "PREC"]
# The chunk-parallel kernels hold a dozen [BT, BT] / [BT, BK] tiles, so they get 8 warps
# (fewer registers per thread) and no software pipelining of their V-block loop by default
# (num_stages=1: with the default 3 stages the prefetched fp32 tiles of the delta gradient
# kernel need 256 KiB of shared memory on an H100, which has 227 KiB).
CHUNK_WARPS = 8
# The scans' gradient kernels (_delta_bwd_grads_kernel, _momentum_bwd_grads_kernel) at K = 128
# with tf32 products: at one stage ptxas (CUDA 12.8, -O3) gives them 32 registers and 13-20 KB
# of spills per thread; at two, 255 registers and 1.7-4 KB (108-145 KiB of shared memory),
# but 8x fewer resident programs. At K = 64 both are alike.
GRADS_CONFIGS = tuple(triton.Config({}, num_warps=CHUNK_WARPS, num_stages=s) for s in (1, 2))
GRADS_TUNING_KEY = ["K", "V", "BT", "BK", "PREC"]


def _scan_configs_for(configs, named_args, **kwargs):
    """Autotuning candidates for one scan launch: V-blocks no wider than V needs."""
    widest = max(16, triton.next_power_of_2(named_args["V"]))
    return [c for c in configs if c.kwargs["BV"] <= widest]


def _autotuned(kernel, configs, key, prune=None):
    """`kernel` autotuned over `configs` on a GPU; under the interpreter (which made it an
    InterpretedFunction) the first config's warps and stages, with the host's tiles."""
    from triton.runtime.interpreter import InterpretedFunction
    if isinstance(kernel, InterpretedFunction):
        first = triton.Config({}, num_warps=configs[0].num_warps, num_stages=configs[0].num_stages)
        return triton.autotune(configs=[first], key=[])(kernel)
    return triton.autotune(configs=list(configs), key=key,
                           prune_configs_by={"early_config_prune": prune} if prune else None)(kernel)


def autotune_scan(kernel):
    """A sequential scan kernel entry (grid: V-blocks x B*H), autotuned over SCAN_CONFIGS."""
    return _autotuned(kernel, SCAN_CONFIGS, SCAN_TUNING_KEY, _scan_configs_for)


def autotune_grads(kernel):
    """A scan's chunk-parallel gradient kernel, autotuned over GRADS_CONFIGS (stages)."""
    return _autotuned(kernel, GRADS_CONFIGS, GRADS_TUNING_KEY)

# log(alpha) is clamped here so that alpha == 0 gives a huge negative number instead of -inf
# (-inf - -inf = nan in the ratios); e^-69 is already far below fp32 resolution of a sum.
LOG_GATE_FLOOR = tl.constexpr(-69.0)


# ----------------------------------------------------------------------------- tile helpers

@triton.jit
def _rows_tile(ptr, base, t0, T, stride_t, c0, D, BT: tl.constexpr, BD: tl.constexpr):
    """Pointers and mask of a [BT, BD] tile: tokens t0.. (row stride stride_t, rows from T
    on masked), features c0.. (from D on masked)."""
    rows = t0 + tl.arange(0, BT)
    cols = c0 + tl.arange(0, BD)
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    return ptr + base + rows.to(tl.int64)[:, None] * stride_t + cols[None, :], mask


@triton.jit
def _load_rows(ptr, base, t0, T, stride_t, c0, D, BT: tl.constexpr, BD: tl.constexpr):
    """[BT, BD] fp32 tile: tokens t0.. (row stride stride_t), features c0..; zero outside."""
    ptrs, mask = _rows_tile(ptr, base, t0, T, stride_t, c0, D, BT, BD)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, base, t0, T, stride_t, c0, D, x, BT: tl.constexpr, BD: tl.constexpr):
    ptrs, mask = _rows_tile(ptr, base, t0, T, stride_t, c0, D, BT, BD)
    tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_gate(ptr, base, t0, T, stride_t, other, BT: tl.constexpr):
    rows = t0 + tl.arange(0, BT)
    ptrs = ptr + base + rows.to(tl.int64) * stride_t
    return tl.load(ptrs, mask=rows < T, other=other).to(tl.float32)


@triton.jit
def _store_gate(ptr, base, t0, T, stride_t, x, BT: tl.constexpr):
    rows = t0 + tl.arange(0, BT)
    tl.store(ptr + base + rows.to(tl.int64) * stride_t, x.to(ptr.dtype.element_ty), mask=rows < T)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """tl.dot of two fp32 tiles in the kernels' product precision (dot_precision). For tf32,
    each operand is rounded to the nearest tf32 first: NVIDIA's tf32 tensor cores read the
    top 19 bits of an fp32 register, and Triton hands them the registers as they are, so
    every product would be made of operands truncated toward zero, ~1e-3 too small on the
    same side every time. A recurrence that integrates its writes adds that bias up: the
    fused momentum memory was 0.12 off after 4K tokens on an H200 (BENCHMARKS.md), and an
    interpreter whose products truncate the same way gives the same 0.12; rounded operands
    leave unbiased errors (as cuBLAS's TF32, which rounds), 5e-3 there; on an H100 the same
    layer is 2.0e-3 off with them (DGD's level)."""
    if PREC == "tf32":
        a = _round_to_tf32(a)
        b = _round_to_tf32(b)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _round_to_tf32(x):
    """x (fp32) rounded to the nearest tf32 value (10 mantissa bits; ties away from zero,
    as cvt.rna.tf32.f32): add half of the lowest kept bit, clear the 13 bits tf32 drops.
    Infinities and NaNs keep their exponent; no finite value below 3.4e38 overflows."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _log_cumsum(gate):
    """Chunk-local inclusive cumsum of log(gate). Padding rows carry gate 1, i.e. log 0."""
    return tl.cumsum(tl.maximum(tl.log(gate), LOG_GATE_FLOOR), 0)


@triton.jit
def _decay(g_row, g_col, mask):
    """e^{g_row[t] - g_col[i]} where mask[t, i], else 0 (exp(-inf); never forms inf - inf)."""
    return tl.exp(tl.where(mask, g_row[:, None] - g_col[None, :], float("-inf")))


@triton.jit
def _pick(x, rows, L):
    """x[L] of a 1-D [BT] tile as a scalar."""
    return tl.sum(tl.where(rows == L, x, 0.0), 0)


@triton.jit
def _reverse_cumsum(x, rows):
    """y[s] = sum_{t >= s} x[t] over the chunk (gradients of chunk-local cumsums)."""
    return tl.sum(tl.where(rows[None, :] >= rows[:, None], x[None, :], 0.0), 1)


@triton.jit
def _sum_after(x, rows):
    """y[s] = sum_{t > s} x[t] over the chunk."""
    return tl.sum(tl.where(rows[None, :] > rows[:, None], x[None, :], 0.0), 1)


@triton.jit
def _sum_before(x, rows):
    """y[s] = sum_{i < s} x[i] over the chunk."""
    return tl.sum(tl.where(rows[None, :] < rows[:, None], x[None, :], 0.0), 1)


# Gradients w.r.t. log gates. A decay e^{g_t - g_i} holds the gates s = i+1..t, so the
# gradient of log gate s is the sum of e = (its gradient x itself) over the spans that hold
# s. Summed as rowsum - colsum and then a cumsum, the O(1) terms of the spans without s
# cancel and leave s's own terms, which carry the factor gate_s, at the cumsum's absolute
# rounding error: the gate's gradient, that sum / gate_s, was then off by ~1e-7 / gate_s
# (1e12 x too large at gate 1e-20). These helpers sum only the terms that hold s.

@triton.jit
def _span_grad(e, rows, L, STRICT: tl.constexpr, PREC: tl.constexpr):
    """y[s] = sum of e[t, i] over i < s <= t <= L (s < t if STRICT): the log-gate gradient
    from decays e^{g_t - g_i} (STRICT: e^{g_{t-1} - g_i}), e = their gradient x themselves.
    The prefix sum over i is a product with a 0/1 matrix, so only terms that hold s are added
    (a cumsum minus e[t, s] would cancel against the O(1) e[t, s] again); in tf32 (PREC) each
    term is rounded to ~1e-3, relative to s's own small terms, not to the O(1) ones."""
    before = tl.where(rows[:, None] < rows[None, :], 1.0, 0.0)                 # [i, s]: i < s
    spans = _dot(e, before, PREC)                          # [t, s]: sum_{i<s} e[t, i]
    if STRICT:
        holds = rows[:, None] > rows[None, :]
    else:
        holds = rows[:, None] >= rows[None, :]
    return tl.sum(tl.where(holds & (rows[:, None] <= L), spans, 0.0), 0)


@triton.jit
def _gate_grad(dlog, gate):
    """d/d gate from d/d log(gate). Where log(gate) is clamped at LOG_GATE_FLOOR (gate 0 or
    below e^-69) the clamp's gradient, 0, as in kernels/chunked.py (dlog / 0 was NaN / inf)."""
    in_range = tl.log(gate) > LOG_GATE_FLOOR
    return tl.where(in_range, dlog / tl.where(in_range, gate, 1.0), 0.0)


@triton.jit
def _state_tile(K, V, v0, BK: tl.constexpr, BV: tl.constexpr):
    """Key indices [BK], value indices v0.. [BV] and the mask of a [BK, BV] state tile."""
    rk = tl.arange(0, BK)
    rv = v0 + tl.arange(0, BV)
    return rk, rv, (rk[:, None] < K) & (rv[None, :] < V)


@triton.jit
def _load_state(ptr, base, K, V, v0, BK: tl.constexpr, BV: tl.constexpr):
    """[BK, BV] tile of h = S^T from a state S [.., V, K] (row-major, K fastest)."""
    rk, rv, mask = _state_tile(K, V, v0, BK, BV)
    return tl.load(ptr + base + rv[None, :] * K + rk[:, None], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_state(ptr, base, K, V, v0, h, BK: tl.constexpr, BV: tl.constexpr):
    rk, rv, mask = _state_tile(K, V, v0, BK, BV)
    tl.store(ptr + base + rv[None, :] * K + rk[:, None], h.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_kv(ptr, base, K, V, v0, BK: tl.constexpr, BV: tl.constexpr):
    """[BK, BV] tile of a saved per-chunk state, stored [K, V] (V fastest)."""
    rk, rv, mask = _state_tile(K, V, v0, BK, BV)
    return tl.load(ptr + base + rk[:, None] * V + rv[None, :], mask=mask, other=0.0)


@triton.jit
def _store_kv(ptr, base, K, V, v0, h, BK: tl.constexpr, BV: tl.constexpr):
    rk, rv, mask = _state_tile(K, V, v0, BK, BV)
    tl.store(ptr + base + rk[:, None] * V + rv[None, :], h, mask=mask)


@triton.jit
def _program(T, H):
    """(index on grid axis 0, batch*head as int64, offset of this (batch, head) in a
    [B, T, H] gate tensor): every kernel's grid is (chunks or V-blocks, B*H)."""
    i_x, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    return i_x, i_bh.to(tl.int64), i_b.to(tl.int64) * T * H + i_h


@triton.jit
def _chunk_span(i_t, C, T):
    """Chunk i_t of length C: its first token t0, end = min(t0 + C, T) (rows from `end` on
    are masked padding) and its last row L = end - t0 - 1 within the tile."""
    t0 = i_t * C
    end = tl.minimum(t0 + C, T)
    return t0, end, end - t0 - 1


@triton.jit
def _load_qk(q_ptr, k_ptr, g_base, t0, end, H, K, BT: tl.constexpr, BK: tl.constexpr):
    """The chunk's queries and keys, [BT, BK] fp32 each, from [B, T, H, K] tensors."""
    q = _load_rows(q_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
    kc = _load_rows(k_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
    return q, kc


@triton.jit
def _load_state_or_zeros(ptr, base, K, V, v0, HAS: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr):
    """_load_state, or a zero tile where no initial state was given (HAS false)."""
    if HAS:
        h = _load_state(ptr, base, K, V, v0, BK, BV)
    else:
        h = tl.zeros([BK, BV], dtype=tl.float32)
    return h


@triton.jit
def _scalar_zero(BT: tl.constexpr):
    """An fp32 scalar 0 (the start of a loop-carried sum)."""
    return tl.sum(tl.zeros([BT], dtype=tl.float32), 0)


# ----------------------------------------------------------------------------- delta rule

@triton.jit
def _delta_chunk_gates(alpha_ptr, eta_ptr, g_base, t0, T, H, BT: tl.constexpr):
    """Per-chunk gate vectors: g (inclusive log-cumsum), gp = g - log alpha, eta, alpha."""
    alpha = _load_gate(alpha_ptr, g_base, t0, T, H, 1.0, BT)
    eta = _load_gate(eta_ptr, g_base, t0, T, H, 0.0, BT)
    g = _log_cumsum(alpha)
    gp = g - tl.maximum(tl.log(alpha), LOG_GATE_FLOOR)
    return g, gp, eta, alpha


@triton.jit
def _ut_inverse(a, BT: tl.constexpr):
    """Tm = (I + A)^{-1} for strictly lower-triangular A [BT, BT], by forward substitution:
    row i of Tm is e_i - sum_{j<i} A_ij Tm_j (rows j < i are final when row i is formed)."""
    rows = tl.arange(0, BT)
    tm = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    for i in range(1, BT):
        a_i = tl.sum(tl.where(rows[:, None] == i, a, 0.0), 0)                # A[i, :]
        tm = tl.where(rows[:, None] == i, tm - tl.sum(a_i[:, None] * tm, 0)[None, :], tm)
    return tm


@triton.jit
def _delta_ut_system(kc, g, gp, eta, BT: tl.constexpr, PREC: tl.constexpr):
    """A (strictly lower), K K^T, the decay mask of A, and Tm = (I + A)^{-1}."""
    rows = tl.arange(0, BT)
    strict = rows[:, None] > rows[None, :]
    kk = _dot(kc, tl.trans(kc), PREC)                                         # [BT, BT]
    decay_a = _decay(gp, g, strict)                                           # e^{gp_t - g_i}
    a = eta[:, None] * decay_a * kk
    return a, kk, decay_a, _ut_inverse(a, BT)


@triton.jit
def _delta_grads_tail(q, kc, g, gp, eta, rows, L, tm, kk, decay_a, gamma, mq, kt_scale, b_scale,
                      d_mq, d_qh, d_w, d_kt, dd_u, h_dh, READOUT: tl.constexpr,
                      PREC: tl.constexpr):
    """The delta rule's chain rule for one chunk, from the products that sum over V
    (d_mq = dO Delta^T, d_qh = dO h^T, d_w = -dDelta h^T, d_kt = Delta dh_next^T,
    dd_u = dDelta U^T, h_dh = <h, dh_next>) through O, h_next, W = Tm B, U' = Tm U and the UT
    solve down to (dq, dk, deta, dlog_alpha, r_b). B = diag(b_scale) K with b_scale = eta e^gp
    (+ 2 lw for the memory layer's B~, whose lw gradient is the caller's: it uses r_b).
    READOUT False: the chunk's readout O is unused (HOPE's projection memories), so q, gamma,
    mq, d_mq and d_qh are not read and dq is 0."""
    strict = rows[:, None] > rows[None, :]
    g_last = _pick(g, rows, L)
    # h_next = e^{g_L} h + (diag(e^{g_L - g}) K)^T Delta
    dk = kt_scale[:, None] * d_kt
    if READOUT:   # O = diag(e^g) Q h + (Gamma o Q K^T) Delta
        d_mq = tl.where(rows[:, None] >= rows[None, :], d_mq, 0.0)
        dq = tl.exp(g)[:, None] * d_qh + _dot(d_mq * gamma, kc, PREC)
        dk += _dot(tl.trans(d_mq * gamma), q, PREC)
        dlog_alpha = _span_grad(d_mq * mq, rows, L, False, PREC)                    # Gamma
        dg = tl.exp(g) * tl.sum(q * d_qh, 1)                                  # d e^{g_t}, t <= L
    else:
        dq = 0.0
        dlog_alpha = tl.zeros_like(g)
        dg = tl.zeros_like(g)
    s_kt = kt_scale * tl.sum(kc * d_kt, 1)                  # e^{g_L - g_i} holds i < s <= L
    dlog_alpha += tl.where(rows <= L, _sum_before(s_kt, rows), 0.0)
    dg += tl.where(rows == L, tl.exp(g_last) * h_dh, 0.0)
    # W = Tm B, U' = Tm U, Tm = (I + A)^{-1}
    d_b = _dot(tl.trans(tm), d_w, PREC)
    d_tm = dd_u + _dot(d_w, tl.trans(b_scale[:, None] * kc), PREC)
    d_a = -_dot(_dot(tl.trans(tm), d_tm, PREC), tl.trans(tm), PREC)
    d_a = tl.where(strict, d_a, 0.0)
    dk += b_scale[:, None] * d_b
    r_b = tl.sum(kc * d_b, 1)                                                 # d b_scale
    deta = tl.exp(gp) * r_b
    dgp = eta * tl.exp(gp) * r_b
    # A_ti = eta_t e^{gp_t - g_i} k_t.k_i
    f = d_a * decay_a
    deta += tl.sum(f * kk, 1)
    dlog_alpha += _span_grad(eta[:, None] * f * kk, rows, L, True, PREC)
    f = eta[:, None] * f
    dk += _dot(f, kc, PREC) + _dot(tl.trans(f), kc, PREC)
    # g_t = sum_{s<=t} log alpha_s and gp_t = g_t - log alpha_t (chunk-local); the spans of
    # the decay matrices are summed above (_span_grad: no cancellation at tiny gates)
    dg = tl.where(rows <= L, dg, 0.0)
    dgp = tl.where(rows <= L, dgp, 0.0)
    dlog_alpha += _reverse_cumsum(dg, rows) + _sum_after(dgp, rows)
    return dq, dk, deta, dlog_alpha, r_b


# The chunk loops below serve the delta rule (triton_scans.py: chunk C = BT, writes U given)
# and the fused linear memory layer (triton_memory.py, MEMORY: chunk C <= BT, writes formed
# from targets V at the chunk-start state, U~ = 2 diag(lw) V and W~ = Tm diag(eta e^gp + 2 lw) K,
# the chunk-start state of the last chunk W_B returned). One body each, called by the
# kernels (thin wrappers that fix the variant) of both files.

@triton.jit
def _delta_prep(k_ptr, u_ptr, alpha_ptr, eta_ptr, lw_ptr, w_ptr, u2_ptr, T, H, K, V, C,
                WITH_U2: tl.constexpr, MEMORY: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """One chunk: W = Tm diag(eta e^gp) K and (WITH_U2) U' = Tm U, fp32 [B*H, T, .]; for
    MEMORY, W~ = Tm diag(eta e^gp + 2 lw) K and U~' = Tm diag(2 lw) V (u_ptr holds V)."""
    i_t, bh64, g_base = _program(T, H)
    t0, end, L = _chunk_span(i_t, C, T)
    kc = _load_rows(k_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)            # [BT, BK]
    g, gp, eta, alpha = _delta_chunk_gates(alpha_ptr, eta_ptr, g_base, t0, end, H, BT)
    a, kk, decay_a, tm = _delta_ut_system(kc, g, gp, eta, BT, PREC)
    b_scale = eta * tl.exp(gp)                                                # B = diag(.) K
    if MEMORY:
        lw2 = 2.0 * _load_gate(lw_ptr, g_base, t0, end, H, 0.0, BT)
        b_scale += lw2
    w = _dot(tm, b_scale[:, None] * kc, PREC)                                 # [BT, BK]
    _store_rows(w_ptr, bh64 * T * K, t0, end, K, 0, K, w, BT, BK)
    if WITH_U2:
        for v0 in range(0, V, BV):
            uc = _load_rows(u_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)  # [BT, BV]
            if MEMORY:
                uc = lw2[:, None] * uc                                        # U~ = 2 diag(lw) V
            u2 = _dot(tm, uc, PREC)
            _store_rows(u2_ptr, bh64 * T * V, t0, end, V, v0, V, u2, BT, BV)


@triton.jit
def _delta_fwd_scan(q_ptr, k_ptr, alpha_ptr, w_ptr, u2_ptr, s0_ptr, o_ptr, hc_ptr, d_ptr,
                    sT_ptr, sB_ptr, T, H, K, V, C, NT, HAS_S0: tl.constexpr,
                    SAVE: tl.constexpr, MEMORY: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """One program per (V-block, batch*head): the chunks in order, h [BK, BV] in registers.
    V-columns of the state never mix in this recurrence, so V-blocks run independently.
    SAVE keeps each chunk's start h, and Delta unless MEMORY (whose backward recomputes it),
    for the backward (skipped for inference); MEMORY also stores the last chunk-start h and
    computes the outputs here. The delta rule's scan (not MEMORY, SAVE) keeps only the two
    products on its sequential path (W h, K^T Delta); _delta_fwd_o computes O from the saved
    h and Delta, in parallel over chunks (as fla's chunk_fwd_o)."""
    i_v, bh64, g_base = _program(T, H)
    v0 = i_v * BV
    rows = tl.arange(0, BT)
    incl = rows[:, None] >= rows[None, :]
    h = _load_state_or_zeros(s0_ptr, bh64 * V * K, K, V, v0, HAS_S0, BK, BV)
    for i_t in range(NT):
        t0, end, L = _chunk_span(i_t, C, T)
        if SAVE:
            _store_kv(hc_ptr, (bh64 * NT + i_t) * K * V, K, V, v0, h, BK, BV)
        if MEMORY:
            if i_t == NT - 1:
                _store_state(sB_ptr, bh64 * V * K, K, V, v0, h, BK, BV)
        kc = _load_rows(k_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
        w = _load_rows(w_ptr, bh64 * T * K, t0, end, K, 0, K, BT, BK)
        u2 = _load_rows(u2_ptr, bh64 * T * V, t0, end, V, v0, V, BT, BV)
        g = _log_cumsum(_load_gate(alpha_ptr, g_base, t0, end, H, 1.0, BT))
        g_last = _pick(g, rows, L)
        d = u2 - _dot(w, h, PREC)                                             # Delta [BT, BV]
        if SAVE and not MEMORY:
            _store_rows(d_ptr, bh64 * T * V, t0, end, V, v0, V, d, BT, BV)
        if MEMORY:
            q = _load_rows(q_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
            o = _chunk_output(q, kc, g, incl, h, d, PREC)
            _store_rows(o_ptr, g_base * V, t0, end, H * V, v0, V, o, BT, BV)
        kt = tl.where(rows <= L, tl.exp(g_last - g), 0.0)[:, None] * kc
        h = tl.exp(g_last) * h + _dot(tl.trans(kt), d, PREC)
    _store_state(sT_ptr, bh64 * V * K, K, V, v0, h, BK, BV)


@triton.jit
def _chunk_output(q, kc, g, incl, h, d, PREC: tl.constexpr):
    """O = diag(e^g) Q h + (Gamma o Q K^T) Delta for one chunk from its start state h."""
    mq = _decay(g, g, incl) * _dot(q, tl.trans(kc), PREC)
    return tl.exp(g)[:, None] * _dot(q, h, PREC) + _dot(mq, d, PREC)


@triton.jit
def _delta_fwd_o(q_ptr, k_ptr, alpha_ptr, hc_ptr, d_ptr, o_ptr, T, H, K, V, NT,
                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """One program per (chunk, batch*head): the chunk's outputs from its saved start h and
    Delta (the delta rule's scan), every V-block; Q K^T once per chunk."""
    i_t, bh64, g_base = _program(T, H)
    t0, end, L = _chunk_span(i_t, BT, T)
    rows = tl.arange(0, BT)
    incl = rows[:, None] >= rows[None, :]
    q, kc = _load_qk(q_ptr, k_ptr, g_base, t0, end, H, K, BT, BK)
    g = _log_cumsum(_load_gate(alpha_ptr, g_base, t0, end, H, 1.0, BT))
    for v0 in range(0, V, BV):
        h = _load_kv(hc_ptr, (bh64 * NT + i_t) * K * V, K, V, v0, BK, BV)
        d = _load_rows(d_ptr, bh64 * T * V, t0, end, V, v0, V, BT, BV)
        o = _chunk_output(q, kc, g, incl, h, d, PREC)
        _store_rows(o_ptr, g_base * V, t0, end, H * V, v0, V, o, BT, BV)


@triton.jit
def _delta_bwd_scan(q_ptr, k_ptr, alpha_ptr, w_ptr, do_ptr, dsT_ptr, dsB_ptr, dhc_ptr, dd_ptr,
                    ds0_ptr, T, H, K, V, C, NT, MEMORY: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Chunks in reverse, carrying dh = dL/dh_next. Per chunk:
        dDelta = (Gamma o Q K^T)^T dO + diag(e^{g_L - g}) K dh
        dh    <- e^{g_L} dh + Q^T diag(e^g) dO - W^T dDelta
    Saves dh at each chunk's end and dDelta for the parallel gradient kernel. MEMORY: W is
    W~ (so dh also collects the writes' dependence on W_B), and the gradient of the returned
    last chunk-start state is added once the last chunk has been stepped back."""
    i_v, bh64, g_base = _program(T, H)
    v0 = i_v * BV
    rows = tl.arange(0, BT)
    incl = rows[:, None] >= rows[None, :]
    dh = _load_state(dsT_ptr, bh64 * V * K, K, V, v0, BK, BV)
    dh_start = _load_state_or_zeros(dsB_ptr, bh64 * V * K, K, V, v0, MEMORY, BK, BV)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        t0, end, L = _chunk_span(i_t, C, T)
        _store_kv(dhc_ptr, (bh64 * NT + i_t) * K * V, K, V, v0, dh, BK, BV)
        q, kc = _load_qk(q_ptr, k_ptr, g_base, t0, end, H, K, BT, BK)
        w = _load_rows(w_ptr, bh64 * T * K, t0, end, K, 0, K, BT, BK)
        do = _load_rows(do_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
        g = _log_cumsum(_load_gate(alpha_ptr, g_base, t0, end, H, 1.0, BT))
        g_last = _pick(g, rows, L)
        mq = _decay(g, g, incl) * _dot(q, tl.trans(kc), PREC)
        kt = tl.where(rows <= L, tl.exp(g_last - g), 0.0)[:, None] * kc
        dd = (_dot(tl.trans(mq), do, PREC)
              + _dot(kt, dh, PREC))                                             # [BT, BV]
        _store_rows(dd_ptr, bh64 * T * V, t0, end, V, v0, V, dd, BT, BV)
        dh = (tl.exp(g_last) * dh
              + _dot(tl.trans(q * tl.exp(g)[:, None]), do, PREC)
              - _dot(tl.trans(w), dd, PREC))
        if MEMORY and i_r == 0:      # the returned last chunk-start state is this chunk's start
            dh += dh_start
    _store_state(ds0_ptr, bh64 * V * K, K, V, v0, dh, BK, BV)


@triton.jit
def _delta_bwd_grads(q_ptr, k_ptr, u_ptr, alpha_ptr, eta_ptr, lw_ptr, do_ptr, d_ptr, dd_ptr,
                     hc_ptr, dhc_ptr, dq_ptr, dk_ptr, du_ptr, dalpha_ptr, deta_ptr, dlw_ptr,
                     T, H, K, V, C, NT, MEMORY: tl.constexpr, BT: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Everything that sums over V, for one chunk: the chain rule through O, h_next, Delta =
    U' - W h, and the UT solve (dTm = dU' U^T + dW B^T, dA = -Tm^T dTm Tm^T). MEMORY: u_ptr
    holds V and du_ptr gets dV; W~, U~' and Delta are recomputed from the saved chunk-start
    h, with B~ = diag(eta e^gp + 2 lw) K for B and U~ = diag(2 lw) V for U; dlw is stored."""
    i_t, bh64, g_base = _program(T, H)
    t0, end, L = _chunk_span(i_t, C, T)
    rows = tl.arange(0, BT)
    incl = rows[:, None] >= rows[None, :]
    kv_base = (bh64 * NT + i_t) * K * V
    q, kc = _load_qk(q_ptr, k_ptr, g_base, t0, end, H, K, BT, BK)
    g, gp, eta, alpha = _delta_chunk_gates(alpha_ptr, eta_ptr, g_base, t0, end, H, BT)
    g_last = _pick(g, rows, L)
    a, kk, decay_a, tm = _delta_ut_system(kc, g, gp, eta, BT, PREC)
    gamma = _decay(g, g, incl)
    mq = gamma * _dot(q, tl.trans(kc), PREC)
    kt_scale = tl.where(rows <= L, tl.exp(g_last - g), 0.0)
    b_scale = eta * tl.exp(gp)                                                # B = diag(.) K
    if MEMORY:
        lw2 = 2.0 * _load_gate(lw_ptr, g_base, t0, end, H, 0.0, BT)
        b_scale += lw2                                                        # B~
        w = _dot(tm, b_scale[:, None] * kc, PREC)                             # W~
        du_v = tl.zeros([BT], dtype=tl.float32)     # rows of dU~ . V

    d_mq = tl.zeros([BT, BT], dtype=tl.float32)     # dO Delta^T
    d_qh = tl.zeros([BT, BK], dtype=tl.float32)     # dO h^T
    d_w = tl.zeros([BT, BK], dtype=tl.float32)      # -dDelta h^T
    d_kt = tl.zeros([BT, BK], dtype=tl.float32)     # Delta dh_next^T
    dd_u = tl.zeros([BT, BT], dtype=tl.float32)     # dDelta U^T
    h_dh = _scalar_zero(BT)                         # <h, dh_next>
    for v0 in range(0, V, BV):
        do = _load_rows(do_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
        dd = _load_rows(dd_ptr, bh64 * T * V, t0, end, V, v0, V, BT, BV)
        uc = _load_rows(u_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
        h = _load_kv(hc_ptr, kv_base, K, V, v0, BK, BV)
        dh = _load_kv(dhc_ptr, kv_base, K, V, v0, BK, BV)
        if MEMORY:
            vc = uc
            uc = lw2[:, None] * vc                                            # U~
            d = _dot(tm, uc, PREC) - _dot(w, h, PREC)
        else:
            d = _load_rows(d_ptr, bh64 * T * V, t0, end, V, v0, V, BT, BV)
        d_mq += _dot(do, tl.trans(d), PREC)
        d_qh += _dot(do, tl.trans(h), PREC)
        d_w -= _dot(dd, tl.trans(h), PREC)
        d_kt += _dot(d, tl.trans(dh), PREC)
        dd_u += _dot(dd, tl.trans(uc), PREC)
        h_dh += tl.sum(tl.sum(h * dh, 1), 0)
        du = _dot(tl.trans(tm), dd, PREC)                                     # dU = Tm^T dU'
        if MEMORY:
            du_v += tl.sum(du * vc, 1)
            du = lw2[:, None] * du                                            # dV
        _store_rows(du_ptr, g_base * V, t0, end, H * V, v0, V, du, BT, BV)

    dq, dk, deta, dlog_alpha, r_b = _delta_grads_tail(
        q, kc, g, gp, eta, rows, L, tm, kk, decay_a, gamma, mq, kt_scale, b_scale, d_mq, d_qh,
        d_w, d_kt, dd_u, h_dh, True, PREC)
    _store_rows(dq_ptr, g_base * K, t0, end, H * K, 0, K, dq, BT, BK)
    _store_rows(dk_ptr, g_base * K, t0, end, H * K, 0, K, dk, BT, BK)
    _store_gate(deta_ptr, g_base, t0, end, H, deta, BT)
    if MEMORY:
        _store_gate(dlw_ptr, g_base, t0, end, H, 2.0 * r_b + 2.0 * du_v, BT)
    _store_gate(dalpha_ptr, g_base, t0, end, H, _gate_grad(dlog_alpha, alpha), BT)


@jit_any_length
def _delta_prep_kernel(k_ptr, u_ptr, alpha_ptr, eta_ptr, w_ptr, u2_ptr, T, H, K, V,
                       WITH_U2: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, PREC: tl.constexpr):
    """W = Tm diag(eta e^{gp}) K and (WITH_U2) U' = Tm U for one chunk (fp32, [B*H, T, .])."""
    _delta_prep(k_ptr, u_ptr, alpha_ptr, eta_ptr, eta_ptr, w_ptr, u2_ptr, T, H, K, V, BT,
                WITH_U2, False, BT, BK, BV, PREC)


@autotune_scan
@jit_any_length
def _delta_fwd_scan_kernel(k_ptr, alpha_ptr, w_ptr, u2_ptr, s0_ptr, hc_ptr, d_ptr, sT_ptr,
                           T, H, K, V, NT, NBH, HAS_S0: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """The delta rule's forward scan (_delta_fwd_scan with chunk BT, no outputs): S_T, each
    chunk's start h and Delta, for _delta_fwd_o_kernel and the backward."""
    _delta_fwd_scan(k_ptr, k_ptr, alpha_ptr, w_ptr, u2_ptr, s0_ptr, sT_ptr, hc_ptr, d_ptr,  # no q, o
                    sT_ptr, sT_ptr, T, H, K, V, BT, NT, HAS_S0, True, False, BT, BK, BV, PREC)


@jit_any_length
def _delta_fwd_o_kernel(q_ptr, k_ptr, alpha_ptr, hc_ptr, d_ptr, o_ptr, T, H, K, V, NT,
                        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """The delta rule's outputs (_delta_fwd_o), parallel over chunks."""
    _delta_fwd_o(q_ptr, k_ptr, alpha_ptr, hc_ptr, d_ptr, o_ptr, T, H, K, V, NT, BT, BK, BV, PREC)


@autotune_scan
@jit_any_length
def _delta_bwd_scan_kernel(q_ptr, k_ptr, alpha_ptr, w_ptr, do_ptr, dsT_ptr, dhc_ptr, dd_ptr,
                           ds0_ptr, T, H, K, V, NT, NBH, BT: tl.constexpr, BK: tl.constexpr,
                           BV: tl.constexpr, PREC: tl.constexpr):
    """The delta rule's backward scan (_delta_bwd_scan with chunk BT): dDelta and dh per
    chunk, dS_0."""
    _delta_bwd_scan(q_ptr, k_ptr, alpha_ptr, w_ptr, do_ptr, dsT_ptr, dsT_ptr, dhc_ptr, dd_ptr,
                    ds0_ptr, T, H, K, V, BT, NT, False, BT, BK, BV, PREC)


@autotune_grads
@jit_any_length
def _delta_bwd_grads_kernel(q_ptr, k_ptr, u_ptr, alpha_ptr, eta_ptr, do_ptr, d_ptr, dd_ptr,
                            hc_ptr, dhc_ptr, dq_ptr, dk_ptr, du_ptr, dalpha_ptr, deta_ptr,
                            T, H, K, V, NT, BT: tl.constexpr, BK: tl.constexpr,
                            BV: tl.constexpr, PREC: tl.constexpr):
    """The delta rule's chunk-parallel gradients (_delta_bwd_grads with chunk BT): dq, dk,
    du, dalpha, deta."""
    _delta_bwd_grads(q_ptr, k_ptr, u_ptr, alpha_ptr, eta_ptr, eta_ptr, do_ptr, d_ptr, dd_ptr,
                     hc_ptr, dhc_ptr, dq_ptr, dk_ptr, du_ptr, dalpha_ptr, deta_ptr, deta_ptr,
                     T, H, K, V, BT, NT, False, BT, BK, BV, PREC)


# ----------------------------------------------------------------------------- host side

def launch_tuned(kernel, grid, *args, **consts):
    """Launch an autotuned kernel (_autotuned): on a GPU its config sets the warps and stages
    (and a scan's BV); `consts` carry the host's tiles, whose BV it takes where the config
    sets none."""
    if "BV" in kernel.configs[0].kwargs:
        consts.pop("BV")
    kernel[grid](*args, **consts)


def launch_scan(kernel, V, NBH, *args, **consts):
    """launch_tuned for an autotune_scan kernel, on its grid (V-blocks, B*H = NBH)."""
    launch_tuned(kernel, lambda meta: (triton.cdiv(V, meta["BV"]), NBH), *args, NBH=NBH, **consts)


def tuned_configs():
    """What the autotuned kernels chose so far on this GPU: one line per (kernel, key)."""
    from . import triton_memory, triton_momentum
    lines = []
    for module in (sys.modules[__name__], triton_momentum, triton_memory):
        for name in sorted(vars(module)):
            kernel = getattr(module, name)
            for key, config in getattr(kernel, "cache", {}).items() if isinstance(
                    kernel, triton.runtime.Autotuner) else ():
                names = [n for n in kernel.keys if n in kernel.arg_names]
                dtypes = sorted({str(t).replace("torch.", "") for t in key[len(names):]})
                shape = ", ".join(f"{n}={v}" for n, v in zip(names, key))
                chose = [f"BV {config.kwargs['BV']}"] if "BV" in config.kwargs else []
                chose += [f"{config.num_warps} warps", f"{config.num_stages} stages"]
                lines.append(f"{name} ({shape}, {'/'.join(dtypes)}): {', '.join(chose)}")
    return lines


def dot_precision(dtype):
    """The products of the kernels' tl.dot tiles; accumulation is fp32 either way. 16-bit
    inputs, whose own rounding is coarser, get tf32 tensor cores. fp32 inputs (the memory
    layers' fast weights and the inputs memory.py casts up) follow PyTorch's fp32 matmul
    setting, as torch.matmul does: "highest" (PyTorch's default; the tests) gives exact fp32
    products (FMA, no tensor cores), "high" or "medium" tf32 tensor cores (train.py sets
    "high" when it computes in bf16 on CUDA: train.setup_precision)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# Entry-point glue shared by triton_scans.py and triton_memory.py (absent states are None).

def on_input_device(op):
    """Run a custom op's launches on the CUDA device of its first (tensor) argument. Triton
    launches on the *current* device and its stream, not on the tensors' device: a model on
    cuda:1 (eval's --device cuda:1) would run its kernels on cuda:0 against cuda:1 memory (an
    illegal access, or with peer access an unsynchronised read). fla's input_guard does the
    same. Goes below @torch.library.custom_op, which reads the wrapped signature."""
    @functools.wraps(op)
    def guarded(first, *args, **kwargs):
        if first.device.type != "cuda":
            return op(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return op(first, *args, **kwargs)
    return guarded


def _needs_grad(*tensors):
    """Whether the forward must save what the backward needs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def _grad_or_zeros(grad, shape, like, dtype=torch.float32):
    """An output's incoming gradient as a contiguous tensor (zeros where autograd gives None)."""
    return like.new_zeros(shape, dtype=dtype) if grad is None else grad.contiguous()


def _launch_dims(q, u, C, BT, BK, BV):
    """What every host launcher starts from: (B, T, H, K, V, NT = number of chunks of C
    tokens, the kernels' tile constexprs, kwargs of an fp32 buffer on q's device)."""
    B, T, H, K = q.shape
    tiles = dict(BT=BT, BK=BK, BV=BV, PREC=dot_precision(q.dtype))
    return (B, T, H, K, u.shape[-1], triton.cdiv(T, C), tiles,
            dict(device=q.device, dtype=torch.float32))


# A forward that saves nothing for a backward runs a longer input in segments of this many
# tokens (a multiple of every BT), each starting from the last one's S_T: its four fp32 work
# buffers of ~T x d per head (W, U', the chunk-start states and Delta) then stay those of one
# segment (4 GiB at B 8, H 32, d 64) instead of the whole input's (32 GiB at T 128K). Chunks
# start at the same tokens either way, so the result is the same (tested bit for bit).
NO_GRAD_SEGMENT = 16384


def delta_forward(q, k, u, alpha, eta, initial_state, save, BT, BK, BV):
    """Launch the forward kernels on contiguous inputs. Returns (o, S_T fp32, h per chunk
    start [B*H, NT, K, V] fp32, Delta [B*H, T, V] fp32); the last two feed the backward and
    are empty unless `save`."""
    T = q.shape[1]
    if not save and T > NO_GRAD_SEGMENT:
        o, state = torch.empty(*u.shape, device=q.device, dtype=q.dtype), initial_state
        for lo in range(0, T, NO_GRAD_SEGMENT):
            piece = [t[:, lo:lo + NO_GRAD_SEGMENT].contiguous() for t in (q, k, u, alpha, eta)]
            o[:, lo:lo + NO_GRAD_SEGMENT], state, _, _ = delta_forward(*piece, state, False, BT, BK, BV)
        return o, state, state.new_empty(0), state.new_empty(0)
    B, T, H, K, V, NT, tiles, f32 = _launch_dims(q, u, BT, BT, BK, BV)
    w = torch.empty(B * H, T, K, **f32)
    u2 = torch.empty(B * H, T, V, **f32)
    if NT > 0:
        _delta_prep_kernel[(NT, B * H)](k, u, alpha, eta, w, u2, T, H, K, V, WITH_U2=True,
                                        **tiles, num_warps=CHUNK_WARPS, num_stages=1)
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    # the chunk-start states and Delta feed the output kernel, and the backward (`save`)
    h_chunks = torch.empty(B * H, NT, K, V, **f32)
    d = torch.empty(B * H, T, V, **f32)
    s_final = torch.empty(B, H, V, K, **f32)
    has_s0 = initial_state is not None
    launch_scan(_delta_fwd_scan_kernel, V, B * H,
                k, alpha, w, u2, initial_state if has_s0 else s_final, h_chunks, d, s_final,
                T, H, K, V, NT, HAS_S0=has_s0, **tiles)
    if NT > 0:
        _delta_fwd_o_kernel[(NT, B * H)](q, k, alpha, h_chunks, d, o, T, H, K, V, NT, **tiles,
                                         num_warps=CHUNK_WARPS)
    if not save:
        h_chunks, d = h_chunks.new_empty(0), d.new_empty(0)
    return o, s_final, h_chunks, d


def delta_backward(q, k, u, alpha, eta, h_chunks, d, grad_o, grad_state, BT, BK, BV):
    """Launch the backward kernels. Returns (dq, dk, du, dalpha, deta, dS_0 fp32)."""
    B, T, H, K, V, NT, tiles, f32 = _launch_dims(q, u, BT, BT, BK, BV)
    w = torch.empty(B * H, T, K, **f32)
    dh_chunks = torch.empty(B * H, NT, K, V, **f32)
    dd = torch.empty(B * H, T, V, **f32)
    ds0 = torch.empty(B, H, V, K, **f32)
    dq, dk, du = torch.empty_like(q), torch.empty_like(k), torch.empty_like(u)
    dalpha, deta = torch.empty_like(alpha), torch.empty_like(eta)
    if NT > 0:   # W again (cheaper than keeping it); U' is not needed
        _delta_prep_kernel[(NT, B * H)](k, u, alpha, eta, w, w, T, H, K, V, WITH_U2=False,
                                        **tiles, num_warps=CHUNK_WARPS, num_stages=1)
    launch_scan(_delta_bwd_scan_kernel, V, B * H,
                q, k, alpha, w, grad_o, grad_state, dh_chunks, dd, ds0, T, H, K, V, NT, **tiles)
    if NT > 0:
        launch_tuned(_delta_bwd_grads_kernel, (NT, B * H),
                     q, k, u, alpha, eta, grad_o, d, dd, h_chunks, dh_chunks, dq, dk, du, dalpha,
                     deta, T, H, K, V, NT, **tiles)
    return dq, dk, du, dalpha, deta, ds0
