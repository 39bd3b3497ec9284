"""Fused Triton kernels for the residual 2-layer MLP memory layer (DESIGN §3.3, §4 item (a)).

The memory M(x) = x + W_out s(W_in x) (W_in [E, d], W_out [d, E], s = SiLU or GELU) is
trained per chunk of C tokens at the chunk-start weights W_B (memory.py's module docstring).
Per (batch, head) one program walks all chunks with both layers' states in registers, as
h1 = W_in^T [d, E] and h2 = W_out^T [E, d] (the scan kernels' transposed layout):

  1. inner forward at W_B, closed-form inner gradient (memory.py `_inputs_and_gradients`):
        Z = K h1,  Hh = s(Z),  Err = 2 (K + Hh h2 - V),  G1 = (Err h2^T) o s'(Z)
  2. write rates (NL Eq. 57/88, each layer with its own input a_t: K for W_in, Hh for W_out):
        DGD: eta_t = lw_t = lr_t / (1 + lr_t ||a_t||^2);  GD and momentum: eta_t = 0, lw_t = lr_t
     writes U1 = -diag(lw1) G1 (W_in), U2 = -diag(lw2) Err (W_out).
  3. per layer, one chunk of the transition with all of the state in registers:
     DGD / GD, the delta rule's chunk algebra (triton_delta.py's module docstring):
        Tm = (I + A)^{-1},  Delta = Tm (U - diag(eta e^gp) K_a h)
        O = diag(e^g) Q h + (Gamma o Q K_a^T) Delta,   h_next = e^{g_L} h + (diag(e^{g_L-g}) K_a)^T Delta
     momentum (Titans Eq. 13-14), the momentum rule's closed form (triton_momentum.py):
        O = diag(e^la) Q h + diag(c) Q z + (W o Q K_a^T) U,  then (h, z) at the chunk's end
     the W_in scan reads Q = q and has K_a = K; the W_out scan reads Q = s(O1) (the readout
     after the write, layer by layer) and has K_a = Hh.
  4. y = q + O2.

Unlike the linear memory, the writes are not linear in W_B, so the whole chunk (both layers,
all of E and d) is one tile set per program and the chunk loop is sequential per (batch,
head): B*H programs. The forward saves only chunk-start states (and momenta), every R-th
chunk's (`save_interval`: R = 1 up to 16 chunks, else ceil(sqrt(T/C))); for R > 1 the
backward first re-runs the forward over each block of R chunks, last block first, from its
saved start to get the block's chunk starts (`backward_in_blocks`). The backward walks the
chunks in reverse with the state gradients in registers: per chunk it recomputes steps 1-3
from the chunk's start states, steps back through layer 2, s(O1)
and layer 1 (`_chunk_delta_bwd` / `_chunk_momentum_bwd`, built on triton_delta's and
triton_momentum's per-chunk helpers), then through the write rates and the inner gradient
(`_inner_write_bwd`), which needs s''(Z) (closed forms: triton_cms.py's `_act`), and, with
self-generated targets, through the target read (`_self_target_bwd`). Layer 1's UT system
(Tm) comes from the recomputed forward, solved once per chunk.

Shared memory (the backward). On a GPU every dot operand is staged in shared memory, and the
compiler keeps one copy per value from its first dot to its last (it merges a value's copies,
and places a loaded value's copy right after the load). A chunk body that reused its tiles
across the phases above kept ~25 [64, 128] / [64, 64] copies live at once: 416 KiB at d = 64,
E = 128, C = 64, over an H100's 227 KiB. So the backward leaves each chunk's tiles (q, K, V's
writes, both layers' queries, inputs and states, Err, dO, dh, W, Delta, dDelta) in a per-
program fp32 scratch buffer in global memory (DELTA_SLOTS / MOMENTUM_SLOTS padded tiles per
(batch, head), L2-resident, `_scratch`) and re-reads them for each dot (`_reload`, `_reload_t`
for a transposed operand straight from memory): each copy then dies at its dot, and at that
shape the backwards take at most 192 KiB (`fusable_mlp` lists the measured bytes of every
shape). Every scratch access sits behind a barrier (tl.debug_barrier), which also keeps the
compiler from merging the re-reads into one load. The forwards do the same with fewer slots
(DELTA_FWD_SLOTS / MOMENTUM_FWD_SLOTS: each chunk's start states, and the momentum forward's
U2): the copies of the (h, z) states, live across the whole chunk, had taken the momentum
forward to 224 KiB with tf32 products; now the forwards take at most 164,096 B there.

    fused_mlp_memory_delta(q, k, v, alpha, lr, w_in, w_out, chunk_size, dgd, activation,
                           max_grad_norm, self_target)
        -> (y [B,T,H,d] in q's dtype, (W_in, W_out) at T, (W_in, W_out) at the start of the
            last chunk); weights [B,H,E,d] and [B,H,d,E] fp32 like memory.py's. self_target
            (HOPE's M_mem, NL Eq. 87): each chunk's targets are V~ = V + s(V h1) h2 at its
            start weights (`_self_target`), and the backward steps back through them.
    fused_mlp_memory_momentum(q, k, v, alpha, beta, lr, w_in, w_out, z_in, z_out, chunk_size,
                              activation) -> (y, (W_in, W_out), (Z_in, Z_out), last W_B pair)

Gradients flow to q, k, v, the gates and the initial weights (and momenta), from every
output. Limits (`fusable_mlp`): d <= 128, E <= 128, C <= 64 at d <= 64 and C <= 32 (DGD /
GD) or 16 (momentum) at wider heads (`max_mlp_chunk`), every update rule: all of a program's
tiles sit in registers (at d = 64, E = 128 the four state tiles alone are 128 KiB of fp32,
256 KiB at d = E = 128, so the largest shapes spill to local memory on a GPU; their speed is
unmeasured). All of these shapes fit an H100's shared memory (above). The backward's scratch
is 16 (14 for momentum) * max(C, d, E) * max(C, d) fp32 per (batch, head): 512 KiB at
d = 64, E = 128, C = 64, 1 MiB at d = E = 128; the forward's 2 (5 for momentum) such slots.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import SUPPORTED_DTYPES, check_constant, check_saved_chunks, check_scan_inputs, check_tensors
from .triton_cms import ACT_IDS, _act
from .triton_delta import (CHUNK_WARPS, _chunk_output, _chunk_span, _contiguous, _decay,
                           _delta_chunk_gates, _delta_grads_tail, _delta_ut_system, _dot,
                           _gate_grad, _grad_or_zeros, _load_gate, _load_kv, _load_qk, _load_rows,
                           _load_state, _needs_grad, _pick, _program, _store_gate, _store_kv,
                           _store_rows, _store_state, dot_precision, jit_any_length,
                           on_input_device)
from .triton_momentum import (_momentum_chunk_bwd, _momentum_chunk_fwd, _momentum_chunk_gates,
                              _momentum_grads_tail)

__all__ = ["fused_mlp_memory_delta", "fused_mlp_memory_momentum", "fusable_mlp", "max_mlp_chunk",
           "MAX_MLP_HEAD_DIM", "MAX_MLP_HIDDEN", "MAX_MLP_CHUNK"]

MAX_MLP_HEAD_DIM = 128    # d: both layers' states, their gradients and the chunk tiles
MAX_MLP_HIDDEN = 128      # E: sit in one program's registers
MAX_MLP_CHUNK = 64        # C at d <= 64; wider heads take less (max_mlp_chunk)
MAX_SAVED_CHUNKS = 16     # the forwards save every chunk's start up to this many (save_interval)
FUSED_RULES = ("dgd", "gd", "momentum")


# ----------------------------------------------------------------------------- jit helpers

# Scratch slots per backward program (module docstring, "Shared memory"): one padded tile each.
DELTA_SLOTS = tl.constexpr(16)
MOMENTUM_SLOTS = tl.constexpr(14)
# ... and per forward program: the chunk-start states (h1, h2; momentum: z1, z2 and layer 2's
# writes U2 too).
DELTA_FWD_SLOTS = tl.constexpr(2)
MOMENTUM_FWD_SLOTS = tl.constexpr(5)


@triton.jit
def _spill(slot, x, R: tl.constexpr, Cc: tl.constexpr):
    """Store a padded [R, Cc] fp32 tile row-major in a scratch slot. The barrier first: no
    thread still reads the slot's previous tile (every read is a `_reload`, behind its own
    barrier)."""
    tl.debug_barrier()
    tl.store(slot + tl.arange(0, R)[:, None] * Cc + tl.arange(0, Cc)[None, :], x)


@triton.jit
def _spill_scan(sk, su, sh, k, u, h, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """One layer's scan operands into their slots: keys [BT, BK], writes [BT, BV], chunk-start
    state [BK, BV] (layer 1: K = d, V = E; layer 2 the other way)."""
    _spill(sk, k, BT, BK)
    _spill(su, u, BT, BV)
    _spill(sh, h, BK, BV)


@triton.jit
def _reload(slot, R: tl.constexpr, Cc: tl.constexpr):
    """The [R, Cc] tile of a scratch slot, as a new value: the barrier makes every thread's
    `_spill` visible and keeps the compiler from merging this load with an earlier one, so
    that a dot operand read here gets a shared-memory copy of its own that dies at its dot."""
    tl.debug_barrier()
    return tl.load(slot + tl.arange(0, R)[:, None] * Cc + tl.arange(0, Cc)[None, :])


@triton.jit
def _reload_t(slot, R: tl.constexpr, Cc: tl.constexpr):
    """The transpose [Cc, R] of a slot's [R, Cc] tile, read straight from memory (a dot
    operand tl.trans(x) of a register tile x shares x's shared-memory copy instead)."""
    tl.debug_barrier()
    return tl.load(slot + tl.arange(0, Cc)[:, None] + tl.arange(0, R)[None, :] * Cc)


