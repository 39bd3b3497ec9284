"""Triton forward+backward kernels for `momentum_rule` (DESIGN §3.2, §4; Titans Eq. 13-14).
Public entry points live in `kernels/triton_scans.py`.

    Z_t = beta_t Z_{t-1} + u_t k_t^T ;   S_t = alpha_t S_{t-1} + Z_t ;   o_t = S_t q_t

The recurrence is linear in the writes, so within a chunk starting from (S_0, Z_0), with
chunk-local la_t = sum_{s<=t} log alpha_s and lb_t = sum_{s<=t} log beta_s (DESIGN §4 hint):

    S_t = e^{la_t} S_0 + c_t Z_0 + sum_{i<=t} W_ti u_i k_i^T
    P_tj = e^{la_t - la_j}, R_ji = e^{lb_j - lb_i}   (lower triangular, entries <= 1)
    W = P R   (W_ti = sum_{j=i..t} (a_t/a_j)(b_j/b_i)),    c = P e^{lb}
    O      = diag(e^{la}) Q h + diag(c) Q z + (W o Q K^T) U        (h = S_0^T, z = Z_0^T)
    z_next = e^{lb_L} z + (diag(R_L.) K)^T U
    h_next = e^{la_L} h + c_L z + (diag(W_L.) K)^T U                (L = last token of chunk)

Padding rows of a ragged last chunk cannot be made no-ops here (S keeps absorbing Z), so the
end-of-chunk quantities are read from row L explicitly.

Kernels (grid axes: V-blocks or chunks x batch*heads; all state math in fp32):
    _momentum_fwd_scan_kernel    sequential over chunks: O, saves chunk-start (h, z)
    _momentum_bwd_scan_kernel    reversed: dU and the carried (dh, dz); saves them per chunk
    _momentum_bwd_grads_kernel   parallel over chunks: dq, dk, dalpha, dbeta (reduces over V)
The scans and the gradient kernel autotune on a GPU (triton_delta.autotune_scan, autotune_grads).
Each kernel is a thin wrapper of one chunk-loop body (_momentum_fwd_scan, _momentum_bwd_scan,
_momentum_bwd_grads) that triton_memory.py's linear memory layer runs too (MEMORY variant).
"""
import torch
import triton
import triton.language as tl

from .triton_delta import (_chunk_span, _decay, _dot, _gate_grad,
                           _launch_dims, _load_gate, _load_kv, _load_qk, _load_rows, _load_state,
                           _load_state_or_zeros, _log_cumsum, _pick, _program, _reverse_cumsum,
                           _scalar_zero, _span_grad, _store_gate, _store_kv, _store_rows,
                           _store_state, autotune_grads, autotune_scan, jit_any_length,
                           launch_scan, launch_tuned)


@triton.jit
def _momentum_chunk_gates(alpha_ptr, beta_ptr, g_base, t0, T, H, BT: tl.constexpr,
                          PREC: tl.constexpr):
    """The chunk's gate matrices and the row-L quantities of the closed form above."""
    rows = tl.arange(0, BT)
    incl = rows[:, None] >= rows[None, :]
    alpha = _load_gate(alpha_ptr, g_base, t0, T, H, 1.0, BT)
    beta = _load_gate(beta_ptr, g_base, t0, T, H, 1.0, BT)
    la = _log_cumsum(alpha)
    lb = _log_cumsum(beta)
    L = tl.minimum(T - t0, BT) - 1
    p = _decay(la, la, incl)                                                  # [BT, BT]
    r = _decay(lb, lb, incl)
    w = _dot(p, r, PREC)
    a = tl.exp(la)
    b = tl.exp(lb)
    c = tl.sum(p * b[None, :], 1)
    w_last = tl.sum(tl.where(rows[:, None] == L, w, 0.0), 0)                  # W[L, :]
    r_last = tl.where(rows <= L, tl.exp(_pick(lb, rows, L) - lb), 0.0)        # R[L, :]
    return alpha, beta, L, p, r, w, a, b, c, w_last, r_last


