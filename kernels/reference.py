"""Sequential reference implementations of the two scan primitives (DESIGN §3.2).

These are the oracles: one token at a time, straight from the recurrences, no tricks.
They are slow (a Python loop over T) and exist to be read and to test the fast paths.

Shapes (per batch b, head h; S maps a key to a value, o_t = S_t q_t with S [V, K]: DESIGN's
row-vector form, transposed):
    q, k  [B, T, H, K]      u  [B, T, H, V]      alpha, eta, beta  [B, T, H]
    S, Z  [B, H, V, K]      o  [B, T, H, V]
Computation happens in the widest input dtype, at least float32 (checks.compute_dtype);
outputs come back in the dtype of `q`.
"""
import torch

from .checks import compute_dtype


def _promote(tensors, states):
    dtype = compute_dtype(*tensors, *states)
    return [t.to(dtype) for t in tensors]


def _zeros_state(q, u):
    B, _, H, K = q.shape
    V = u.shape[-1]
    return q.new_zeros(B, H, V, K)


def delta_rule_reference(q, k, u, alpha, eta, initial_state=None):
    """S_t = S_{t-1} (alpha_t I - eta_t k_t k_t^T) + u_t k_t^T ;  o_t = S_t q_t.

    This is the DGD transition of NL Eq. 57/88 with the write u_t already scaled by the
    learning rate. Returns (o [B,T,H,V], S_T [B,H,V,K]).
    """
    out_dtype = q.dtype
    q, k, u, alpha, eta = _promote((q, k, u, alpha, eta), (initial_state,))
    S = _zeros_state(q, u) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for t in range(q.shape[1]):
        k_t, u_t = k[:, t], u[:, t]                               # [B,H,K], [B,H,V]
        Sk = torch.einsum("bhvk,bhk->bhv", S, k_t)                # S_{t-1} k_t
        S = (alpha[:, t, :, None, None] * S
             - eta[:, t, :, None, None] * Sk[..., None] * k_t[..., None, :]
             + u_t[..., None] * k_t[..., None, :])
        outs.append(torch.einsum("bhvk,bhk->bhv", S, q[:, t]))
    o = torch.stack(outs, dim=1) if outs else u.new_zeros(u.shape)
    return o.to(out_dtype), S


def momentum_rule_reference(q, k, u, alpha, beta, initial_state=None, initial_momentum=None):
    """Z_t = beta_t Z_{t-1} + u_t k_t^T ;  S_t = alpha_t S_{t-1} + Z_t ;  o_t = S_t q_t.

    Titans Eq. 13-14 with S the memory, Z the surprise momentum, alpha = 1 - forget and the
    write u_t = -theta_t * dl/d(S k_t). Returns (o [B,T,H,V], S_T, Z_T [B,H,V,K]).
    """
    out_dtype = q.dtype
    q, k, u, alpha, beta = _promote((q, k, u, alpha, beta), (initial_state, initial_momentum))
    S = _zeros_state(q, u) if initial_state is None else initial_state.to(q.dtype)
    Z = _zeros_state(q, u) if initial_momentum is None else initial_momentum.to(q.dtype)
    outs = []
    for t in range(q.shape[1]):
        Z = beta[:, t, :, None, None] * Z + u[:, t, ..., None] * k[:, t, :, None, :]
        S = alpha[:, t, :, None, None] * S + Z
        outs.append(torch.einsum("bhvk,bhk->bhv", S, q[:, t]))
    o = torch.stack(outs, dim=1) if outs else u.new_zeros(u.shape)
    return o.to(out_dtype), S, Z