@triton.jit
def _load_chunk(q_ptr, k_ptr, v_ptr, g_base, t0, end, H, D, BT: tl.constexpr, BD: tl.constexpr):
    """The chunk's q, k, v rows, [BT, BD] fp32 each (every kernel's chunk loop)."""
    qc, kc = _load_qk(q_ptr, k_ptr, g_base, t0, end, H, D, BT, BD)
    return qc, kc, _load_rows(v_ptr, g_base * D, t0, end, H * D, 0, D, BT, BD)


@triton.jit
def _save_pair(c1_ptr, c2_ptr, x1, x2, bh64, i_t, NT, EVERY, D, E, BD: tl.constexpr,
               BE: tl.constexpr):
    """Chunk i_t's start pair (x1 [D, E], x2 [E, D]) into the saves [B*H, cdiv(NT, EVERY), .]
    for the backward, if i_t is a multiple of EVERY (`save_interval`)."""
    if i_t % EVERY == 0:
        i_s = bh64 * ((NT + EVERY - 1) // EVERY) + i_t // EVERY
        _store_kv(c1_ptr, i_s * D * E, D, E, 0, x1, BD, BE)
        _store_kv(c2_ptr, i_s * E * D, E, D, 0, x2, BE, BD)


@triton.jit
def _save_chunk_start(h1c_ptr, h2c_ptr, winB_ptr, woutB_ptr, h1, h2, bh64, i_t, NT, EVERY, D, E,
                      SAVE: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr):
    """The forwards' saves of a chunk's start (h1, h2): for the backward (SAVE, `_save_pair`),
    and the last chunk's as the returned W_B."""
    if SAVE:
        _save_pair(h1c_ptr, h2c_ptr, h1, h2, bh64, i_t, NT, EVERY, D, E, BD, BE)
    if i_t == NT - 1:
        _store_state(winB_ptr, bh64 * E * D, D, E, 0, h1, BD, BE)
        _store_state(woutB_ptr, bh64 * D * E, E, D, 0, h2, BE, BD)


@triton.jit
def _self_target(vc, h1, h2, ACT: tl.constexpr, PREC: tl.constexpr):
    """HOPE's self-generated target (NL Eq. 87), v^_t = M_B(v_t) = v_t + W_out s(W_in v_t) at
    the chunk-start weights (row form: V + s(V h1) h2), before the chunk's writes."""
    hv, ds_unused, dds_unused = _act(_dot(vc, h1, PREC), ACT, 0)
    return vc + _dot(hv, h2, PREC)


@triton.jit
def _self_target_bwd(sv, sh1, sh2, dvt, dh1, dh2, ACT: tl.constexpr, BT: tl.constexpr,
                     BD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr):
    """The chain rule of `_self_target`, given the target's gradient dvt: with A = V h1,
    dM = (dvt h2^T) o s'(A):  dV = dvt + dM h1^T,  dh1 += V^T dM,  dh2 += s(A)^T dvt.
    V, h1, h2 from their scratch slots. Returns (dV, dh1, dh2)."""
    hv, ds, dds_unused = _act(_dot(_reload(sv, BT, BD), _reload(sh1, BD, BE), PREC), ACT, 1)
    dm = _dot(dvt, _reload_t(sh2, BE, BD), PREC) * ds
    dh2 += _dot(tl.trans(hv), dvt, PREC)
    dh1 += _dot(_reload_t(sv, BT, BD), dm, PREC)
    return dvt + _dot(dm, _reload_t(sh1, BD, BE), PREC), dh1, dh2


@triton.jit
def _inner_write(kc, vc, lr, h1, h2, tau, DGD: tl.constexpr, CLIP: tl.constexpr,
                 ACT: tl.constexpr, PREC: tl.constexpr):
    """Step 1-2 of the module docstring for one chunk at the chunk-start (h1, h2): the inner
    forward, closed-form inner gradient, write rates and both layers' writes. CLIP: memory.py's
    max_grad_norm tau, each token's gradient (both layers together) scaled by
    c = tau / max(tau, ||dl/dW||), ||dl/dW||^2 = ||G1||^2 ||k||^2 + ||Err||^2 ||Hh||^2."""
    z = _dot(kc, h1, PREC)                                                    # [BT, BE]
    hh, s1, s2 = _act(z, ACT, 2)                                              # s, s', s''
    err = 2.0 * (kc + _dot(hh, h2, PREC) - vc)                                # [BT, BD]
    m = _dot(err, tl.trans(h2), PREC)                                         # W_out^T e
    g1 = m * s1
    if DGD:
        eta1 = lr / (1.0 + lr * tl.sum(kc * kc, 1))                           # eta' (NL Eq. 57)
        eta2 = lr / (1.0 + lr * tl.sum(hh * hh, 1))
        lw1, lw2 = eta1, eta2
    else:
        eta1 = tl.zeros_like(lr)
        eta2 = eta1
        lw1, lw2 = lr, lr
    if CLIP:
        squared = (tl.sum(g1 * g1, 1) * tl.sum(kc * kc, 1)
                   + tl.sum(err * err, 1) * tl.sum(hh * hh, 1))
        scale = tau / tl.sqrt(tl.maximum(squared, tau * tau))
    else:
        scale = tl.full(lr.shape, 1.0, tl.float32)
    u1 = -(lw1 * scale)[:, None] * g1
    u2 = -(lw2 * scale)[:, None] * err
    return scale, hh, s1, s2, err, m, g1, eta1, eta2, lw1, lw2, u1, u2


@triton.jit
def _chunk_delta_fwd(q, kc, u, eta, g, gp, h, rows, L, READOUT: tl.constexpr, BT: tl.constexpr,
                     PREC: tl.constexpr):
    """One delta-rule chunk with all of V in registers (triton_delta.py's algebra):
    Delta = Tm (U - diag(eta e^gp) K h), readout O after each write (READOUT; else O = 0 and
    q is not read), next chunk-start h. Also returns the UT system's K K^T, decay mask and Tm,
    which the backward reuses."""
    a, kk, decay_a, tm = _delta_ut_system(kc, g, gp, eta, BT, PREC)
    kh = _dot(kc, h, PREC)
    d = _dot(tm, u - (eta * tl.exp(gp))[:, None] * kh, PREC)
    if READOUT:
        o = _chunk_output(q, kc, g, rows[:, None] >= rows[None, :], h, d, PREC)
    else:
        o = 0.0
    g_last = _pick(g, rows, L)
    kt = tl.where(rows <= L, tl.exp(g_last - g), 0.0)[:, None] * kc
    h_next = tl.exp(g_last) * h + _dot(tl.trans(kt), d, PREC)
    return o, h_next, kk, decay_a, tm


@triton.jit
def _chunk_delta_bwd(sq, sk, su, sh, sdo, sdh, sw, sd, sdd, dh, kk, decay_a, tm, eta, g, gp, rows,
                     L, READOUT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, PREC: tl.constexpr):
    """The chain rule of `_chunk_delta_fwd` with all of V in registers: given dh_next (dh,
    registers) and the chunk's tiles in scratch slots (Q, K [BT, BK], U, dO [BT, BV], h
    [BK, BV]; sdh, sw, sd, sdd: slots for dh_next, W, Delta, dDelta), returns (dQ, dK, dU,
    deta, dlog_alpha, dh at the chunk start): the delta rule's backward scan step, then
    triton_delta._delta_grads_tail on the products that sum over V. (kk, decay_a, tm): the
    chunk's UT system. Every dot reads its operands from scratch unless they were formed
    just before it, so no operand's shared-memory copy outlives its dot (module docstring,
    "Shared memory").
    READOUT False: the readout was unused (dO = 0), so sq and sdo are not read, every dO
    product is skipped and dQ is 0."""
    _spill(sdh, dh, BK, BV)
    g_last = _pick(g, rows, L)
    if READOUT:
        gamma = _decay(g, g, rows[:, None] >= rows[None, :])
        mq = gamma * _dot(_reload(sq, BT, BK), _reload_t(sk, BT, BK), PREC)
    else:
        gamma, mq = 0.0, 0.0
    kt_scale = tl.where(rows <= L, tl.exp(g_last - g), 0.0)
    b_scale = eta * tl.exp(gp)                                               # B = diag(.) K
    w = _dot(tm, b_scale[:, None] * _reload(sk, BT, BK), PREC)                     # W = Tm B
    _spill(sw, w, BT, BK)
    d = (_dot(tm, _reload(su, BT, BV), PREC)
         - _dot(w, _reload(sh, BK, BV), PREC))
    _spill(sd, d, BT, BV)
    dd = _dot(kt_scale[:, None] * _reload(sk, BT, BK), _reload(sdh, BK, BV), PREC)   # dDelta
    if READOUT:
        dd += _dot(tl.trans(mq), _reload(sdo, BT, BV), PREC)
    _spill(sdd, dd, BT, BV)
    dh_prev = tl.exp(g_last) * dh - _dot(_reload_t(sw, BT, BK), dd, PREC)
    if READOUT:
        dh_prev += _dot(_reload_t(sq, BT, BK) * tl.exp(g)[None, :], _reload(sdo, BT, BV), PREC)
        do = _reload(sdo, BT, BV)
        d_mq = _dot(do, _reload_t(sd, BT, BV), PREC)
        d_qh = _dot(do, _reload_t(sh, BK, BV), PREC)
        q = _reload(sq, BT, BK)
    else:
        d_mq, d_qh, q = 0.0, 0.0, 0.0
    dd_r = _reload(sdd, BT, BV)
    d_w = -_dot(dd_r, _reload_t(sh, BK, BV), PREC)
    dd_u = _dot(dd_r, _reload_t(su, BT, BV), PREC)
    d_kt = _dot(_reload(sd, BT, BV), _reload_t(sdh, BK, BV), PREC)
    h_dh = tl.sum(tl.sum(_reload(sh, BK, BV) * dh, 1), 0)
    dq, dk, deta, dlog_alpha, tail_unused = _delta_grads_tail(
        q, _reload(sk, BT, BK), g, gp, eta, rows, L, tm, kk, decay_a, gamma, mq, kt_scale,
        b_scale, d_mq, d_qh, d_w, d_kt, dd_u, h_dh, READOUT, PREC)
    du = _dot(tl.trans(tm), _reload(sdd, BT, BV), PREC)                    # dU = Tm^T dU'
    return dq, dk, du, deta, dlog_alpha, dh_prev


@triton.jit
def _inner_write_bwd(sk, shh, serr, sh1, sh2, s1, s2, m, g1, lr, eta1, eta2, lw1, lw2, scale,
                     tau, du1, du2, deta1, deta2, dk, dhh, dh1, dh2, DGD: tl.constexpr,
                     CLIP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
                     PREC: tl.constexpr):
    """The chain rule of `_inner_write`, given the gradients of both layers' writes (du),
    rates (deta) and inputs (dk from W_in's scan, dhh from W_out's): adds to dk and to the
    chunk-start state gradients (dh1, dh2); returns (dk, dv, dlr, dh1, dh2). K, Hh, Err, h1,
    h2 come from their scratch slots (sk, shh, serr, sh1, sh2), read afresh for each dot."""
    kc = _reload(sk, BT, BD)
    hh = _reload(shh, BT, BE)
    err = _reload(serr, BT, BD)
    # writes U1 = -lw1 c G1, U2 = -lw2 c Err (c: the clip scale, 1 without CLIP)
    dlw1 = -tl.sum(du1 * g1, 1)                                               # d(lw1 c)
    dlw2 = -tl.sum(du2 * err, 1)
    dg1 = -(lw1 * scale)[:, None] * du1
    derr = -(lw2 * scale)[:, None] * du2
    if CLIP:   # c = tau / sqrt(squared) where squared > tau^2 (else 1, no gradient)
        n_k, n_h = tl.sum(kc * kc, 1), tl.sum(hh * hh, 1)
        n_g, n_e = tl.sum(g1 * g1, 1), tl.sum(err * err, 1)
        squared = n_g * n_k + n_e * n_h
        dsq = tl.where(squared > tau * tau,
                       -0.5 * (dlw1 * lw1 + dlw2 * lw2) * scale / tl.maximum(squared, tau * tau),
                       0.0)
        dg1 += (2.0 * dsq * n_k)[:, None] * g1
        dk += (2.0 * dsq * n_g)[:, None] * kc
        derr += (2.0 * dsq * n_h)[:, None] * err
        dhh += (2.0 * dsq * n_e)[:, None] * hh
        dlw1 = dlw1 * scale
        dlw2 = dlw2 * scale
    # DGD rates eta = lw = lr / (1 + lr ||a||^2)
    if DGD:
        t1 = deta1 + dlw1
        t2 = deta2 + dlw2
        den1 = 1.0 + lr * tl.sum(kc * kc, 1)
        den2 = 1.0 + lr * tl.sum(hh * hh, 1)
        dlr = t1 / (den1 * den1) + t2 / (den2 * den2)
        dk += (-2.0 * t1 * eta1 * eta1)[:, None] * kc
        dhh += (-2.0 * t2 * eta2 * eta2)[:, None] * hh
    else:
        dlr = dlw1 + dlw2
    # G1 = (Err h2^T) o s'(Z), Err = 2 (K + s(Z) h2 - V), Z = K h1
    dm = dg1 * s1
    dz = dg1 * m * s2
    derr += _dot(dm, _reload(sh2, BE, BD), PREC)
    dh2 += _dot(tl.trans(dm), _reload(serr, BT, BD), PREC)
    dp = 2.0 * derr
    dk += dp
    dhh += _dot(dp, _reload_t(sh2, BE, BD), PREC)
    dh2 += _dot(_reload_t(shh, BT, BE), dp, PREC)
    dz += dhh * s1
    dk += _dot(dz, _reload_t(sh1, BD, BE), PREC)
    dh1 += _dot(_reload_t(sk, BT, BD), dz, PREC)
    return dk, -dp, dlr, dh1, dh2


@triton.jit
def _dgd_chunk_bwd(qc, kc, vc, dy, g, gp, lr, h1, h2, dh1, dh2, slots, S, rows, L, tau,
                   DGD: tl.constexpr, CLIP: tl.constexpr, ACT: tl.constexpr,
                   SELF_TARGET: tl.constexpr, READOUT: tl.constexpr, BT: tl.constexpr,
                   BD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr):
    """One DGD / GD chunk of the backward, in four phases (module docstring): recompute the
    chunk from its start (h1, h2), leaving its tiles in the DELTA_SLOTS scratch slots of S
    floats at `slots`; step back through layer 2, s(O1) and layer 1; then the write rates and
    the inner gradient (and, SELF_TARGET, the target M_B(v)). dy: the readout's gradient;
    (dh1, dh2): dL/d(the next chunk's start states). Returns (dq (with dy: y = q + O2), dk,
    dv, dlr, dlog_alpha, dh1, dh2 at this chunk's start). READOUT False (HOPE's projection
    memories, whose readouts are unused): qc and dy are not read, the readout chain (O1, s(O1)
    and every dO product) is skipped, and dq is 0."""
    sq1, sk1, su1, sh1, stm1 = slots, slots + S, slots + 2 * S, slots + 3 * S, slots + 4 * S
    sq2, sk2, su2, sh2, serr = (slots + 5 * S, slots + 6 * S, slots + 7 * S, slots + 8 * S,
                                slots + 9 * S)
    sdo, sdh, sw, sd, sdd = (slots + 10 * S, slots + 11 * S, slots + 12 * S, slots + 13 * S,
                             slots + 14 * S)
    sv = slots + 15 * S
    # 1. the chunk's forward from its start (layer 2's readout is not needed)
    if SELF_TARGET:
        _spill(sv, vc, BT, BD)
        vc = _self_target(vc, h1, h2, ACT, PREC)
    scale, hh, s1, s2, err, m, g1, eta1, eta2, lw1, lw2, u1, u2 = _inner_write(
        kc, vc, lr, h1, h2, tau, DGD, CLIP, ACT, PREC)
    o1, h1_unused, kk1, decay1, tm1 = _chunk_delta_fwd(qc, kc, u1, eta1, g, gp, h1, rows, L,
                                                       READOUT, BT, PREC)
    if READOUT:
        q2, ds_o1, dds_unused = _act(o1, ACT, 1)
        _spill(sq1, qc, BT, BD)
        _spill(sq2, q2, BT, BE)
        _spill(sdo, dy, BT, BD)
    _spill_scan(sk1, su1, sh1, kc, u1, h1, BT, BD, BE)
    _spill(stm1, tm1, BT, BT)
    _spill_scan(sk2, su2, sh2, hh, u2, h2, BT, BE, BD)
    _spill(serr, err, BT, BD)
    # 2. layer 2 (W_out: query s(O1), input Hh, writes U2)
    a2_unused, kk2, decay2, tm2 = _delta_ut_system(_reload(sk2, BT, BE), g, gp, eta2, BT, PREC)
    dq2, dhh, du2, deta2, dla, dh2 = _chunk_delta_bwd(sq2, sk2, su2, sh2, sdo, sdh, sw, sd, sdd,
                                                      dh2, kk2, decay2, tm2, eta2, g, gp, rows,
                                                      L, READOUT, BT, BE, BD, PREC)
    # 3. s(O1), then layer 1 (W_in: query q, input K, writes U1; its UT system from 1.)
    if READOUT:
        _spill(sdo, dq2 * ds_o1, BT, BE)
    dq1, dk, du1, deta1, dla1, dh1 = _chunk_delta_bwd(sq1, sk1, su1, sh1, sdo, sdh, sw, sd, sdd,
                                                      dh1, kk1, decay1, _reload(stm1, BT, BT),
                                                      eta1, g, gp, rows, L, READOUT, BT, BD, BE,
                                                      PREC)
    # 4. the write rates and the inner gradient
    dk, dv, dlr, dh1, dh2 = _inner_write_bwd(sk1, sk2, serr, sh1, sh2, s1, s2, m, g1, lr, eta1,
                                             eta2, lw1, lw2, scale, tau, du1, du2, deta1, deta2,
                                             dk, dhh, dh1, dh2, DGD, CLIP, BT, BD, BE, PREC)
    if SELF_TARGET:   # dv so far is the target's gradient
        dv, dh1, dh2 = _self_target_bwd(sv, sh1, sh2, dv, dh1, dh2, ACT, BT, BD, BE, PREC)
    if READOUT:
        dq1 += dy
    return dq1, dk, dv, dlr, dla + dla1, dh1, dh2


@triton.jit
def _chunk_grads_out(dq_ptr, dk_ptr, dv_ptr, dlr_ptr, dwinB_ptr, dwoutB_ptr, dq, dk, dv, dlr, dh1,
                     dh2, i_r, bh64, g_base, t0, end, H, D, E, BT: tl.constexpr,
                     BD: tl.constexpr, BE: tl.constexpr):
    """The end of a backward chunk step: store the chunk's dq, dk, dv, dlr; at the last chunk
    (i_r == 0, the first in reverse) add the gradient of the returned chunk-start weights W_B
    to the state gradients (loaded there: registers). Returns (dh1, dh2)."""
    if i_r == 0:
        dh1 += _load_state(dwinB_ptr, bh64 * E * D, D, E, 0, BD, BE)
        dh2 += _load_state(dwoutB_ptr, bh64 * D * E, E, D, 0, BE, BD)
    _store_rows(dq_ptr, g_base * D, t0, end, H * D, 0, D, dq, BT, BD)
    _store_rows(dk_ptr, g_base * D, t0, end, H * D, 0, D, dk, BT, BD)
    _store_rows(dv_ptr, g_base * D, t0, end, H * D, 0, D, dv, BT, BD)
    _store_gate(dlr_ptr, g_base, t0, end, H, dlr, BT)
    return dh1, dh2


@triton.jit
def _chunk_momentum_bwd(sq, sk, su, sh, sz, sdo, sdh, sdz, dh, dz, p, r, w, a, b, c, w_last,
                        r_last, rows, L, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        PREC: tl.constexpr):
    """The chain rule of triton_momentum._momentum_chunk_fwd with all of V in registers,
    given the chunk-end (dh, dz) (registers) and the chunk's Q, K, U, dO, h, z in scratch
    slots (sdh, sdz: slots for dh, dz): returns (dQ, dK, dU, dlog_alpha, dlog_beta,
    chunk-start dh, dz), from triton_momentum's step back
    (_momentum_chunk_bwd) and chain rule (_momentum_grads_tail); operands as in
    `_chunk_delta_bwd`."""
    _spill(sdh, dh, BK, BV)
    _spill(sdz, dz, BK, BV)
    du, dh_prev, dz_prev = _momentum_chunk_bwd(
        _reload(sq, BT, BK), _reload(sk, BT, BK), _reload(sdo, BT, BV), _reload(sdh, BK, BV),
        _reload(sdz, BK, BV), w, a, b, c, w_last, r_last, rows, L, PREC)
    do = _reload(sdo, BT, BV)
    d_wqk = _dot(do, _reload_t(su, BT, BV), PREC)
    do_h = _dot(do, _reload_t(sh, BK, BV), PREC)
    do_z = _dot(do, _reload_t(sz, BK, BV), PREC)
    u = _reload(su, BT, BV)
    u_dh = _dot(u, _reload_t(sdh, BK, BV), PREC)
    u_dz = _dot(u, _reload_t(sdz, BK, BV), PREC)
    h = _reload(sh, BK, BV)
    z = _reload(sz, BK, BV)
    qk = _dot(_reload(sq, BT, BK), _reload_t(sk, BT, BK), PREC)
    dq, dk, d_la, d_lb = _momentum_grads_tail(
        _reload(sq, BT, BK), _reload(sk, BT, BK), qk, p, r, w, a, b, c, w_last, r_last, rows,
        L, d_wqk, do_h, do_z, u_dh, u_dz, tl.sum(tl.sum(h * dh, 1), 0),
        tl.sum(tl.sum(z * dh, 1), 0), tl.sum(tl.sum(z * dz, 1), 0), PREC)
    return dq, dk, du, d_la, d_lb, dh_prev, dz_prev


# ----------------------------------------------------------------------------- kernels

@jit_any_length
def _mlp_mem_fwd_kernel(q_ptr, k_ptr, v_ptr, alpha_ptr, lr_ptr, win_ptr, wout_ptr, y_ptr,
                        h1c_ptr, h2c_ptr, winT_ptr, woutT_ptr, winB_ptr, woutB_ptr, scr_ptr,
                        T, H, D, E, C, NT, EVERY, S, tau, DGD: tl.constexpr, CLIP: tl.constexpr,
                        ACT: tl.constexpr, SELF_TARGET: tl.constexpr, SAVE: tl.constexpr,
                        BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
                        PREC: tl.constexpr):
    """DGD / GD: the chunk loop of one (batch, head), (h1, h2) in registers (module
    docstring 1-4). SAVE keeps every EVERY-th chunk's start (h1, h2) for the backward
    (`_save_pair`); SELF_TARGET writes toward M_B(v) instead of v (`_self_target`). Each
    chunk's start states go to this program's DELTA_FWD_SLOTS scratch slots of S floats, and
    every helper gets them as fresh `_reload`s (module docstring, "Shared memory")."""
    i_unused, bh64, g_base = _program(T, H)
    rows = tl.arange(0, BT)
    slots = scr_ptr + bh64 * (DELTA_FWD_SLOTS * S)
    sh1, sh2 = slots, slots + S
    h1 = _load_state(win_ptr, bh64 * E * D, D, E, 0, BD, BE)                  # W_in^T [D, E]
    h2 = _load_state(wout_ptr, bh64 * D * E, E, D, 0, BE, BD)                 # W_out^T [E, D]
    for i_t in range(NT):
        t0, end, L = _chunk_span(i_t, C, T)
        _save_chunk_start(h1c_ptr, h2c_ptr, winB_ptr, woutB_ptr, h1, h2, bh64, i_t, NT, EVERY, D,
                          E, SAVE, BD, BE)
        _spill(sh1, h1, BD, BE)
        _spill(sh2, h2, BE, BD)
        qc, kc, vc = _load_chunk(q_ptr, k_ptr, v_ptr, g_base, t0, end, H, D, BT, BD)
        if SELF_TARGET:
            vc = _self_target(vc, _reload(sh1, BD, BE), _reload(sh2, BE, BD), ACT, PREC)
        g, gp, lr, alpha = _delta_chunk_gates(alpha_ptr, lr_ptr, g_base, t0, end, H, BT)
        scale, hh, s1, s2, err, m, g1, eta1, eta2, lw1, lw2, u1, u2 = _inner_write(
            kc, vc, lr, _reload(sh1, BD, BE), _reload(sh2, BE, BD), tau, DGD, CLIP, ACT, PREC)
        o1, h1, kk_unused, decay_unused, tm_unused = _chunk_delta_fwd(
            qc, kc, u1, eta1, g, gp, _reload(sh1, BD, BE), rows, L, True, BT, PREC)
        q2, ds_unused, dds_unused = _act(o1, ACT, 1)                                       # W_out reads s(W_in,t q_t)
        o2, h2, kk_unused, decay_unused, tm_unused = _chunk_delta_fwd(
            q2, hh, u2, eta2, g, gp, _reload(sh2, BE, BD), rows, L, True, BT, PREC)
        _store_rows(y_ptr, g_base * D, t0, end, H * D, 0, D, qc + o2, BT, BD)
    _store_state(winT_ptr, bh64 * E * D, D, E, 0, h1, BD, BE)
    _store_state(woutT_ptr, bh64 * D * E, E, D, 0, h2, BE, BD)


@jit_any_length
def _mlp_mem_bwd_kernel(q_ptr, k_ptr, v_ptr, alpha_ptr, lr_ptr, h1c_ptr, h2c_ptr, dy_ptr,
                        dwinT_ptr, dwoutT_ptr, dwinB_ptr, dwoutB_ptr, dq_ptr, dk_ptr, dv_ptr,
                        dalpha_ptr, dlr_ptr, dwin_ptr, dwout_ptr, scr_ptr, T, H, D, E, C, NT, S,
                        tau, DGD: tl.constexpr, CLIP: tl.constexpr, ACT: tl.constexpr,
                        SELF_TARGET: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                        BE: tl.constexpr, PREC: tl.constexpr):
    """DGD / GD, chunks in reverse carrying (dh1, dh2) = dL/d(next chunk-start states): per
    chunk `_dgd_chunk_bwd` from the chunk's saved start states, with this program's
    DELTA_SLOTS scratch slots of S floats."""
    i_unused, bh64, g_base = _program(T, H)
    rows = tl.arange(0, BT)
    slots = scr_ptr + bh64 * (DELTA_SLOTS * S)
    dh1 = _load_state(dwinT_ptr, bh64 * E * D, D, E, 0, BD, BE)
    dh2 = _load_state(dwoutT_ptr, bh64 * D * E, E, D, 0, BE, BD)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        t0, end, L = _chunk_span(i_t, C, T)
        g, gp, lr, alpha = _delta_chunk_gates(alpha_ptr, lr_ptr, g_base, t0, end, H, BT)
        h1 = _load_kv(h1c_ptr, (bh64 * NT + i_t) * D * E, D, E, 0, BD, BE)
        h2 = _load_kv(h2c_ptr, (bh64 * NT + i_t) * E * D, E, D, 0, BE, BD)
        qc, kc, vc = _load_chunk(q_ptr, k_ptr, v_ptr, g_base, t0, end, H, D, BT, BD)
        dy = _load_rows(dy_ptr, g_base * D, t0, end, H * D, 0, D, BT, BD)
        dq, dk, dv, dlr, dla, dh1, dh2 = _dgd_chunk_bwd(
            qc, kc, vc, dy, g, gp, lr, h1, h2, dh1, dh2, slots, S, rows, L, tau, DGD, CLIP, ACT,
            SELF_TARGET, True, BT, BD, BE, PREC)
        dh1, dh2 = _chunk_grads_out(dq_ptr, dk_ptr, dv_ptr, dlr_ptr, dwinB_ptr, dwoutB_ptr,
                                    dq, dk, dv, dlr, dh1, dh2, i_r, bh64, g_base, t0, end,
                                    H, D, E, BT, BD, BE)
        _store_gate(dalpha_ptr, g_base, t0, end, H, _gate_grad(dla, alpha), BT)
    _store_state(dwin_ptr, bh64 * E * D, D, E, 0, dh1, BD, BE)
    _store_state(dwout_ptr, bh64 * D * E, E, D, 0, dh2, BE, BD)


@jit_any_length
def _mlp_mem_momentum_fwd_kernel(q_ptr, k_ptr, v_ptr, alpha_ptr, beta_ptr, lr_ptr, win_ptr,
                                 wout_ptr, zin_ptr, zout_ptr, y_ptr, h1c_ptr, h2c_ptr, z1c_ptr,
                                 z2c_ptr, winT_ptr, woutT_ptr, zinT_ptr, zoutT_ptr, winB_ptr,
                                 woutB_ptr, scr_ptr, T, H, D, E, C, NT, EVERY, S, tau,
                                 CLIP: tl.constexpr, ACT: tl.constexpr, SAVE: tl.constexpr,
                                 BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
                                 PREC: tl.constexpr):
    """Titans' momentum (Eq. 13-14): the chunk loop with (h, z) of both layers in registers;
    writes U = -lr G (`_inner_write` with GD rates), then the momentum closed form. Each
    chunk's start states and layer 2's writes go to this program's MOMENTUM_FWD_SLOTS scratch
    slots of S floats, and every helper gets them as fresh `_reload`s (module docstring,
    "Shared memory")."""
    i_unused, bh64, g_base = _program(T, H)
    rows = tl.arange(0, BT)
    slots = scr_ptr + bh64 * (MOMENTUM_FWD_SLOTS * S)
    sh1, sh2, sz1, sz2, su2 = slots, slots + S, slots + 2 * S, slots + 3 * S, slots + 4 * S
    h1 = _load_state(win_ptr, bh64 * E * D, D, E, 0, BD, BE)
    h2 = _load_state(wout_ptr, bh64 * D * E, E, D, 0, BE, BD)
    z1 = _load_state(zin_ptr, bh64 * E * D, D, E, 0, BD, BE)
    z2 = _load_state(zout_ptr, bh64 * D * E, E, D, 0, BE, BD)
    for i_t in range(NT):
        t0, end, L = _chunk_span(i_t, C, T)
        _save_chunk_start(h1c_ptr, h2c_ptr, winB_ptr, woutB_ptr, h1, h2, bh64, i_t, NT, EVERY, D,
                          E, SAVE, BD, BE)
        if SAVE:
            _save_pair(z1c_ptr, z2c_ptr, z1, z2, bh64, i_t, NT, EVERY, D, E, BD, BE)
        _spill(sh1, h1, BD, BE)
        _spill(sh2, h2, BE, BD)
        _spill(sz1, z1, BD, BE)
        _spill(sz2, z2, BE, BD)
        qc, kc, vc = _load_chunk(q_ptr, k_ptr, v_ptr, g_base, t0, end, H, D, BT, BD)
        lr = _load_gate(lr_ptr, g_base, t0, end, H, 0.0, BT)
        alpha, beta, L, p, r, w, a, b, c, w_last, r_last = _momentum_chunk_gates(
            alpha_ptr, beta_ptr, g_base, t0, end, H, BT, PREC)
        scale, hh, s1, s2, err, m, g1, eta1, eta2, lw1, lw2, u1, u2 = _inner_write(
            kc, vc, lr, _reload(sh1, BD, BE), _reload(sh2, BE, BD), tau, False, CLIP, ACT, PREC)
        _spill(su2, u2, BT, BD)
        o1, h1, z1 = _momentum_chunk_fwd(qc, kc, u1, _reload(sh1, BD, BE), _reload(sz1, BD, BE),
                                         w, a, b, c, w_last, r_last, rows, L, PREC)
        q2, ds_unused, dds_unused = _act(o1, ACT, 1)
        o2, h2, z2 = _momentum_chunk_fwd(q2, hh, _reload(su2, BT, BD), _reload(sh2, BE, BD),
                                         _reload(sz2, BE, BD), w, a, b, c, w_last, r_last, rows,
                                         L, PREC)
        _store_rows(y_ptr, g_base * D, t0, end, H * D, 0, D, qc + o2, BT, BD)
    _store_state(winT_ptr, bh64 * E * D, D, E, 0, h1, BD, BE)
    _store_state(woutT_ptr, bh64 * D * E, E, D, 0, h2, BE, BD)
    _store_state(zinT_ptr, bh64 * E * D, D, E, 0, z1, BD, BE)
    _store_state(zoutT_ptr, bh64 * D * E, E, D, 0, z2, BE, BD)


@jit_any_length
def _mlp_mem_momentum_bwd_kernel(q_ptr, k_ptr, v_ptr, alpha_ptr, beta_ptr, lr_ptr, h1c_ptr,
                                 h2c_ptr, z1c_ptr, z2c_ptr, dy_ptr, dwinT_ptr, dwoutT_ptr,
                                 dzinT_ptr, dzoutT_ptr, dwinB_ptr, dwoutB_ptr, dq_ptr, dk_ptr,
                                 dv_ptr, dalpha_ptr, dbeta_ptr, dlr_ptr, dwin_ptr, dwout_ptr,
                                 dzin_ptr, dzout_ptr, scr_ptr, T, H, D, E, C, NT, S, tau,
                                 CLIP: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr,
                                 BD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr):
    """Momentum, chunks in reverse carrying (dh, dz) of both layers: as _mlp_mem_bwd_kernel
    with the momentum chunk's chain rule (MOMENTUM_SLOTS scratch slots of S floats)."""
    i_unused, bh64, g_base = _program(T, H)
    rows = tl.arange(0, BT)
    slots = scr_ptr + bh64 * (MOMENTUM_SLOTS * S)
    sq1, sk1, su1, sh1, sz1 = slots, slots + S, slots + 2 * S, slots + 3 * S, slots + 4 * S
    sq2, sk2, su2, sh2, sz2 = (slots + 5 * S, slots + 6 * S, slots + 7 * S, slots + 8 * S,
                               slots + 9 * S)
    serr, sdo, sdh, sdz = slots + 10 * S, slots + 11 * S, slots + 12 * S, slots + 13 * S
    dh1 = _load_state(dwinT_ptr, bh64 * E * D, D, E, 0, BD, BE)
    dh2 = _load_state(dwoutT_ptr, bh64 * D * E, E, D, 0, BE, BD)
    dz1 = _load_state(dzinT_ptr, bh64 * E * D, D, E, 0, BD, BE)
    dz2 = _load_state(dzoutT_ptr, bh64 * D * E, E, D, 0, BE, BD)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        t0, end, L = _chunk_span(i_t, C, T)
        lr = _load_gate(lr_ptr, g_base, t0, end, H, 0.0, BT)
        alpha, beta, L, p, r, w, a, b, c, w_last, r_last = _momentum_chunk_gates(
            alpha_ptr, beta_ptr, g_base, t0, end, H, BT, PREC)
        # 1. the chunk's forward from its saved start, its tiles left in scratch
        h1 = _load_kv(h1c_ptr, (bh64 * NT + i_t) * D * E, D, E, 0, BD, BE)
        h2 = _load_kv(h2c_ptr, (bh64 * NT + i_t) * E * D, E, D, 0, BE, BD)
        z1 = _load_kv(z1c_ptr, (bh64 * NT + i_t) * D * E, D, E, 0, BD, BE)
        qc, kc, vc = _load_chunk(q_ptr, k_ptr, v_ptr, g_base, t0, end, H, D, BT, BD)
        dy = _load_rows(dy_ptr, g_base * D, t0, end, H * D, 0, D, BT, BD)
        scale, hh, s1, s2, err, m, g1, eta1, eta2, lw1, lw2, u1, u2 = _inner_write(
            kc, vc, lr, h1, h2, tau, False, CLIP, ACT, PREC)
        o1, h1_unused, z1_unused = _momentum_chunk_fwd(qc, kc, u1, h1, z1, w, a, b, c, w_last,
                                                       r_last, rows, L, PREC)
        q2, ds_o1, dds_unused = _act(o1, ACT, 1)
        _spill(sq1, qc, BT, BD)
        _spill_scan(sk1, su1, sh1, kc, u1, h1, BT, BD, BE)
        _spill(sz1, z1, BD, BE)
        _spill(sq2, q2, BT, BE)
        _spill_scan(sk2, su2, sh2, hh, u2, h2, BT, BE, BD)
        _spill(sz2, _load_kv(z2c_ptr, (bh64 * NT + i_t) * E * D, E, D, 0, BE, BD), BE, BD)
        _spill(serr, err, BT, BD)
        _spill(sdo, dy, BT, BD)
        # 2. layer 2, 3. s(O1) and layer 1, 4. the inner gradient (GD rates: deta = 0)
        dq2, dhh, du2, dla, dlb, dh2, dz2 = _chunk_momentum_bwd(
            sq2, sk2, su2, sh2, sz2, sdo, sdh, sdz, dh2, dz2, p, r, w, a, b, c, w_last, r_last,
            rows, L, BT, BE, BD, PREC)
        _spill(sdo, dq2 * ds_o1, BT, BE)
        dq1, dk, du1, dla1, dlb1, dh1, dz1 = _chunk_momentum_bwd(
            sq1, sk1, su1, sh1, sz1, sdo, sdh, sdz, dh1, dz1, p, r, w, a, b, c, w_last, r_last,
            rows, L, BT, BD, BE, PREC)
        dk, dv, dlr, dh1, dh2 = _inner_write_bwd(sk1, sk2, serr, sh1, sh2, s1, s2, m, g1, lr,
                                                 eta1, eta2, lw1, lw2, scale, tau, du1, du2,
                                                 eta1, eta2, dk, dhh, dh1, dh2, False, CLIP, BT,
                                                 BD, BE, PREC)
        dh1, dh2 = _chunk_grads_out(dq_ptr, dk_ptr, dv_ptr, dlr_ptr, dwinB_ptr, dwoutB_ptr,
                                    dy + dq1, dk, dv, dlr, dh1, dh2, i_r, bh64, g_base, t0, end,
                                    H, D, E, BT, BD, BE)
        _store_gate(dalpha_ptr, g_base, t0, end, H, _gate_grad(dla + dla1, alpha), BT)
        _store_gate(dbeta_ptr, g_base, t0, end, H, _gate_grad(dlb + dlb1, beta), BT)
    _store_state(dwin_ptr, bh64 * E * D, D, E, 0, dh1, BD, BE)
    _store_state(dwout_ptr, bh64 * D * E, E, D, 0, dh2, BE, BD)
    _store_state(dzin_ptr, bh64 * E * D, D, E, 0, dz1, BD, BE)
    _store_state(dzout_ptr, bh64 * D * E, E, D, 0, dz2, BE, BD)


# ----------------------------------------------------------------------------- host side

def max_mlp_chunk(head_dim, update_rule):
    """The largest chunk C the fused kernels take: 64 at d <= 64; at 64 < d <= 128 (the tiles
    are [128, 128]) 32 for DGD / GD and 16 for momentum, whose backward also re-reads the
    momenta's tiles. These are the largest powers of two whose kernels fit an H100's shared
    memory in every product precision (fusable_mlp lists the bytes)."""
    if head_dim <= 64:
        return MAX_MLP_CHUNK
    return MAX_MLP_CHUNK // (4 if update_rule == "momentum" else 2)


def fusable_mlp(head_dim, expansion, chunk_size, update_rule):
    """Whether the fused kernels cover a 2-layer MLP memory with these settings: d <= 128,
    E <= 128 (so E = d at d > 64: HOPE's memories with memory_expansion 1),
    C <= max_mlp_chunk(d, rule), a fused rule. Every such shape fits an H100's shared memory
    (232,448 B). Bytes of the compiled sm_90 kernels, all flags on, at the largest shapes
    (tests/test_triton_compile.py; products / inputs: exact fp32 / fp32 (fp32 training, the
    tests), tf32 / bf16 (16-bit callers), tf32 / fp32 (bf16 training: memory.py casts up)):

        d, E, C:      64, 128, 64 (Titans)     64, 64, 64 (HOPE)   128, 128, 32 (momentum: C 16)
        DGD fwd     114,688 131,072 147,456   81,920  81,920  98,304  180,224 196,608 229,376
        DGD bwd     131,072 147,456 163,840   98,304  98,304 114,688  196,608 180,224 204,800
        mom. fwd    164,096 147,456 163,840   98,304  81,920  98,304  163,840 196,608 212,992
        mom. bwd    196,608 172,032 196,608  131,072 106,496 131,072  223,232 204,800 221,184

    (DGD with self_target; at the d = 64 shapes every flag combination was measured, and
    none takes more than the all-on one.) Over the
    limit: the momentum backward at d = 128 with C = 32 (253,952 B exact), any kernel with
    E = 256 (over 300,000)."""
    return (head_dim <= MAX_MLP_HEAD_DIM and expansion * head_dim <= MAX_MLP_HIDDEN
            and update_rule in FUSED_RULES
            and 1 <= chunk_size <= max_mlp_chunk(head_dim, update_rule))


def _tiles(d, E, chunk_size):
    """(BT, BD, BE): one chunk per BT rows; tl.dot needs every tile side >= 16. The launches
    use num_stages=1: software pipelining would prefetch the saved [d, E] fp32 chunk states
    into shared memory several chunks ahead (32 KiB each at d = 64, E = 128)."""
    p2 = lambda n: max(16, triton.next_power_of_2(n))        # noqa: E731
    return p2(chunk_size), p2(d), p2(E)


def _check_inputs(tensors, states, chunk_size, activation, max_grad_norm, caller):
    """One-line ValueErrors naming what is wrong. tensors: q, k, v, then the [B,T,H] gates
    (kernels/checks.py's shared check of the scan inputs); states: w_in [B,H,E,d], w_out
    [B,H,d,E] and (momentum) z_in, z_out of the same shapes."""
    q, k, v, *_ = tensors.values()
    gates = {n: t for n, t in tensors.items() if n not in ("q", "k", "v")}
    rule, rules = ("momentum", "momentum") if "z_in" in states else ("dgd", "DGD / GD")
    check_scan_inputs(q, k, v, gates, {}, chunk_size, u_name="v", dims=("d", "d"),
                      kernels=f"the fused MLP memory kernels ({rules})",
                      max_chunk=lambda d: max_mlp_chunk(d, rule))
    B, T, H, d = q.shape
    check_tensors({"q": q, **states}, "q", SUPPORTED_DTYPES, "the fused MLP memory kernels")
    w_in = states["w_in"]
    if w_in.dim() != 4 or w_in.shape[:2] != (B, H) or w_in.shape[3] != d:
        raise ValueError(f"w_in must be [B,H,E,d] with B,H,d = {[B, H, d]}; got {list(w_in.shape)}")
    E = w_in.shape[2]
    for name, t in states.items():
        want = [B, H, E, d] if name.endswith("_in") else [B, H, d, E]
        if list(t.shape) != want:
            raise ValueError(f"{name} must be [B,H,{'E,d' if name.endswith('_in') else 'd,E'}] = "
                             f"{want}; got {list(t.shape)}")
    if d > MAX_MLP_HEAD_DIM or E > MAX_MLP_HIDDEN:
        raise ValueError(f"head dim {d} / hidden {E} exceed {MAX_MLP_HEAD_DIM} / {MAX_MLP_HIDDEN}, "
                         f"the most the fused MLP memory kernels hold in registers")
    check_options(activation, max_grad_norm)
    if T == 0:
        raise ValueError(f"{caller} needs T >= 1 tokens")


def check_options(activation, max_grad_norm):
    """One-line ValueErrors for the inner loop's options (shared with triton_hope.py)."""
    if activation not in ACT_IDS:
        raise ValueError(f"activation must be one of {', '.join(ACT_IDS)}; got {activation!r}")
    check_constant("max_grad_norm", max_grad_norm, positive=True, optional=True)


def _launch_args(q, E, chunk_size, activation, max_grad_norm):
    """(B, T, H, d, NT, the kernels' keyword arguments: clip tau and the constexprs)."""
    B, T, H, d = q.shape
    BT, BD, BE = _tiles(d, E, chunk_size)
    clip = max_grad_norm is not None
    return B, T, H, d, triton.cdiv(T, chunk_size), dict(
        tau=float(max_grad_norm) if clip else 1.0, CLIP=clip, ACT=ACT_IDS[activation], BT=BT,
        BD=BD, BE=BE, PREC=dot_precision(q.dtype))


def _scratch(q, E, chunk_size, n_slots):
    """A kernel's scratch (module docstring, "Shared memory"): n_slots slots per
    (batch, head) program of S fp32 each, S = max(BT, BD) * max(BT, BD, BE) (room for the
    largest padded tile: [BT, BT|BD|BE], [BD, BE] or [BE, BD]). Returns (buffer, S)."""
    B, _, H, d = q.shape
    BT, BD, BE = _tiles(d, E, chunk_size)
    S = max(BT, BD) * max(BT, BD, BE)
    return torch.empty(B * H, int(n_slots), S, device=q.device, dtype=torch.float32), S


def save_interval(n_chunks):
    """R: the fused forwards keep every R-th chunk-start state for the backward, which re-runs
    the forward over each block of R chunks from the block's saved start (one extra forward)
    to get the block's chunk starts, then walks the block in reverse (`reverse_blocks`): the
    states kept between forward and backward are cdiv(NT, R) instead of NT, and R more live
    while one block's backward runs. R = 1 (every chunk, no recompute) up to
    MAX_SAVED_CHUNKS chunks, else ceil(sqrt(NT)), which minimises NT/R + R: at hope_760m
    (T = 4096) stage 1's C_other = 16 keeps 16 of 256 and M_mem's C = 64 keeps 8 of 64."""
    return 1 if n_chunks <= MAX_SAVED_CHUNKS else math.isqrt(n_chunks - 1) + 1


def resolve_state_every(T, chunk_size, state_every):
    """The fused functions' state_every argument: None = save_interval's choice; else the
    positive int R (1 = save every chunk start, no recompute). One-line ValueError otherwise."""
    if state_every is None:
        return save_interval(triton.cdiv(T, chunk_size))
    if isinstance(state_every, bool) or not isinstance(state_every, int) or state_every < 1:
        raise ValueError(f"state_every must be None or a positive int; got {state_every!r}")
    return state_every


def reverse_blocks(T, chunk_size, every):
    """(saved index, first token, end token) of each block of `every` chunks, last block
    first: the backward's recompute order (`save_interval`)."""
    span = every * chunk_size
    return [(i, i * span, min(T, (i + 1) * span)) for i in reversed(range(triton.cdiv(T, span)))]


def saved_weights(chunk_states, i_s, B):
    """Saved chunk start i_s of [B*H, NS, K, V] states (h = W^T: h1 [d, E], h2 [E, d]) as
    weights [B, H, V, K], the layout the forward ops take."""
    return chunk_states[:, i_s].unflatten(0, (B, -1)).transpose(-1, -2)


def backward_in_blocks(T, chunk_size, every, seq_grads, carried, start_grads, block_step):
    """The backward of a forward that saved every `every`-th chunk start (`save_interval`).
    For each block of chunks, last first, block_step(i_s, t0, t1, carried, start_grads)
    re-runs the forward over tokens [t0, t1) from saved start i_s, then the backward over the
    block, given the state gradients at the block's end (carried: the final states' at first)
    and the gradient of the returned last-chunk start W_B (start_grads for the last block,
    zeros for the others). It returns (the block's per-token gradients, which land in
    seq_grads[j][:, t0:t1], the state gradients at the block's start). Returns those at
    t = 0."""
    no_start = [torch.zeros_like(g) for g in start_grads]
    for i_s, t0, t1 in reverse_blocks(T, chunk_size, every):
        grads, carried = block_step(i_s, t0, t1, carried, start_grads if t1 == T else no_start)
        for out, grad in zip(seq_grads, grads):
            out[:, t0:t1] = grad
    return carried


def _state_buffers(B, H, d, E, NT, n_states, save, device):
    """Final/start state outputs (alternating [B,H,E,d] W_in-like and [B,H,d,E] W_out-like)
    and the per-chunk saved starts ([B*H, NT, d, E] and [B*H, NT, E, d] alternating)."""
    f32 = dict(device=device, dtype=torch.float32)
    outs = [torch.empty((B, H, E, d) if i % 2 == 0 else (B, H, d, E), **f32)
            for i in range(n_states)]
    chunks = [torch.empty(((B * H, NT, d, E) if i % 2 == 0 else (B * H, NT, E, d)) if save else (0,),
                          **f32) for i in range(n_states)]
    return outs, chunks


# DGD / GD -------------------------------------------------------------------------------

@torch.library.custom_op("nested_learning::memory_mlp_delta_fwd", mutates_args=())
@on_input_device
def _memory_mlp_fwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, lr: Tensor, w_in: Tensor,
                    w_out: Tensor, chunk_size: int, dgd: bool, activation: str,
                    max_grad_norm: Optional[float], self_target: bool, save_every: int
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v, alpha, lr, w_in, w_out = _contiguous(q, k, v, alpha, lr, w_in, w_out)
    E = w_in.shape[2]
    B, T, H, d, NT, consts = _launch_args(q, E, chunk_size, activation, max_grad_norm)
    y = torch.empty(B, T, H, d, device=q.device, dtype=q.dtype)
    (win_T, wout_T, win_B, wout_B), _ = _state_buffers(B, H, d, E, NT, 4, False, q.device)
    every = max(save_every, 1)
    _, (h1c, h2c) = _state_buffers(B, H, d, E, triton.cdiv(NT, every), 2, save_every > 0, q.device)
    scratch, S = _scratch(q, E, chunk_size, DELTA_FWD_SLOTS.value)
    _mlp_mem_fwd_kernel[(1, B * H)](q, k, v, alpha, lr, w_in, w_out, y, h1c, h2c, win_T, wout_T,
                                  win_B, wout_B, scratch, T, H, d, E, chunk_size, NT, every, S,
                                  DGD=dgd, SAVE=save_every > 0, SELF_TARGET=self_target,
                                  **consts, num_warps=CHUNK_WARPS, num_stages=1)
    return y, win_T, wout_T, win_B, wout_B, h1c, h2c


def _fake_forward(q, w_in, chunk_size, n_states, n_chunk_states, save_every):
    """The forward ops' outputs for torch.compile's fake tensors: y, then n_states final /
    chunk-start states and n_chunk_states saved chunk-start states (every save_every-th;
    empty for 0), fp32."""
    B, T, H, d = q.shape
    E, NT = w_in.shape[2], triton.cdiv(T, chunk_size)
    outs, _ = _state_buffers(B, H, d, E, NT, n_states, False, "meta")
    _, chunks = _state_buffers(B, H, d, E, triton.cdiv(NT, max(save_every, 1)), n_chunk_states,
                               save_every > 0, "meta")
    return (q.new_empty(B, T, H, d), *(q.new_empty(t.shape, dtype=torch.float32) for t in outs + chunks))


@_memory_mlp_fwd.register_fake
def _(q, k, v, alpha, lr, w_in, w_out, chunk_size, dgd, activation, max_grad_norm, self_target,
      save_every):
    return _fake_forward(q, w_in, chunk_size, 4, 2, save_every)


@torch.library.custom_op("nested_learning::memory_mlp_delta_bwd", mutates_args=())
@on_input_device
def _memory_mlp_bwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, lr: Tensor, h1c: Tensor,
                    h2c: Tensor, grad_y: Tensor, grad_win: Tensor, grad_wout: Tensor,
                    grad_win_start: Tensor, grad_wout_start: Tensor, chunk_size: int, dgd: bool,
                    activation: str, max_grad_norm: Optional[float], self_target: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v, alpha, lr, grad_y, grad_win, grad_wout, grad_win_start, grad_wout_start = _contiguous(
        q, k, v, alpha, lr, grad_y, grad_win, grad_wout, grad_win_start, grad_wout_start)
    E = h1c.shape[-1]
    B, T, H, d, NT, consts = _launch_args(q, E, chunk_size, activation, max_grad_norm)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dalpha, dlr = torch.empty_like(alpha), torch.empty_like(lr)
    (dwin, dwout), _ = _state_buffers(B, H, d, E, NT, 2, False, q.device)
    scratch, S = _scratch(q, E, chunk_size, DELTA_SLOTS.value)
    _mlp_mem_bwd_kernel[(1, B * H)](q, k, v, alpha, lr, h1c, h2c, grad_y, grad_win, grad_wout,
                                  grad_win_start, grad_wout_start, dq, dk, dv, dalpha, dlr,
                                  dwin, dwout, scratch, T, H, d, E, chunk_size, NT, S, DGD=dgd,
                                  SELF_TARGET=self_target,
                                  **consts, num_warps=CHUNK_WARPS, num_stages=1)
    return dq, dk, dv, dalpha, dlr, dwin, dwout


@_memory_mlp_bwd.register_fake
def _(q, k, v, alpha, lr, h1c, h2c, grad_y, grad_win, grad_wout, grad_win_start,
      grad_wout_start, chunk_size, dgd, activation, max_grad_norm, self_target):
    # the op makes its inputs contiguous first: new row-major buffers, not empty_like (which
    # keeps a permuted input's strides)
    return (*(t.new_empty(t.shape) for t in (q, k, v, alpha, lr)),
            *(g.new_empty(g.shape, dtype=torch.float32) for g in (grad_win, grad_wout)))


def _memory_mlp_setup_context(ctx, inputs, output):
    (q, k, v, alpha, lr, w_in, w_out, chunk_size, dgd, activation, max_grad_norm, self_target,
     save_every) = inputs
    ctx.save_for_backward(q, k, v, alpha, lr, output[5], output[6])
    ctx.args = (chunk_size, dgd, activation, max_grad_norm, self_target)
    ctx.save_every = save_every
    ctx.state_dtypes = (w_in.dtype, w_out.dtype)
    ctx.mark_non_differentiable(output[5], output[6])


def _state_grads(grads, q, E):
    """Zeros for the unused state outputs' gradients (alternating W_in-like / W_out-like)."""
    B, _, H, d = q.shape
    return [_grad_or_zeros(g, (B, H, E, d) if i % 2 == 0 else (B, H, d, E), q)
            for i, g in enumerate(grads)]


def _memory_mlp_backward(ctx, grad_y, grad_win, grad_wout, grad_win_start, grad_wout_start,
                         _grad_h1c, _grad_h2c):
    q, k, v, alpha, lr, h1c, h2c = ctx.saved_tensors
    check_saved_chunks(h1c, "fused_mlp_memory_delta")
    grad_y = _grad_or_zeros(grad_y, q.shape, q, q.dtype)
    states = _state_grads((grad_win, grad_wout, grad_win_start, grad_wout_start), q, h1c.shape[-1])
    seq = (q, k, v, alpha, lr)
    if ctx.save_every == 1:
        *seq_grads, dwin, dwout = torch.ops.nested_learning.memory_mlp_delta_bwd(
            *seq, h1c, h2c, grad_y, *states, *ctx.args)
    else:      # blocks of save_every chunks, last first, each re-run forward from its saved start
        seq_grads = [torch.empty_like(t) for t in seq]

        def block_step(i_s, t0, t1, carried, start_grads):
            block = [t[:, t0:t1] for t in seq]
            *_, h1_b, h2_b = torch.ops.nested_learning.memory_mlp_delta_fwd(
                *block, saved_weights(h1c, i_s, q.shape[0]), saved_weights(h2c, i_s, q.shape[0]),
                *ctx.args, 1)
            *grads, dwin, dwout = torch.ops.nested_learning.memory_mlp_delta_bwd(
                *block, h1_b, h2_b, grad_y[:, t0:t1], *carried, *start_grads, *ctx.args)
            return grads, (dwin, dwout)

        dwin, dwout = backward_in_blocks(q.shape[1], ctx.args[0], ctx.save_every, seq_grads,
                                         states[:2], states[2:], block_step)
    return (*seq_grads, dwin.to(ctx.state_dtypes[0]), dwout.to(ctx.state_dtypes[1]),
            None, None, None, None, None, None)


_memory_mlp_fwd.register_autograd(_memory_mlp_backward, setup_context=_memory_mlp_setup_context)


def fused_mlp_memory_delta(q, k, v, alpha, lr, w_in, w_out, chunk_size, dgd=True,
                           activation="silu", max_grad_norm=None, self_target=False,
                           state_every=None):
    """A residual MLP memory layer M(x) = x + W_out s(W_in x) with the DGD (dgd=True, NL Eq.
    57/88) or GD transition per layer, fused (module docstring). Chunks start at t = 0, every
    chunk_size tokens; lr is the raw inner learning rate (DGD's eta' is formed per layer
    inside; max_grad_norm: memory.py's per-token inner-gradient clip, None = off).
    self_target: HOPE's self-generated target (NL Eq. 87, memory.py's scan): token t learns
    ||M(k_t) - M_B(v_t)||^2, v read at its chunk's start weights, gradients flowing through the
    read to v and the weights. state_every: the forward keeps every R-th chunk start for the
    backward, which re-runs the forward per block of R chunks (`save_interval`; None = its
    choice). Returns (y [B,T,H,d] in q's dtype, (W_in, W_out) after the last token, (W_in,
    W_out) at the start of the last chunk), fp32, laid out like memory.py's weights."""
    _check_inputs({"q": q, "k": k, "v": v, "alpha": alpha, "lr": lr},
                  {"w_in": w_in, "w_out": w_out}, chunk_size, activation, max_grad_norm,
                  "fused_mlp_memory_delta")
    if not isinstance(self_target, bool):
        raise ValueError(f"self_target must be a bool; got {self_target!r}")
    every = resolve_state_every(q.shape[1], chunk_size, state_every)
    save_every = every if _needs_grad(q, k, v, alpha, lr, w_in, w_out) else 0
    y, win_T, wout_T, win_B, wout_B, _, _ = torch.ops.nested_learning.memory_mlp_delta_fwd(
        q, k, v, alpha, lr, w_in, w_out, chunk_size, bool(dgd), activation,
        None if max_grad_norm is None else float(max_grad_norm), self_target, save_every)
    return y, (win_T, wout_T), (win_B, wout_B)


# momentum -------------------------------------------------------------------------------

@torch.library.custom_op("nested_learning::memory_mlp_momentum_fwd", mutates_args=())
@on_input_device
def _memory_mlp_momentum_fwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                             lr: Tensor, w_in: Tensor, w_out: Tensor, z_in: Tensor, z_out: Tensor,
                             chunk_size: int, activation: str, max_grad_norm: Optional[float],
                             save_every: int
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                        Tensor, Tensor, Tensor, Tensor]:
    q, k, v, alpha, beta, lr, w_in, w_out, z_in, z_out = _contiguous(
        q, k, v, alpha, beta, lr, w_in, w_out, z_in, z_out)
    E = w_in.shape[2]
    B, T, H, d, NT, consts = _launch_args(q, E, chunk_size, activation, max_grad_norm)
    y = torch.empty(B, T, H, d, device=q.device, dtype=q.dtype)
    outs, _ = _state_buffers(B, H, d, E, NT, 6, False, q.device)
    every = max(save_every, 1)
    _, chunks = _state_buffers(B, H, d, E, triton.cdiv(NT, every), 4, save_every > 0, q.device)
    win_T, wout_T, zin_T, zout_T, win_B, wout_B = outs
    h1c, h2c, z1c, z2c = chunks
    scratch, S = _scratch(q, E, chunk_size, MOMENTUM_FWD_SLOTS.value)
    _mlp_mem_momentum_fwd_kernel[(1, B * H)](
        q, k, v, alpha, beta, lr, w_in, w_out, z_in, z_out, y, h1c, h2c, z1c, z2c, win_T,
        wout_T, zin_T, zout_T, win_B, wout_B, scratch, T, H, d, E, chunk_size, NT, every, S,
        SAVE=save_every > 0, **consts, num_warps=CHUNK_WARPS, num_stages=1)
    return (y, *outs, *chunks)