@triton.jit
def _momentum_chunk_fwd(q, kc, u, h, z, w, a, b, c, w_last, r_last, rows, L, PREC: tl.constexpr):
    """One chunk of the closed form above, given the writes U [BT, BV] and the chunk-start
    (h, z): the readout O and the next chunk-start (h, z)."""
    wqk = w * _dot(q, tl.trans(kc), PREC)
    o = (a[:, None] * _dot(q, h, PREC)
         + c[:, None] * _dot(q, z, PREC)
         + _dot(wqk, u, PREC))
    z_next = (_pick(b, rows, L) * z
              + _dot(tl.trans(r_last[:, None] * kc), u, PREC))
    h_next = (_pick(a, rows, L) * h + _pick(c, rows, L) * z
              + _dot(tl.trans(w_last[:, None] * kc), u, PREC))
    return o, h_next, z_next


@triton.jit
def _momentum_chunk_bwd(q, kc, do, dh, dz, w, a, b, c, w_last, r_last, rows, L,
                        PREC: tl.constexpr):
    """One chunk stepped back (the backward scan's step), given dO and the chunk-end (dh, dz):
        dU  = (W o Q K^T)^T dO + diag(R_L.) K dz + diag(W_L.) K dh
        dh <- e^{la_L} dh + Q^T diag(e^{la}) dO ;  dz <- e^{lb_L} dz + c_L dh + Q^T diag(c) dO
    Returns (dU, chunk-start dh, chunk-start dz)."""
    wqk = w * _dot(q, tl.trans(kc), PREC)
    du = (_dot(tl.trans(wqk), do, PREC)
          + _dot(r_last[:, None] * kc, dz, PREC)
          + _dot(w_last[:, None] * kc, dh, PREC))
    dz_prev = (_pick(b, rows, L) * dz + _pick(c, rows, L) * dh
               + _dot(tl.trans(q * c[:, None]), do, PREC))
    dh_prev = (_pick(a, rows, L) * dh
               + _dot(tl.trans(q * a[:, None]), do, PREC))
    return du, dh_prev, dz_prev


@triton.jit
def _momentum_grads_tail(q, kc, qk, p, r, w, a, b, c, w_last, r_last, rows, L, d_wqk, do_h, do_z,
                         u_dh, u_dz, h_dh, z_dh, z_dz, PREC: tl.constexpr):
    """The chain rule of one chunk from the products that sum over V (d_wqk = dO U^T,
    do_h = dO h^T, do_z = dO z^T, u_dh = U dh_next^T, u_dz = U dz_next^T and the scalars
    <h, dh_next>, <z, dh_next>, <z, dz_next>) through O, z_next, h_next, then W = P R,
    c = P b, a = e^{la}, b = e^{lb}: returns (dq, dk, d_la, d_lb), the gradients w.r.t. the
    chunk's log alpha and log beta. qk = Q K^T."""
    incl = rows[:, None] >= rows[None, :]
    is_last = rows == L
    gw = d_wqk * w
    dq = a[:, None] * do_h + c[:, None] * do_z + _dot(gw, kc, PREC)
    dk = (_dot(tl.trans(gw), q, PREC)
          + w_last[:, None] * u_dh + r_last[:, None] * u_dz)
    # gradients of the gate quantities; the row-L ones come from h_next and z_next
    d_w = tl.where(incl, d_wqk * qk, 0.0) + tl.where(is_last[:, None],
                                                     tl.sum(kc * u_dh, 1)[None, :], 0.0)
    d_r = tl.where(is_last[:, None], tl.sum(kc * u_dz, 1)[None, :], 0.0)
    d_a = tl.sum(q * do_h, 1) + tl.where(is_last, h_dh, 0.0)
    d_c = tl.sum(q * do_z, 1) + tl.where(is_last, z_dh, 0.0)
    d_b = tl.where(is_last, z_dz, 0.0) + tl.sum(p * d_c[:, None], 0)          # c = P b
    d_p = _dot(d_w, tl.trans(r), PREC) + d_c[:, None] * b[None, :]
    d_r += _dot(tl.trans(p), d_w, PREC)                                        # W = P R
    e_p = tl.where(incl, d_p, 0.0) * p
    e_r = tl.where(incl, d_r, 0.0) * r
    # la_t, lb_t sum the log gates s <= t; the decays P, R hold s in (j, t] (_span_grad)
    d_la = (_reverse_cumsum(tl.where(rows <= L, a * d_a, 0.0), rows)
            + _span_grad(e_p, rows, L, False, PREC))
    d_lb = (_reverse_cumsum(tl.where(rows <= L, b * d_b, 0.0), rows)
            + _span_grad(e_r, rows, L, False, PREC))
    return dq, dk, d_la, d_lb


