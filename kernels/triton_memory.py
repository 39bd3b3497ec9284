"""Fused Triton kernels for a whole linear memory layer (DESIGN §3.3, §4 item (a)).

A memory layer is a chunk loop: at the start of every chunk of C tokens the inner gradient
is taken at the chunk-start weights W_B, the per-token transition runs over the chunk and
the readout follows each write (memory.py's module docstring has the math). For a linear
memory M(x) = W x the write of token t is, with h = W_B^T [K, V] (the kernels' transposed
state) and the write rate lw_t (lr_t, or eta'_t for DGD):

    u_t = -lw_t dl_t/d(W k_t) = -2 lw_t (W_B k_t - v_t)      U = 2 diag(lw) (V - K h)

It is linear in the chunk-start state, so a memory layer is one of the two scans with the
scan's chunk = the memory's chunk and the write folded into the chunk algebra:

* DGD / GD (NL Eq. 57/88), the delta rule of triton_delta.py: Delta = Tm U - Tm diag(eta e^gp) K h
  becomes Delta = U~' - W~ h with
      W~  = Tm diag(eta e^gp + 2 lw) K         U~' = Tm diag(2 lw) V
  (GD is eta = 0, Tm = I). Only the prep changes; the chunk scans are the delta rule's.
* momentum (Titans Eq. 13-14), triton_momentum.py's scans with U formed inside the scan
  from the chunk-start h (V-local), and in the backward dh += -2 K^T diag(lw) dU.

So the whole layer -- inner forward at W_B, closed-form inner gradient, transitions,
readout after the write -- is one forward scan per (V-block, batch*head) over all chunks.
The forward keeps only the chunk-start states (T/C of them); the backward recomputes W~,
U~', Delta and U from them chunk by chunk.

    fused_linear_memory_delta(q, k, v, alpha, eta, lr_write, initial_state, chunk_size)
        -> (y [B,T,H,d], W_T [B,H,d,d] fp32, W_B of the last chunk [B,H,d,d] fp32)
    fused_linear_memory_momentum(q, k, v, alpha, beta, lr, initial_state, initial_momentum,
                                 chunk_size) -> (y, W_T, Z_T, W_B of the last chunk)

Gradients flow to every input (queries, keys, targets, gates, initial weights and momenta)
and from every output. chunk_size C <= 64 (a chunk is one [BT, BT] tile, BT = max(16,
next_pow2(C)); the rows past C are no-op padding); head dim <= 128. Outputs: y in q's dtype,
states fp32 (C <= 32 when d > 64, see max_chunk). The 2-layer MLP memory is fused in
triton_mlp_memory.py, the CMS fast levels in triton_cms.py.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_delta import (CHUNK_WARPS, SCAN_WARPS, _decay, _delta_chunk_gates, _delta_ut_system,
                           _load_gate, _load_kv, _load_rows, _load_state, _log_cumsum, _pick,
                           _reverse_cumsum, _store_gate, _store_kv, _store_rows, _store_state,
                           dot_precision)
from .triton_momentum import _momentum_chunk_gates

__all__ = ["fused_linear_memory_delta", "fused_linear_memory_momentum", "MAX_CHUNK",
           "MAX_HEAD_DIM", "fusable", "max_chunk"]

MAX_CHUNK = 64           # one memory chunk = one tile of rows
MAX_HEAD_DIM = 128       # the whole key dimension of the state sits in one register tile
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- DGD / GD

@triton.jit
def _mem_delta_prep_kernel(k_ptr, v_ptr, alpha_ptr, eta_ptr, lw_ptr, w_ptr, u2_ptr,
                           T, H, K, V, C, WITH_U2: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """One memory chunk: W~ = Tm diag(eta e^gp + 2 lw) K and (WITH_U2) U~' = Tm diag(2 lw) V."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = i_t * C
    end = tl.minimum(t0 + C, T)
    g_base = i_b.to(tl.int64) * T * H + i_h
    kc = _load_rows(k_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
    g, gp, eta, alpha = _delta_chunk_gates(alpha_ptr, eta_ptr, g_base, t0, end, H, BT)
    lw = _load_gate(lw_ptr, g_base, t0, end, H, 0.0, BT)
    a, kk, decay_a, tm = _delta_ut_system(kc, g, gp, eta, BT, PREC)
    w = tl.dot(tm, (eta * tl.exp(gp) + 2.0 * lw)[:, None] * kc, input_precision=PREC)
    _store_rows(w_ptr, i_bh.to(tl.int64) * T * K, t0, end, K, 0, K, w, BT, BK)
    if WITH_U2:
        for v0 in range(0, V, BV):
            vc = _load_rows(v_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
            u2 = tl.dot(tm, (2.0 * lw)[:, None] * vc, input_precision=PREC)
            _store_rows(u2_ptr, i_bh.to(tl.int64) * T * V, t0, end, V, v0, V, u2, BT, BV)


@triton.jit
def _mem_delta_fwd_kernel(q_ptr, k_ptr, alpha_ptr, w_ptr, u2_ptr, s0_ptr, o_ptr, hc_ptr,
                          sT_ptr, sB_ptr, T, H, K, V, C, NT, SAVE: tl.constexpr,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          PREC: tl.constexpr):
    """The chunk loop, one program per (V-block, batch*head), h [BK, BV] in registers:
    Delta = U~' - W~ h (write at W_B + DGD transition), readout O, next chunk-start h."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    v0 = i_v * BV
    rows = tl.arange(0, BT)
    incl = rows[:, None] >= rows[None, :]
    g_base = i_b.to(tl.int64) * T * H + i_h
    bh64 = i_bh.to(tl.int64)
    h = _load_state(s0_ptr, bh64 * V * K, K, V, v0, BK, BV)
    for i_t in range(NT):
        t0 = i_t * C
        end = tl.minimum(t0 + C, T)
        if SAVE:
            _store_kv(hc_ptr, (bh64 * NT + i_t) * K * V, K, V, v0, h, BK, BV)
        if i_t == NT - 1:
            _store_state(sB_ptr, bh64 * V * K, K, V, v0, h, BK, BV)
        q = _load_rows(q_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
        kc = _load_rows(k_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
        w = _load_rows(w_ptr, bh64 * T * K, t0, end, K, 0, K, BT, BK)
        u2 = _load_rows(u2_ptr, bh64 * T * V, t0, end, V, v0, V, BT, BV)
        g = _log_cumsum(_load_gate(alpha_ptr, g_base, t0, end, H, 1.0, BT))
        L = end - t0 - 1
        g_last = _pick(g, rows, L)
        d = u2 - tl.dot(w, h, input_precision=PREC)
        mq = _decay(g, g, incl) * tl.dot(q, tl.trans(kc), input_precision=PREC)
        o = (tl.exp(g)[:, None] * tl.dot(q, h, input_precision=PREC)
             + tl.dot(mq, d, input_precision=PREC))
        _store_rows(o_ptr, g_base * V, t0, end, H * V, v0, V, o, BT, BV)
        kt = tl.where(rows <= L, tl.exp(g_last - g), 0.0)[:, None] * kc
        h = tl.exp(g_last) * h + tl.dot(tl.trans(kt), d, input_precision=PREC)
    _store_state(sT_ptr, bh64 * V * K, K, V, v0, h, BK, BV)


@triton.jit
def _mem_delta_bwd_scan_kernel(q_ptr, k_ptr, alpha_ptr, w_ptr, do_ptr, dsT_ptr, dsB_ptr,
                               dhc_ptr, dd_ptr, ds0_ptr, T, H, K, V, C, NT, BT: tl.constexpr,
                               BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Chunks in reverse, carrying dh = dL/dh_next: the delta rule's backward scan with W~
    (so dh also collects the writes' dependence on W_B), plus the gradient of the returned
    last chunk-start state, added once the last chunk has been stepped back."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    v0 = i_v * BV
    rows = tl.arange(0, BT)
    incl = rows[:, None] >= rows[None, :]
    g_base = i_b.to(tl.int64) * T * H + i_h
    bh64 = i_bh.to(tl.int64)
    dh = _load_state(dsT_ptr, bh64 * V * K, K, V, v0, BK, BV)
    dh_start = _load_state(dsB_ptr, bh64 * V * K, K, V, v0, BK, BV)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        t0 = i_t * C
        end = tl.minimum(t0 + C, T)
        _store_kv(dhc_ptr, (bh64 * NT + i_t) * K * V, K, V, v0, dh, BK, BV)
        q = _load_rows(q_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
        kc = _load_rows(k_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
        w = _load_rows(w_ptr, bh64 * T * K, t0, end, K, 0, K, BT, BK)
        do = _load_rows(do_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
        g = _log_cumsum(_load_gate(alpha_ptr, g_base, t0, end, H, 1.0, BT))
        L = end - t0 - 1
        g_last = _pick(g, rows, L)
        mq = _decay(g, g, incl) * tl.dot(q, tl.trans(kc), input_precision=PREC)
        kt = tl.where(rows <= L, tl.exp(g_last - g), 0.0)[:, None] * kc
        dd = (tl.dot(tl.trans(mq), do, input_precision=PREC)
              + tl.dot(kt, dh, input_precision=PREC))
        _store_rows(dd_ptr, bh64 * T * V, t0, end, V, v0, V, dd, BT, BV)
        dh = (tl.exp(g_last) * dh
              + tl.dot(tl.trans(q * tl.exp(g)[:, None]), do, input_precision=PREC)
              - tl.dot(tl.trans(w), dd, input_precision=PREC))
        dh += tl.where(i_r == 0, 1.0, 0.0) * dh_start
    _store_state(ds0_ptr, bh64 * V * K, K, V, v0, dh, BK, BV)


@triton.jit
def _mem_delta_bwd_grads_kernel(q_ptr, k_ptr, v_ptr, alpha_ptr, eta_ptr, lw_ptr, do_ptr,
                                dd_ptr, hc_ptr, dhc_ptr, dq_ptr, dk_ptr, dv_ptr, dalpha_ptr,
                                deta_ptr, dlw_ptr, T, H, K, V, C, NT, BT: tl.constexpr,
                                BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Everything that sums over V, for one chunk, recomputing W~, U~' and Delta from the
    saved chunk-start h: the delta rule's chain rule with B~ = diag(eta e^gp + 2 lw) K in
    place of B and U~ = diag(2 lw) V in place of the writes."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = i_t * C
    end = tl.minimum(t0 + C, T)
    rows = tl.arange(0, BT)
    incl = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]
    g_base = i_b.to(tl.int64) * T * H + i_h
    bh64 = i_bh.to(tl.int64)
    kv_base = (bh64 * NT + i_t) * K * V
    q = _load_rows(q_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
    kc = _load_rows(k_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
    g, gp, eta, alpha = _delta_chunk_gates(alpha_ptr, eta_ptr, g_base, t0, end, H, BT)
    lw = _load_gate(lw_ptr, g_base, t0, end, H, 0.0, BT)
    L = end - t0 - 1
    g_last = _pick(g, rows, L)
    a, kk, decay_a, tm = _delta_ut_system(kc, g, gp, eta, BT, PREC)
    gamma = _decay(g, g, incl)
    mq = gamma * tl.dot(q, tl.trans(kc), input_precision=PREC)
    kt_scale = tl.where(rows <= L, tl.exp(g_last - g), 0.0)
    b_scale = eta * tl.exp(gp) + 2.0 * lw                                  # B~ = diag(.) K
    w = tl.dot(tm, b_scale[:, None] * kc, input_precision=PREC)            # W~

    d_mq = tl.zeros([BT, BT], dtype=tl.float32)     # dO Delta^T
    d_qh = tl.zeros([BT, BK], dtype=tl.float32)     # dO h^T
    d_w = tl.zeros([BT, BK], dtype=tl.float32)      # -dDelta h^T
    d_kt = tl.zeros([BT, BK], dtype=tl.float32)     # Delta dh_next^T
    dd_u = tl.zeros([BT, BT], dtype=tl.float32)     # dDelta U~^T
    du_v = tl.zeros([BT], dtype=tl.float32)         # rows of dU~ . V
    h_dh = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)
    for v0 in range(0, V, BV):
        do = _load_rows(do_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
        dd = _load_rows(dd_ptr, bh64 * T * V, t0, end, V, v0, V, BT, BV)
        vc = _load_rows(v_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
        h = _load_kv(hc_ptr, kv_base, K, V, v0, BK, BV)
        dh = _load_kv(dhc_ptr, kv_base, K, V, v0, BK, BV)
        uc = (2.0 * lw)[:, None] * vc                                        # U~
        d = tl.dot(tm, uc, input_precision=PREC) - tl.dot(w, h, input_precision=PREC)
        d_mq += tl.dot(do, tl.trans(d), input_precision=PREC)
        d_qh += tl.dot(do, tl.trans(h), input_precision=PREC)
        d_w -= tl.dot(dd, tl.trans(h), input_precision=PREC)
        d_kt += tl.dot(d, tl.trans(dh), input_precision=PREC)
        dd_u += tl.dot(dd, tl.trans(uc), input_precision=PREC)
        h_dh += tl.sum(tl.sum(h * dh, 1), 0)
        du = tl.dot(tl.trans(tm), dd, input_precision=PREC)                # dU~ = Tm^T dU~'
        du_v += tl.sum(du * vc, 1)
        _store_rows(dv_ptr, g_base * V, t0, end, H * V, v0, V, (2.0 * lw)[:, None] * du,
                    BT, BV)

    # O = diag(e^g) Q h + (Gamma o Q K^T) Delta
    d_mq = tl.where(incl, d_mq, 0.0)
    dq = tl.exp(g)[:, None] * d_qh + tl.dot(d_mq * gamma, kc, input_precision=PREC)
    dk = tl.dot(tl.trans(d_mq * gamma), q, input_precision=PREC)
    e_mq = d_mq * mq
    dg = tl.sum(e_mq, 1) - tl.sum(e_mq, 0) + tl.exp(g) * tl.sum(q * d_qh, 1)
    # h_next = e^{g_L} h + (diag(e^{g_L - g}) K)^T Delta
    dk += kt_scale[:, None] * d_kt
    s_kt = kt_scale * tl.sum(kc * d_kt, 1)
    dg += tl.where(rows == L, tl.sum(s_kt, 0) + tl.exp(g_last) * h_dh, 0.0) - s_kt
    # W~ = Tm B~, U~' = Tm U~, Tm = (I + A)^{-1}
    d_b = tl.dot(tl.trans(tm), d_w, input_precision=PREC)
    d_tm = dd_u + tl.dot(d_w, tl.trans(b_scale[:, None] * kc), input_precision=PREC)
    d_a = -tl.dot(tl.dot(tl.trans(tm), d_tm, input_precision=PREC), tl.trans(tm),
                  input_precision=PREC)
    d_a = tl.where(strict, d_a, 0.0)
    dk += b_scale[:, None] * d_b
    r_b = tl.sum(kc * d_b, 1)                                            # d b_scale
    deta = tl.exp(gp) * r_b
    dgp = eta * tl.exp(gp) * r_b
    dlw = 2.0 * r_b + 2.0 * du_v
    # A_ti = eta_t e^{gp_t - g_i} k_t.k_i
    f = d_a * decay_a
    deta += tl.sum(f * kk, 1)
    e_a = eta[:, None] * f * kk
    dgp += tl.sum(e_a, 1)
    dg -= tl.sum(e_a, 0)
    f = eta[:, None] * f
    dk += tl.dot(f, kc, input_precision=PREC) + tl.dot(tl.trans(f), kc, input_precision=PREC)
    # g_t = sum_{s<=t} log alpha_s and gp_t = g_t - log alpha_t (chunk-local)
    dg = tl.where(rows <= L, dg, 0.0)
    dgp = tl.where(rows <= L, dgp, 0.0)
    dlog_alpha = _reverse_cumsum(dg + dgp, rows) - dgp
    _store_rows(dq_ptr, g_base * K, t0, end, H * K, 0, K, dq, BT, BK)
    _store_rows(dk_ptr, g_base * K, t0, end, H * K, 0, K, dk, BT, BK)
    _store_gate(deta_ptr, g_base, t0, end, H, deta, BT)
    _store_gate(dlw_ptr, g_base, t0, end, H, dlw, BT)
    _store_gate(dalpha_ptr, g_base, t0, end, H, dlog_alpha / alpha, BT)


# ----------------------------------------------------------------------------- momentum

@triton.jit
def _mem_momentum_fwd_kernel(q_ptr, k_ptr, v_ptr, alpha_ptr, beta_ptr, lw_ptr, s0_ptr, z0_ptr,
                             o_ptr, hc_ptr, zc_ptr, sT_ptr, zT_ptr, sB_ptr, T, H, K, V, C, NT,
                             SAVE: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                             BV: tl.constexpr, PREC: tl.constexpr):
    """The chunk loop with Titans' momentum: U = 2 diag(lw) (V - K h) at the chunk-start h
    (V-local), then triton_momentum.py's closed form over the chunk."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    v0 = i_v * BV
    rows = tl.arange(0, BT)
    g_base = i_b.to(tl.int64) * T * H + i_h
    bh64 = i_bh.to(tl.int64)
    h = _load_state(s0_ptr, bh64 * V * K, K, V, v0, BK, BV)
    z = _load_state(z0_ptr, bh64 * V * K, K, V, v0, BK, BV)
    for i_t in range(NT):
        t0 = i_t * C
        end = tl.minimum(t0 + C, T)
        kv_base = (bh64 * NT + i_t) * K * V
        if SAVE:
            _store_kv(hc_ptr, kv_base, K, V, v0, h, BK, BV)
            _store_kv(zc_ptr, kv_base, K, V, v0, z, BK, BV)
        if i_t == NT - 1:
            _store_state(sB_ptr, bh64 * V * K, K, V, v0, h, BK, BV)
        q = _load_rows(q_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
        kc = _load_rows(k_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
        vc = _load_rows(v_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
        lw = _load_gate(lw_ptr, g_base, t0, end, H, 0.0, BT)
        alpha, beta, L, p, r, w, a, b, c, w_last, r_last = _momentum_chunk_gates(
            alpha_ptr, beta_ptr, g_base, t0, end, H, BT, PREC)
        uc = (2.0 * lw)[:, None] * (vc - tl.dot(kc, h, input_precision=PREC))
        wqk = w * tl.dot(q, tl.trans(kc), input_precision=PREC)
        o = (a[:, None] * tl.dot(q, h, input_precision=PREC)
             + c[:, None] * tl.dot(q, z, input_precision=PREC)
             + tl.dot(wqk, uc, input_precision=PREC))
        _store_rows(o_ptr, g_base * V, t0, end, H * V, v0, V, o, BT, BV)
        z_next = (_pick(b, rows, L) * z
                  + tl.dot(tl.trans(r_last[:, None] * kc), uc, input_precision=PREC))
        h = (_pick(a, rows, L) * h + _pick(c, rows, L) * z
             + tl.dot(tl.trans(w_last[:, None] * kc), uc, input_precision=PREC))
        z = z_next
    _store_state(sT_ptr, bh64 * V * K, K, V, v0, h, BK, BV)
    _store_state(zT_ptr, bh64 * V * K, K, V, v0, z, BK, BV)


@triton.jit
def _mem_momentum_bwd_scan_kernel(q_ptr, k_ptr, alpha_ptr, beta_ptr, lw_ptr, do_ptr, dsT_ptr,
                                  dzT_ptr, dsB_ptr, dhc_ptr, dzc_ptr, du_ptr, dv_ptr, ds0_ptr,
                                  dz0_ptr, T, H, K, V, C, NT, BT: tl.constexpr,
                                  BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Chunks in reverse, carrying (dh, dz). Per chunk, the momentum rule's step back, then
    the writes' dependence on the chunk-start state: dh += -2 K^T diag(lw) dU; dV = 2 lw dU."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    v0 = i_v * BV
    rows = tl.arange(0, BT)
    g_base = i_b.to(tl.int64) * T * H + i_h
    bh64 = i_bh.to(tl.int64)
    dh = _load_state(dsT_ptr, bh64 * V * K, K, V, v0, BK, BV)
    dz = _load_state(dzT_ptr, bh64 * V * K, K, V, v0, BK, BV)
    dh_start = _load_state(dsB_ptr, bh64 * V * K, K, V, v0, BK, BV)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        t0 = i_t * C
        end = tl.minimum(t0 + C, T)
        kv_base = (bh64 * NT + i_t) * K * V
        _store_kv(dhc_ptr, kv_base, K, V, v0, dh, BK, BV)
        _store_kv(dzc_ptr, kv_base, K, V, v0, dz, BK, BV)
        q = _load_rows(q_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
        kc = _load_rows(k_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
        do = _load_rows(do_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
        lw = _load_gate(lw_ptr, g_base, t0, end, H, 0.0, BT)
        alpha, beta, L, p, r, w, a, b, c, w_last, r_last = _momentum_chunk_gates(
            alpha_ptr, beta_ptr, g_base, t0, end, H, BT, PREC)
        wqk = w * tl.dot(q, tl.trans(kc), input_precision=PREC)
        du = (tl.dot(tl.trans(wqk), do, input_precision=PREC)
              + tl.dot(r_last[:, None] * kc, dz, input_precision=PREC)
              + tl.dot(w_last[:, None] * kc, dh, input_precision=PREC))
        _store_rows(du_ptr, bh64 * T * V, t0, end, V, v0, V, du, BT, BV)
        _store_rows(dv_ptr, g_base * V, t0, end, H * V, v0, V, (2.0 * lw)[:, None] * du, BT, BV)
        dz_prev = (_pick(b, rows, L) * dz + _pick(c, rows, L) * dh
                   + tl.dot(tl.trans(q * c[:, None]), do, input_precision=PREC))
        dh = (_pick(a, rows, L) * dh
              + tl.dot(tl.trans(q * a[:, None]), do, input_precision=PREC)
              - tl.dot(tl.trans((2.0 * lw)[:, None] * kc), du, input_precision=PREC))
        dh += tl.where(i_r == 0, 1.0, 0.0) * dh_start
        dz = dz_prev
    _store_state(ds0_ptr, bh64 * V * K, K, V, v0, dh, BK, BV)
    _store_state(dz0_ptr, bh64 * V * K, K, V, v0, dz, BK, BV)


@triton.jit
def _mem_momentum_bwd_grads_kernel(q_ptr, k_ptr, v_ptr, alpha_ptr, beta_ptr, lw_ptr, do_ptr,
                                   du_ptr, hc_ptr, zc_ptr, dhc_ptr, dzc_ptr, dq_ptr, dk_ptr,
                                   dalpha_ptr, dbeta_ptr, dlw_ptr, T, H, K, V, C, NT,
                                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                   PREC: tl.constexpr):
    """dq, dk and the gate gradients of one chunk (sums over V), U recomputed from the saved
    chunk-start h: the momentum rule's chain rule plus U = 2 diag(lw) (V - K h)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = i_t * C
    end = tl.minimum(t0 + C, T)
    rows = tl.arange(0, BT)
    incl = rows[:, None] >= rows[None, :]
    is_last = rows == end - t0 - 1
    g_base = i_b.to(tl.int64) * T * H + i_h
    bh64 = i_bh.to(tl.int64)
    kv_base = (bh64 * NT + i_t) * K * V
    q = _load_rows(q_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
    kc = _load_rows(k_ptr, g_base * K, t0, end, H * K, 0, K, BT, BK)
    lw = _load_gate(lw_ptr, g_base, t0, end, H, 0.0, BT)
    alpha, beta, L, p, r, w, a, b, c, w_last, r_last = _momentum_chunk_gates(
        alpha_ptr, beta_ptr, g_base, t0, end, H, BT, PREC)
    qk = tl.dot(q, tl.trans(kc), input_precision=PREC)

    d_wqk = tl.zeros([BT, BT], dtype=tl.float32)    # dO U^T
    do_h = tl.zeros([BT, BK], dtype=tl.float32)     # dO h^T
    do_z = tl.zeros([BT, BK], dtype=tl.float32)     # dO z^T
    u_dh = tl.zeros([BT, BK], dtype=tl.float32)     # U dh_next^T
    u_dz = tl.zeros([BT, BK], dtype=tl.float32)     # U dz_next^T
    du_h = tl.zeros([BT, BK], dtype=tl.float32)     # dU h^T (the write's K h)
    du_e = tl.zeros([BT], dtype=tl.float32)         # rows of dU . (V - K h)
    h_dh = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)
    z_dh = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)
    z_dz = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)
    for v0 in range(0, V, BV):
        do = _load_rows(do_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
        vc = _load_rows(v_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
        du = _load_rows(du_ptr, bh64 * T * V, t0, end, V, v0, V, BT, BV)
        h = _load_kv(hc_ptr, kv_base, K, V, v0, BK, BV)
        z = _load_kv(zc_ptr, kv_base, K, V, v0, BK, BV)
        dh = _load_kv(dhc_ptr, kv_base, K, V, v0, BK, BV)
        dz = _load_kv(dzc_ptr, kv_base, K, V, v0, BK, BV)
        resid = vc - tl.dot(kc, h, input_precision=PREC)
        uc = (2.0 * lw)[:, None] * resid
        d_wqk += tl.dot(do, tl.trans(uc), input_precision=PREC)
        do_h += tl.dot(do, tl.trans(h), input_precision=PREC)
        do_z += tl.dot(do, tl.trans(z), input_precision=PREC)
        u_dh += tl.dot(uc, tl.trans(dh), input_precision=PREC)
        u_dz += tl.dot(uc, tl.trans(dz), input_precision=PREC)
        du_h += tl.dot(du, tl.trans(h), input_precision=PREC)
        du_e += tl.sum(du * resid, 1)
        h_dh += tl.sum(tl.sum(h * dh, 1), 0)
        z_dh += tl.sum(tl.sum(z * dh, 1), 0)
        z_dz += tl.sum(tl.sum(z * dz, 1), 0)

    gw = d_wqk * w
    dq = a[:, None] * do_h + c[:, None] * do_z + tl.dot(gw, kc, input_precision=PREC)
    dk = (tl.dot(tl.trans(gw), q, input_precision=PREC)
          + w_last[:, None] * u_dh + r_last[:, None] * u_dz
          - (2.0 * lw)[:, None] * du_h)
    d_w = tl.where(incl, d_wqk * qk, 0.0) + tl.where(is_last[:, None],
                                                     tl.sum(kc * u_dh, 1)[None, :], 0.0)
    d_r = tl.where(is_last[:, None], tl.sum(kc * u_dz, 1)[None, :], 0.0)
    d_a = tl.sum(q * do_h, 1) + tl.where(is_last, h_dh, 0.0)
    d_c = tl.sum(q * do_z, 1) + tl.where(is_last, z_dh, 0.0)
    d_b = tl.where(is_last, z_dz, 0.0) + tl.sum(p * d_c[:, None], 0)          # c = P b
    d_p = tl.dot(d_w, tl.trans(r), input_precision=PREC) + d_c[:, None] * b[None, :]
    d_r += tl.dot(tl.trans(p), d_w, input_precision=PREC)                      # W = P R
    e_p = tl.where(incl, d_p, 0.0) * p
    e_r = tl.where(incl, d_r, 0.0) * r
    d_la = tl.where(rows <= L, a * d_a + tl.sum(e_p, 1) - tl.sum(e_p, 0), 0.0)
    d_lb = tl.where(rows <= L, b * d_b + tl.sum(e_r, 1) - tl.sum(e_r, 0), 0.0)
    _store_rows(dq_ptr, g_base * K, t0, end, H * K, 0, K, dq, BT, BK)
    _store_rows(dk_ptr, g_base * K, t0, end, H * K, 0, K, dk, BT, BK)
    _store_gate(dlw_ptr, g_base, t0, end, H, 2.0 * du_e, BT)
    _store_gate(dalpha_ptr, g_base, t0, end, H, _reverse_cumsum(d_la, rows) / alpha, BT)
    _store_gate(dbeta_ptr, g_base, t0, end, H, _reverse_cumsum(d_lb, rows) / beta, BT)


# ----------------------------------------------------------------------------- host side

def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _tiles(d, chunk_size):
    """(BT, BK, BV): one memory chunk per BT rows (tl.dot needs >= 16), V in blocks of <= 64."""
    return (max(16, triton.next_power_of_2(chunk_size)), max(16, triton.next_power_of_2(d)),
            min(64, max(16, triton.next_power_of_2(d))))


def max_chunk(d):
    """Largest chunk C the fused kernels take at head dim d: 64, or 32 when d > 64 (as in
    triton_scans._tiles: a [64, 128] fp32 tile set would overflow registers/shared memory)."""
    return MAX_CHUNK if d <= 64 else MAX_CHUNK // 2


def fusable(d, chunk_size):
    """Whether the fused kernels cover a linear memory of head dim d with chunk C."""
    return d <= MAX_HEAD_DIM and 1 <= chunk_size <= max_chunk(d)


def _check_inputs(tensors, states, chunk_size):
    """One-line ValueErrors naming what is wrong. tensors: q, k, v then gates (by name)."""
    q = tensors["q"]
    for name, t in {**tensors, **states}.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16 for the fused memory "
                             f"kernels; got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"the fused memory kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
                         f"before importing triton); got device {q.device}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B,T,H,d]; got shape {list(q.shape)}")
    B, T, H, d = q.shape
    for name in ("k", "v"):
        if tensors[name].shape != q.shape:
            raise ValueError(f"{name} must be [B,T,H,d] = {list(q.shape)} like q; "
                             f"got {list(tensors[name].shape)}")
    for name, g in tensors.items():
        if name not in ("q", "k", "v") and g.shape != (B, T, H):
            raise ValueError(f"{name} must be [B,T,H] = {[B, T, H]}; got {list(g.shape)}")
    for name, s in states.items():
        if s.shape != (B, H, d, d):
            raise ValueError(f"{name} must be [B,H,d,d] = {[B, H, d, d]}; got {list(s.shape)}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} exceeds {MAX_HEAD_DIM}, the most the fused kernels hold "
                         f"in one tile")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= max_chunk(d):
        raise ValueError(f"chunk_size must be an int in [1, {max_chunk(d)}] for the fused memory "
                         f"kernels at head dim {d}; got {chunk_size!r}")


def _contiguous(*tensors):
    return [t.contiguous() for t in tensors]


def _grad_or_zeros(grad, shape, like, dtype=torch.float32):
    return like.new_zeros(shape, dtype=dtype) if grad is None else grad.contiguous()


def _launch_args(q, chunk_size):
    B, T, H, d = q.shape
    BT, BK, BV = _tiles(d, chunk_size)
    NT = triton.cdiv(T, chunk_size)
    return B, T, H, d, NT, dict(BT=BT, BK=BK, BV=BV, PREC=dot_precision(q.dtype))


# DGD / GD -------------------------------------------------------------------------------

@torch.library.custom_op("nested_learning::memory_linear_delta_fwd", mutates_args=())
def _memory_delta_fwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor,
                      lr_write: Tensor, initial_state: Tensor, chunk_size: int,
                      save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q, k, v, alpha, eta, lr_write, s0 = _contiguous(q, k, v, alpha, eta, lr_write, initial_state)
    B, T, H, d, NT, tiles = _launch_args(q, chunk_size)
    f32 = dict(device=q.device, dtype=torch.float32)
    w = torch.empty(B * H, T, d, **f32)
    u2 = torch.empty(B * H, T, d, **f32)
    o = torch.empty(B, T, H, d, device=q.device, dtype=q.dtype)
    h_chunks = torch.empty((B * H, NT, d, d) if save else (0,), **f32)
    s_final, s_start = torch.empty(B, H, d, d, **f32), torch.empty(B, H, d, d, **f32)
    _mem_delta_prep_kernel[(NT, B * H)](k, v, alpha, eta, lr_write, w, u2, T, H, d, d,
                                        chunk_size, WITH_U2=True, **tiles,
                                        num_warps=CHUNK_WARPS, num_stages=1)
    _mem_delta_fwd_kernel[(triton.cdiv(d, tiles["BV"]), B * H)](
        q, k, alpha, w, u2, s0, o, h_chunks, s_final, s_start, T, H, d, d, chunk_size, NT,
        SAVE=save, **tiles, num_warps=SCAN_WARPS)
    return o, s_final, s_start, h_chunks


@_memory_delta_fwd.register_fake
def _(q, k, v, alpha, eta, lr_write, initial_state, chunk_size, save):
    B, T, H, d = q.shape
    NT = (T + chunk_size - 1) // chunk_size
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(B, T, H, d), q.new_empty(B, H, d, d, **f32),
            q.new_empty(B, H, d, d, **f32), q.new_empty((B * H, NT, d, d) if save else (0,), **f32))


@torch.library.custom_op("nested_learning::memory_linear_delta_bwd", mutates_args=())
def _memory_delta_bwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor,
                      lr_write: Tensor, h_chunks: Tensor, grad_o: Tensor, grad_state: Tensor,
                      grad_start: Tensor, chunk_size: int
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v, alpha, eta, lr_write, grad_o, grad_state, grad_start = _contiguous(
        q, k, v, alpha, eta, lr_write, grad_o, grad_state, grad_start)
    B, T, H, d, NT, tiles = _launch_args(q, chunk_size)
    f32 = dict(device=q.device, dtype=torch.float32)
    w = torch.empty(B * H, T, d, **f32)
    dh_chunks = torch.empty(B * H, NT, d, d, **f32)
    dd = torch.empty(B * H, T, d, **f32)
    ds0 = torch.empty(B, H, d, d, **f32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dalpha, deta, dlw = torch.empty_like(alpha), torch.empty_like(eta), torch.empty_like(lr_write)
    _mem_delta_prep_kernel[(NT, B * H)](k, v, alpha, eta, lr_write, w, w, T, H, d, d,
                                        chunk_size, WITH_U2=False, **tiles,
                                        num_warps=CHUNK_WARPS, num_stages=1)
    _mem_delta_bwd_scan_kernel[(triton.cdiv(d, tiles["BV"]), B * H)](
        q, k, alpha, w, grad_o, grad_state, grad_start, dh_chunks, dd, ds0, T, H, d, d,
        chunk_size, NT, **tiles, num_warps=SCAN_WARPS)
    _mem_delta_bwd_grads_kernel[(NT, B * H)](
        q, k, v, alpha, eta, lr_write, grad_o, dd, h_chunks, dh_chunks, dq, dk, dv, dalpha,
        deta, dlw, T, H, d, d, chunk_size, NT, **tiles, num_warps=CHUNK_WARPS, num_stages=1)
    return dq, dk, dv, dalpha, deta, dlw, ds0


@_memory_delta_bwd.register_fake
def _(q, k, v, alpha, eta, lr_write, h_chunks, grad_o, grad_state, grad_start, chunk_size):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(alpha), torch.empty_like(eta), torch.empty_like(lr_write),
            torch.empty_like(grad_state, dtype=torch.float32))


def _memory_delta_setup_context(ctx, inputs, output):
    q, k, v, alpha, eta, lr_write, initial_state, chunk_size, save = inputs
    ctx.save_for_backward(q, k, v, alpha, eta, lr_write, output[3])
    ctx.chunk_size, ctx.state_dtype = chunk_size, initial_state.dtype
    ctx.mark_non_differentiable(output[3])


def _memory_delta_backward(ctx, grad_o, grad_state, grad_start, _grad_h_chunks):
    q, k, v, alpha, eta, lr_write, h_chunks = ctx.saved_tensors
    if h_chunks.dim() != 4:
        raise RuntimeError("fused_linear_memory_delta: backward through a forward run without "
                           "grad tracking (no chunk-start states were saved)")
    B, T, H, d = q.shape
    grad_o = _grad_or_zeros(grad_o, (B, T, H, d), q, q.dtype)
    grad_state = _grad_or_zeros(grad_state, (B, H, d, d), q)
    grad_start = _grad_or_zeros(grad_start, (B, H, d, d), q)
    dq, dk, dv, dalpha, deta, dlw, ds0 = torch.ops.nested_learning.memory_linear_delta_bwd(
        q, k, v, alpha, eta, lr_write, h_chunks, grad_o, grad_state, grad_start, ctx.chunk_size)
    return dq, dk, dv, dalpha, deta, dlw, ds0.to(ctx.state_dtype), None, None


_memory_delta_fwd.register_autograd(_memory_delta_backward,
                                    setup_context=_memory_delta_setup_context)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fused_linear_memory_delta(q, k, v, alpha, eta, lr_write, initial_state, chunk_size):
    """A linear memory layer with the DGD (or GD) transition, fused (module docstring):
        W_t = W_{t-1} (alpha_t I - eta_t k_t k_t^T) - 2 lr_write_t (W_B k_t - v_t) k_t^T
        y_t = W_t q_t                    (W_B: the weights at the start of t's chunk)
    DGD (NL Eq. 57/88): eta = lr_write = eta'; GD: eta = 0, lr_write = lr. Chunks start at
    t = 0, every chunk_size tokens. Returns (y [B,T,H,d] in q's dtype, W_T fp32, W_B of the
    last chunk fp32); W_B [B,H,d,d] is (out, in) like memory.py's weights."""
    _check_inputs({"q": q, "k": k, "v": v, "alpha": alpha, "eta": eta, "lr_write": lr_write},
                  {"initial_state": initial_state}, chunk_size)
    if q.shape[1] == 0:
        raise ValueError("fused_linear_memory_delta needs T >= 1 tokens")
    save = _needs_grad(q, k, v, alpha, eta, lr_write, initial_state)
    o, s_final, s_start, _ = torch.ops.nested_learning.memory_linear_delta_fwd(
        q, k, v, alpha, eta, lr_write, initial_state, chunk_size, save)
    return o, s_final, s_start


# momentum -------------------------------------------------------------------------------

@torch.library.custom_op("nested_learning::memory_linear_momentum_fwd", mutates_args=())
def _memory_momentum_fwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                         lr: Tensor, initial_state: Tensor, initial_momentum: Tensor,
                         chunk_size: int, save: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v, alpha, beta, lr, s0, z0 = _contiguous(q, k, v, alpha, beta, lr, initial_state,
                                                   initial_momentum)
    B, T, H, d, NT, tiles = _launch_args(q, chunk_size)
    f32 = dict(device=q.device, dtype=torch.float32)
    o = torch.empty(B, T, H, d, device=q.device, dtype=q.dtype)
    h_chunks = torch.empty((B * H, NT, d, d) if save else (0,), **f32)
    z_chunks = torch.empty((B * H, NT, d, d) if save else (0,), **f32)
    s_final, z_final, s_start = (torch.empty(B, H, d, d, **f32) for _ in range(3))
    _mem_momentum_fwd_kernel[(triton.cdiv(d, tiles["BV"]), B * H)](
        q, k, v, alpha, beta, lr, s0, z0, o, h_chunks, z_chunks, s_final, z_final, s_start,
        T, H, d, d, chunk_size, NT, SAVE=save, **tiles, num_warps=SCAN_WARPS)
    return o, s_final, z_final, s_start, h_chunks, z_chunks


@_memory_momentum_fwd.register_fake
def _(q, k, v, alpha, beta, lr, initial_state, initial_momentum, chunk_size, save):
    B, T, H, d = q.shape
    NT = (T + chunk_size - 1) // chunk_size
    f32 = dict(dtype=torch.float32)
    chunks = (B * H, NT, d, d) if save else (0,)
    return (q.new_empty(B, T, H, d), q.new_empty(B, H, d, d, **f32),
            q.new_empty(B, H, d, d, **f32), q.new_empty(B, H, d, d, **f32),
            q.new_empty(chunks, **f32), q.new_empty(chunks, **f32))


@torch.library.custom_op("nested_learning::memory_linear_momentum_bwd", mutates_args=())
def _memory_momentum_bwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                         lr: Tensor, h_chunks: Tensor, z_chunks: Tensor, grad_o: Tensor,
                         grad_state: Tensor, grad_momentum: Tensor, grad_start: Tensor,
                         chunk_size: int
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v, alpha, beta, lr, grad_o, grad_state, grad_momentum, grad_start = _contiguous(
        q, k, v, alpha, beta, lr, grad_o, grad_state, grad_momentum, grad_start)
    B, T, H, d, NT, tiles = _launch_args(q, chunk_size)
    f32 = dict(device=q.device, dtype=torch.float32)
    dh_chunks = torch.empty(B * H, NT, d, d, **f32)
    dz_chunks = torch.empty(B * H, NT, d, d, **f32)
    du = torch.empty(B * H, T, d, **f32)
    ds0, dz0 = torch.empty(B, H, d, d, **f32), torch.empty(B, H, d, d, **f32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dalpha, dbeta, dlr = torch.empty_like(alpha), torch.empty_like(beta), torch.empty_like(lr)
    _mem_momentum_bwd_scan_kernel[(triton.cdiv(d, tiles["BV"]), B * H)](
        q, k, alpha, beta, lr, grad_o, grad_state, grad_momentum, grad_start, dh_chunks,
        dz_chunks, du, dv, ds0, dz0, T, H, d, d, chunk_size, NT, **tiles, num_warps=SCAN_WARPS)
    _mem_momentum_bwd_grads_kernel[(NT, B * H)](
        q, k, v, alpha, beta, lr, grad_o, du, h_chunks, z_chunks, dh_chunks, dz_chunks, dq, dk,
        dalpha, dbeta, dlr, T, H, d, d, chunk_size, NT, **tiles, num_warps=CHUNK_WARPS,
        num_stages=1)
    return dq, dk, dv, dalpha, dbeta, dlr, ds0, dz0


@_memory_momentum_bwd.register_fake
def _(q, k, v, alpha, beta, lr, h_chunks, z_chunks, grad_o, grad_state, grad_momentum,
      grad_start, chunk_size):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(alpha), torch.empty_like(beta), torch.empty_like(lr),
            torch.empty_like(grad_state, dtype=torch.float32),
            torch.empty_like(grad_momentum, dtype=torch.float32))


def _memory_momentum_setup_context(ctx, inputs, output):
    q, k, v, alpha, beta, lr, initial_state, initial_momentum, chunk_size, save = inputs
    ctx.save_for_backward(q, k, v, alpha, beta, lr, output[4], output[5])
    ctx.chunk_size = chunk_size
    ctx.state_dtypes = (initial_state.dtype, initial_momentum.dtype)
    ctx.mark_non_differentiable(output[4], output[5])


def _memory_momentum_backward(ctx, grad_o, grad_state, grad_momentum, grad_start, _gh, _gz):
    q, k, v, alpha, beta, lr, h_chunks, z_chunks = ctx.saved_tensors
    if h_chunks.dim() != 4:
        raise RuntimeError("fused_linear_memory_momentum: backward through a forward run "
                           "without grad tracking (no chunk-start states were saved)")
    B, T, H, d = q.shape
    grad_o = _grad_or_zeros(grad_o, (B, T, H, d), q, q.dtype)
    grad_state, grad_momentum, grad_start = (_grad_or_zeros(g, (B, H, d, d), q)
                                             for g in (grad_state, grad_momentum, grad_start))
    dq, dk, dv, dalpha, dbeta, dlr, ds0, dz0 = torch.ops.nested_learning.memory_linear_momentum_bwd(
        q, k, v, alpha, beta, lr, h_chunks, z_chunks, grad_o, grad_state, grad_momentum,
        grad_start, ctx.chunk_size)
    return (dq, dk, dv, dalpha, dbeta, dlr, ds0.to(ctx.state_dtypes[0]),
            dz0.to(ctx.state_dtypes[1]), None, None)


_memory_momentum_fwd.register_autograd(_memory_momentum_backward,
                                       setup_context=_memory_momentum_setup_context)


def fused_linear_memory_momentum(q, k, v, alpha, beta, lr, initial_state, initial_momentum,
                                 chunk_size):
    """A linear memory layer with Titans' momentum transition (Eq. 13-14), fused:
        Z_t = beta_t Z_{t-1} - 2 lr_t (W_B k_t - v_t) k_t^T ;  W_t = alpha_t W_{t-1} + Z_t
        y_t = W_t q_t
    Returns (y [B,T,H,d] in q's dtype, W_T, Z_T, W_B of the last chunk; states fp32)."""
    _check_inputs({"q": q, "k": k, "v": v, "alpha": alpha, "beta": beta, "lr": lr},
                  {"initial_state": initial_state, "initial_momentum": initial_momentum},
                  chunk_size)
    if q.shape[1] == 0:
        raise ValueError("fused_linear_memory_momentum needs T >= 1 tokens")
    save = _needs_grad(q, k, v, alpha, beta, lr, initial_state, initial_momentum)
    o, s_final, z_final, s_start, _, _ = torch.ops.nested_learning.memory_linear_momentum_fwd(
        q, k, v, alpha, beta, lr, initial_state, initial_momentum, chunk_size, save)
    return o, s_final, z_final, s_start