@_memory_mlp_momentum_fwd.register_fake
def _(q, k, v, alpha, beta, lr, w_in, w_out, z_in, z_out, chunk_size, activation,
      max_grad_norm, save_every):
    return _fake_forward(q, w_in, chunk_size, 6, 4, save_every)


@torch.library.custom_op("nested_learning::memory_mlp_momentum_bwd", mutates_args=())
@on_input_device
def _memory_mlp_momentum_bwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                             lr: Tensor, h1c: Tensor, h2c: Tensor, z1c: Tensor, z2c: Tensor,
                             grad_y: Tensor, grad_win: Tensor, grad_wout: Tensor,
                             grad_zin: Tensor, grad_zout: Tensor, grad_win_start: Tensor,
                             grad_wout_start: Tensor, chunk_size: int, activation: str,
                             max_grad_norm: Optional[float]
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                        Tensor, Tensor, Tensor]:
    (q, k, v, alpha, beta, lr, grad_y, grad_win, grad_wout, grad_zin, grad_zout, grad_win_start,
     grad_wout_start) = _contiguous(q, k, v, alpha, beta, lr, grad_y, grad_win, grad_wout,
                                    grad_zin, grad_zout, grad_win_start, grad_wout_start)
    E = h1c.shape[-1]
    B, T, H, d, NT, consts = _launch_args(q, E, chunk_size, activation, max_grad_norm)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dalpha, dbeta, dlr = torch.empty_like(alpha), torch.empty_like(beta), torch.empty_like(lr)
    (dwin, dwout, dzin, dzout), _ = _state_buffers(B, H, d, E, NT, 4, False, q.device)
    scratch, S = _scratch(q, E, chunk_size, MOMENTUM_SLOTS.value)
    _mlp_mem_momentum_bwd_kernel[(1, B * H)](
        q, k, v, alpha, beta, lr, h1c, h2c, z1c, z2c, grad_y, grad_win, grad_wout, grad_zin,
        grad_zout, grad_win_start, grad_wout_start, dq, dk, dv, dalpha, dbeta, dlr, dwin, dwout,
        dzin, dzout, scratch, T, H, d, E, chunk_size, NT, S, **consts, num_warps=CHUNK_WARPS,
        num_stages=1)
    return dq, dk, dv, dalpha, dbeta, dlr, dwin, dwout, dzin, dzout