# The chunk loops below serve the momentum rule (triton_scans.py: chunk C = BT, writes U
# given) and the fused linear memory layer (triton_memory.py, MEMORY: chunk C <= BT, u_ptr
# holds the targets V and the writes are the inner gradient at the chunk-start state,
# U = 2 diag(lw) (V - K h); the chunk-start state of the last chunk W_B is returned). One
# body each, called by the kernels (thin wrappers that fix the variant) of both files.

@triton.jit
def _momentum_fwd_scan(q_ptr, k_ptr, u_ptr, alpha_ptr, beta_ptr, lw_ptr, s0_ptr, z0_ptr, o_ptr,
                       hc_ptr, zc_ptr, sT_ptr, zT_ptr, sB_ptr, T, H, K, V, C, NT,
                       HAS_S0: tl.constexpr, HAS_Z0: tl.constexpr, SAVE: tl.constexpr,
                       MEMORY: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, PREC: tl.constexpr):
    """One program per (V-block, batch*head), chunks in order, (h, z) [BK, BV] in registers;
    SAVE keeps each chunk's start (h, z) for the backward (skipped for inference)."""
    i_v, bh64, g_base = _program(T, H)
    v0 = i_v * BV
    rows = tl.arange(0, BT)
    h = _load_state_or_zeros(s0_ptr, bh64 * V * K, K, V, v0, HAS_S0, BK, BV)
    z = _load_state_or_zeros(z0_ptr, bh64 * V * K, K, V, v0, HAS_Z0, BK, BV)
    for i_t in range(NT):
        t0, end, L = _chunk_span(i_t, C, T)
        kv_base = (bh64 * NT + i_t) * K * V
        if SAVE:
            _store_kv(hc_ptr, kv_base, K, V, v0, h, BK, BV)
            _store_kv(zc_ptr, kv_base, K, V, v0, z, BK, BV)
        if MEMORY:
            if i_t == NT - 1:
                _store_state(sB_ptr, bh64 * V * K, K, V, v0, h, BK, BV)
        q, kc = _load_qk(q_ptr, k_ptr, g_base, t0, end, H, K, BT, BK)
        uc = _load_rows(u_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
        if MEMORY:       # U = 2 diag(lw) (V - K h), V-local
            lw = _load_gate(lw_ptr, g_base, t0, end, H, 0.0, BT)
            uc = (2.0 * lw)[:, None] * (uc - _dot(kc, h, PREC))
        alpha, beta, L, p, r, w, a, b, c, w_last, r_last = _momentum_chunk_gates(
            alpha_ptr, beta_ptr, g_base, t0, end, H, BT, PREC)
        o, h, z = _momentum_chunk_fwd(q, kc, uc, h, z, w, a, b, c, w_last, r_last, rows, L, PREC)
        _store_rows(o_ptr, g_base * V, t0, end, H * V, v0, V, o, BT, BV)
    _store_state(sT_ptr, bh64 * V * K, K, V, v0, h, BK, BV)
    _store_state(zT_ptr, bh64 * V * K, K, V, v0, z, BK, BV)


@triton.jit
def _momentum_bwd_scan(q_ptr, k_ptr, alpha_ptr, beta_ptr, lw_ptr, do_ptr, dsT_ptr, dzT_ptr,
                       dsB_ptr, dhc_ptr, dzc_ptr, du_ptr, dv_ptr, ds0_ptr, dz0_ptr, T, H, K, V,
                       C, NT, MEMORY: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, PREC: tl.constexpr):
    """Chunks in reverse, carrying (dh, dz) = gradients of the chunk-end state. Per chunk:
        dU  = (W o Q K^T)^T dO + diag(R_L.) K dz + diag(W_L.) K dh      (V-local: stored here)
        dh <- e^{la_L} dh + Q^T diag(e^{la}) dO
        dz <- e^{lb_L} dz + c_L dh + Q^T diag(c) dO
    MEMORY adds the writes' dependence on the chunk-start state, dh += -2 K^T diag(lw) dU,
    stores dV = 2 diag(lw) dU, and adds the gradient of the returned last chunk-start state."""
    i_v, bh64, g_base = _program(T, H)
    v0 = i_v * BV
    rows = tl.arange(0, BT)
    dh = _load_state(dsT_ptr, bh64 * V * K, K, V, v0, BK, BV)
    dz = _load_state(dzT_ptr, bh64 * V * K, K, V, v0, BK, BV)
    dh_start = _load_state_or_zeros(dsB_ptr, bh64 * V * K, K, V, v0, MEMORY, BK, BV)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        t0, end, L = _chunk_span(i_t, C, T)
        kv_base = (bh64 * NT + i_t) * K * V
        _store_kv(dhc_ptr, kv_base, K, V, v0, dh, BK, BV)
        _store_kv(dzc_ptr, kv_base, K, V, v0, dz, BK, BV)
        q, kc = _load_qk(q_ptr, k_ptr, g_base, t0, end, H, K, BT, BK)
        do = _load_rows(do_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
        alpha, beta, L, p, r, w, a, b, c, w_last, r_last = _momentum_chunk_gates(
            alpha_ptr, beta_ptr, g_base, t0, end, H, BT, PREC)
        du, dh, dz = _momentum_chunk_bwd(q, kc, do, dh, dz, w, a, b, c, w_last, r_last, rows, L,
                                         PREC)
        _store_rows(du_ptr, g_base * V, t0, end, H * V, v0, V, du, BT, BV)
        if MEMORY:
            lw2 = 2.0 * _load_gate(lw_ptr, g_base, t0, end, H, 0.0, BT)
            _store_rows(dv_ptr, g_base * V, t0, end, H * V, v0, V, lw2[:, None] * du, BT, BV)
            dh -= _dot(tl.trans(lw2[:, None] * kc), du, PREC)
            dh += tl.where(i_r == 0, 1.0, 0.0) * dh_start
    _store_state(ds0_ptr, bh64 * V * K, K, V, v0, dh, BK, BV)
    _store_state(dz0_ptr, bh64 * V * K, K, V, v0, dz, BK, BV)


@triton.jit
def _momentum_bwd_grads(q_ptr, k_ptr, u_ptr, alpha_ptr, beta_ptr, lw_ptr, do_ptr, du_ptr,
                        hc_ptr, zc_ptr, dhc_ptr, dzc_ptr, dq_ptr, dk_ptr, dalpha_ptr, dbeta_ptr,
                        dlw_ptr, T, H, K, V, C, NT, MEMORY: tl.constexpr, BT: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dq, dk and the gate gradients of one chunk (they sum over V): the chain rule through
    O, z_next, h_next, then W = P R, c = P b, a = e^{la}, b = e^{lb} down to log-gates.
    MEMORY: U is recomputed from the saved chunk-start h (u_ptr holds V, du_ptr the scan's
    dU), plus the chain rule through U = 2 diag(lw) (V - K h) into dk and dlw."""
    i_t, bh64, g_base = _program(T, H)
    t0, end, L = _chunk_span(i_t, C, T)
    rows = tl.arange(0, BT)
    kv_base = (bh64 * NT + i_t) * K * V
    q, kc = _load_qk(q_ptr, k_ptr, g_base, t0, end, H, K, BT, BK)
    alpha, beta, L, p, r, w, a, b, c, w_last, r_last = _momentum_chunk_gates(
        alpha_ptr, beta_ptr, g_base, t0, end, H, BT, PREC)
    qk = _dot(q, tl.trans(kc), PREC)
    if MEMORY:
        lw2 = 2.0 * _load_gate(lw_ptr, g_base, t0, end, H, 0.0, BT)
        du_h = tl.zeros([BT, BK], dtype=tl.float32)     # dU h^T (the write's K h)
        du_e = tl.zeros([BT], dtype=tl.float32)         # rows of dU . (V - K h)

    d_wqk = tl.zeros([BT, BT], dtype=tl.float32)    # dO U^T
    do_h = tl.zeros([BT, BK], dtype=tl.float32)     # dO h^T
    do_z = tl.zeros([BT, BK], dtype=tl.float32)     # dO z^T
    u_dh = tl.zeros([BT, BK], dtype=tl.float32)     # U dh_next^T
    u_dz = tl.zeros([BT, BK], dtype=tl.float32)     # U dz_next^T
    h_dh = _scalar_zero(BT)                         # <h, dh_next>
    z_dh = _scalar_zero(BT)                         # <z, dh_next>
    z_dz = _scalar_zero(BT)                         # <z, dz_next>
    for v0 in range(0, V, BV):
        do = _load_rows(do_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
        uc = _load_rows(u_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
        h = _load_kv(hc_ptr, kv_base, K, V, v0, BK, BV)
        z = _load_kv(zc_ptr, kv_base, K, V, v0, BK, BV)
        dh = _load_kv(dhc_ptr, kv_base, K, V, v0, BK, BV)
        dz = _load_kv(dzc_ptr, kv_base, K, V, v0, BK, BV)
        if MEMORY:
            du = _load_rows(du_ptr, g_base * V, t0, end, H * V, v0, V, BT, BV)
            resid = uc - _dot(kc, h, PREC)
            uc = lw2[:, None] * resid
            du_h += _dot(du, tl.trans(h), PREC)
            du_e += tl.sum(du * resid, 1)
        d_wqk += _dot(do, tl.trans(uc), PREC)
        do_h += _dot(do, tl.trans(h), PREC)
        do_z += _dot(do, tl.trans(z), PREC)
        u_dh += _dot(uc, tl.trans(dh), PREC)
        u_dz += _dot(uc, tl.trans(dz), PREC)
        h_dh += tl.sum(tl.sum(h * dh, 1), 0)
        z_dh += tl.sum(tl.sum(z * dh, 1), 0)
        z_dz += tl.sum(tl.sum(z * dz, 1), 0)

    dq, dk, d_la, d_lb = _momentum_grads_tail(q, kc, qk, p, r, w, a, b, c, w_last, r_last, rows, L,
                                              d_wqk, do_h, do_z, u_dh, u_dz, h_dh, z_dh, z_dz,
                                              PREC)
    if MEMORY:
        dk -= lw2[:, None] * du_h
        _store_gate(dlw_ptr, g_base, t0, end, H, 2.0 * du_e, BT)
    _store_rows(dq_ptr, g_base * K, t0, end, H * K, 0, K, dq, BT, BK)
    _store_rows(dk_ptr, g_base * K, t0, end, H * K, 0, K, dk, BT, BK)
    _store_gate(dalpha_ptr, g_base, t0, end, H, _gate_grad(d_la, alpha), BT)
    _store_gate(dbeta_ptr, g_base, t0, end, H, _gate_grad(d_lb, beta), BT)


@autotune_scan
@jit_any_length
def _momentum_fwd_scan_kernel(q_ptr, k_ptr, u_ptr, alpha_ptr, beta_ptr, s0_ptr, z0_ptr, o_ptr,
                              hc_ptr, zc_ptr, sT_ptr, zT_ptr, T, H, K, V, NT, NBH,
                              HAS_S0: tl.constexpr, HAS_Z0: tl.constexpr, SAVE: tl.constexpr,
                              BT: tl.constexpr,
                              BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """The momentum rule's forward scan (_momentum_fwd_scan with chunk BT): O, S_T, Z_T, and
    with SAVE each chunk's start (h, z)."""
    _momentum_fwd_scan(q_ptr, k_ptr, u_ptr, alpha_ptr, beta_ptr, alpha_ptr, s0_ptr, z0_ptr,
                       o_ptr, hc_ptr, zc_ptr, sT_ptr, zT_ptr, sT_ptr, T, H, K, V, BT, NT,
                       HAS_S0, HAS_Z0, SAVE, False, BT, BK, BV, PREC)


@autotune_scan
@jit_any_length
def _momentum_bwd_scan_kernel(q_ptr, k_ptr, alpha_ptr, beta_ptr, do_ptr, dsT_ptr, dzT_ptr,
                              dhc_ptr, dzc_ptr, du_ptr, ds0_ptr, dz0_ptr, T, H, K, V, NT, NBH,
                              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                              PREC: tl.constexpr):
    """The momentum rule's backward scan (_momentum_bwd_scan with chunk BT): dU, (dh, dz)
    per chunk, dS_0, dZ_0."""
    _momentum_bwd_scan(q_ptr, k_ptr, alpha_ptr, beta_ptr, alpha_ptr, do_ptr, dsT_ptr, dzT_ptr,
                       dsT_ptr, dhc_ptr, dzc_ptr, du_ptr, du_ptr, ds0_ptr, dz0_ptr, T, H, K, V,
                       BT, NT, False, BT, BK, BV, PREC)


@autotune_grads
@jit_any_length
def _momentum_bwd_grads_kernel(q_ptr, k_ptr, u_ptr, alpha_ptr, beta_ptr, do_ptr, hc_ptr, zc_ptr,
                               dhc_ptr, dzc_ptr, dq_ptr, dk_ptr, dalpha_ptr, dbeta_ptr,
                               T, H, K, V, NT, BT: tl.constexpr, BK: tl.constexpr,
                               BV: tl.constexpr, PREC: tl.constexpr):
    """The momentum rule's chunk-parallel gradients (_momentum_bwd_grads with chunk BT): dq,
    dk, dalpha, dbeta."""
    _momentum_bwd_grads(q_ptr, k_ptr, u_ptr, alpha_ptr, beta_ptr, alpha_ptr, do_ptr, do_ptr,
                        hc_ptr, zc_ptr, dhc_ptr, dzc_ptr, dq_ptr, dk_ptr, dalpha_ptr, dbeta_ptr,
                        dalpha_ptr, T, H, K, V, BT, NT, False, BT, BK, BV, PREC)


# ----------------------------------------------------------------------------- host side

def momentum_forward(q, k, u, alpha, beta, initial_state, initial_momentum, save, BT, BK, BV):
    """Returns (o, S_T fp32, Z_T fp32, chunk-start h and z [B*H, NT, K, V] fp32); the last
    two feed the backward and are empty unless `save`."""
    B, T, H, K, V, NT, tiles, f32 = _launch_dims(q, u, BT, BT, BK, BV)
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    h_chunks = torch.empty((B * H, NT, K, V) if save else (0,), **f32)
    z_chunks = torch.empty((B * H, NT, K, V) if save else (0,), **f32)
    s_final = torch.empty(B, H, V, K, **f32)
    z_final = torch.empty(B, H, V, K, **f32)
    has_s0, has_z0 = initial_state is not None, initial_momentum is not None
    launch_scan(_momentum_fwd_scan_kernel, V, B * H,
                q, k, u, alpha, beta, initial_state if has_s0 else s_final,
                initial_momentum if has_z0 else z_final, o, h_chunks, z_chunks, s_final, z_final,
                T, H, K, V, NT, HAS_S0=has_s0, HAS_Z0=has_z0, SAVE=save, **tiles)
    return o, s_final, z_final, h_chunks, z_chunks


def momentum_backward(q, k, u, alpha, beta, h_chunks, z_chunks, grad_o, grad_state,
                      grad_momentum, BT, BK, BV):
    """Returns (dq, dk, du, dalpha, dbeta, dS_0 fp32, dZ_0 fp32)."""
    B, T, H, K, V, NT, tiles, f32 = _launch_dims(q, u, BT, BT, BK, BV)
    dh_chunks = torch.empty(B * H, NT, K, V, **f32)
    dz_chunks = torch.empty(B * H, NT, K, V, **f32)
    ds0 = torch.empty(B, H, V, K, **f32)
    dz0 = torch.empty(B, H, V, K, **f32)
    dq, dk, du = torch.empty_like(q), torch.empty_like(k), torch.empty_like(u)
    dalpha, dbeta = torch.empty_like(alpha), torch.empty_like(beta)
    launch_scan(_momentum_bwd_scan_kernel, V, B * H,
                q, k, alpha, beta, grad_o, grad_state, grad_momentum, dh_chunks, dz_chunks, du,
                ds0, dz0, T, H, K, V, NT, **tiles)
    if NT > 0:
        launch_tuned(_momentum_bwd_grads_kernel, (NT, B * H),
                     q, k, u, alpha, beta, grad_o, h_chunks, z_chunks, dh_chunks, dz_chunks, dq,
                     dk, dalpha, dbeta, T, H, K, V, NT, **tiles)
    return dq, dk, du, dalpha, dbeta, ds0, dz0