@_memory_mlp_momentum_bwd.register_fake
def _(q, k, v, alpha, beta, lr, h1c, h2c, z1c, z2c, grad_y, grad_win, grad_wout, grad_zin,
      grad_zout, grad_win_start, grad_wout_start, chunk_size, activation, max_grad_norm):
    # row-major like the op's (contiguous-input) outputs, whatever the inputs' strides
    return (*(t.new_empty(t.shape) for t in (q, k, v, alpha, beta, lr)),
            *(g.new_empty(g.shape, dtype=torch.float32)
              for g in (grad_win, grad_wout, grad_zin, grad_zout)))


def _memory_mlp_momentum_setup_context(ctx, inputs, output):
    (q, k, v, alpha, beta, lr, w_in, w_out, z_in, z_out, chunk_size, activation, max_grad_norm,
     save_every) = inputs
    ctx.save_for_backward(q, k, v, alpha, beta, lr, *output[7:])
    ctx.args = (chunk_size, activation, max_grad_norm)
    ctx.save_every = save_every
    ctx.state_dtypes = (w_in.dtype, w_out.dtype, z_in.dtype, z_out.dtype)
    ctx.mark_non_differentiable(*output[7:])


def _memory_mlp_momentum_backward(ctx, grad_y, grad_win, grad_wout, grad_zin, grad_zout,
                                  grad_win_start, grad_wout_start, *_grad_chunks):
    q, k, v, alpha, beta, lr, h1c, h2c, z1c, z2c = ctx.saved_tensors
    check_saved_chunks(h1c, "fused_mlp_memory_momentum")
    grad_y = _grad_or_zeros(grad_y, q.shape, q, q.dtype)
    states = _state_grads((grad_win, grad_wout, grad_zin, grad_zout, grad_win_start,
                           grad_wout_start), q, h1c.shape[-1])
    seq = (q, k, v, alpha, beta, lr)
    if ctx.save_every == 1:
        grads = torch.ops.nested_learning.memory_mlp_momentum_bwd(
            *seq, h1c, h2c, z1c, z2c, grad_y, *states, *ctx.args)
        seq_grads, carried = grads[:6], grads[6:]
    else:      # blocks of save_every chunks, last first, each re-run forward from its saved start
        seq_grads = [torch.empty_like(t) for t in seq]

        def block_step(i_s, t0, t1, carried, start_grads):
            block = [t[:, t0:t1] for t in seq]
            starts = [saved_weights(c, i_s, q.shape[0]) for c in (h1c, h2c, z1c, z2c)]
            *_, h1_b, h2_b, z1_b, z2_b = torch.ops.nested_learning.memory_mlp_momentum_fwd(
                *block, *starts, *ctx.args, 1)
            grads = torch.ops.nested_learning.memory_mlp_momentum_bwd(
                *block, h1_b, h2_b, z1_b, z2_b, grad_y[:, t0:t1], *carried, *start_grads,
                *ctx.args)
            return grads[:6], grads[6:]

        carried = backward_in_blocks(q.shape[1], ctx.args[0], ctx.save_every, seq_grads,
                                     states[:4], states[4:], block_step)
    return (*seq_grads, *(g.to(t) for g, t in zip(carried, ctx.state_dtypes)), None, None, None,
            None)


_memory_mlp_momentum_fwd.register_autograd(_memory_mlp_momentum_backward,
                                           setup_context=_memory_mlp_momentum_setup_context)


def fused_mlp_memory_momentum(q, k, v, alpha, beta, lr, w_in, w_out, z_in, z_out, chunk_size,
                              activation="silu", max_grad_norm=None, state_every=None):
    """A residual MLP memory layer with Titans' momentum transition (Eq. 13-14) per layer:
        Z_t = beta_t Z_{t-1} - lr_t g_t a_t^T ;  W_t = alpha_t W_{t-1} + Z_t
    (g_t, a_t: the layer's closed-form inner gradient at W_B, clipped as in
    fused_mlp_memory_delta, and its input). Returns (y, (W_in, W_out) at T, (Z_in, Z_out) at
    T, (W_in, W_out) at the last chunk's start); state_every as in fused_mlp_memory_delta (the
    momenta are saved and recomputed with the weights). Self-generated targets (HOPE, NL Eq.
    87) are fused for DGD / GD only (fused_mlp_memory_delta): HOPE's memories learn by DGD."""
    _check_inputs({"q": q, "k": k, "v": v, "alpha": alpha, "beta": beta, "lr": lr},
                  {"w_in": w_in, "w_out": w_out, "z_in": z_in, "z_out": z_out}, chunk_size,
                  activation, max_grad_norm, "fused_mlp_memory_momentum")
    every = resolve_state_every(q.shape[1], chunk_size, state_every)
    save_every = every if _needs_grad(q, k, v, alpha, beta, lr, w_in, w_out, z_in, z_out) else 0
    y, win_T, wout_T, zin_T, zout_T, win_B, wout_B, *_ = torch.ops.nested_learning.memory_mlp_momentum_fwd(
        q, k, v, alpha, beta, lr, w_in, w_out, z_in, z_out, chunk_size, activation,
        None if max_grad_norm is None else float(max_grad_norm), save_every)
    return y, (win_T, wout_T), (zin_T, zout_T), (win_B, wout_B)
