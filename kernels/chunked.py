"""Chunked PyTorch implementations of the two scan primitives (DESIGN §3.2, §4).

Same maths as `kernels/reference.py`, but the T-step recurrence is cut into chunks of
`chunk_size` tokens: everything inside a chunk is a handful of batched matmuls over all
chunks at once, and only the (S, Z) state is carried across chunks by a Python loop over
chunks (never over tokens). The last chunk may be shorter than `chunk_size`; it is run
as its own group, so results are exact for any T and do not depend on `chunk_size`
(beyond float rounding). Gradients of every input, the initial states included, come
from plain autograd.

Notation inside one chunk of L tokens (local times t = 1..L, t = 0 is the chunk start,
S_0 / Z_0 the incoming states, rows of Q, K [L,K] and U [L,V] are q_t, k_t, u_t):
    P[t, j] = prod_{s=j+1..t} g_s     for 0 <= j <= t <= L (P[t, t] = 1), 0 above,
the "segment products" of a gate g: the ratios a_t / a_j of cumulative gate products
that the chunked forms need. A quotient of cumulative products overflows once gates get
small (a_j underflows), so P is built in log space as exp of the segment sums
sum_{s=j+1..t} log g_s, each summed only over its own segment (a masked cumsum), so no
large cumulative logs are subtracted and nothing cancels, overflows or becomes NaN
(fla builds the same matrix from chunk-local cumulative log gates). A gate of exactly 0
(or below float tiny) has log g = -inf: its segments' products are exactly 0, like the
reference, and its gradient is 0 (the reference's is the product of the other gates).
Clamping log g at log(tiny) instead left products of tiny * alpha, subnormal numbers, which
CPUs compute several times slower, wherever a gate is 0 (Titans without momentum: beta = 0).
Gates must be >= 0: the models' gates are sigmoids in (0, 1], and exactly 0 or 1 are
fine; gates above 1 work while their products fit.

Computation runs in the widest input dtype, float32 at least (bf16/fp16 are upcast, float64
stays float64: checks.compute_dtype);
o comes back in q's dtype, the states in the compute dtype (as in the reference).
"""
import torch

from .checks import compute_dtype


def _segment_products(gates):
    """gates [..., L] -> P [..., L+1, L+1] with P[t, j] = prod_{s=j+1..t} gates_s (gate
    index s = 1..L), 1 on the diagonal and 0 above it. O(L^2) per chunk."""
    L = gates.shape[-1]
    tiny = torch.finfo(gates.dtype).tiny
    # -inf where g < tiny: exactly-0 products, no subnormals (module doc). The clamp keeps
    # the masked gradient finite: 0 * d log(g)/dg at g = 0 would be 0 * inf = NaN.
    log_gates = torch.log(gates.clamp_min(tiny)).masked_fill(gates < tiny, -torch.inf)
    log_gates = torch.nn.functional.pad(log_gates, (1, 0))        # index 0 is never used
    upper = torch.ones(L + 1, L + 1, dtype=gates.dtype, device=gates.device).triu()
    strictly_upper = torch.ones(L + 1, L + 1, dtype=torch.bool, device=gates.device).triu(1)
    # Built transposed, P^T[j, t], so the cumsum runs along the contiguous last dim:
    # cols[j, t] = log g_t kept where t > j; the cumsum along t gives sum_{s=j+1..t} log g_s.
    # A select, not a product with a 0/1 mask: -inf * 0 is NaN.
    cols = torch.where(strictly_upper, log_gates.unsqueeze(-2), 0.0)
    return (torch.exp(torch.cumsum(cols, dim=-1)) * upper).transpose(-1, -2)


def _split_into_chunks(x, chunk_size):
    """x [B,H,T,...] -> list of (group [B,H,N,L,...]) covering T in order: the full
    chunks of length chunk_size, then the short tail chunk if T is not a multiple."""
    B, H, T = x.shape[:3]
    n_full, tail = T // chunk_size, T % chunk_size      # not divmod: torch.compile cannot trace it on a symbolic T
    groups = []
    if n_full:
        head = x[:, :, : n_full * chunk_size]
        groups.append(head.reshape(B, H, n_full, chunk_size, *x.shape[3:]))
    if tail:
        groups.append(x[:, :, n_full * chunk_size:].unsqueeze(2))
    return groups


def _stack_starts(starts):
    """The states entering each chunk, [B*H, N, ...] from N tensors [B*H, ...]. One chunk
    (memory.py's per-chunk path hands the scans one chunk per call) takes a view: a stack
    would copy the state and keep the copy for the backward beside the original, which the
    sequential step keeps too."""
    return starts[0].unsqueeze(1) if len(starts) == 1 else torch.stack(starts, dim=1)


def _prepare(q, k, u, gates, initial_states, chunk_size):
    """Upcast to the compute dtype, move heads before time ([B,T,H,..] -> [B,H,T,..]) and
    cut into chunk groups. Returns the grouped tensors and the states (in the compute dtype)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    dtype = compute_dtype(q, k, u, *gates, *initial_states)
    B, T, H, K = q.shape
    V = u.shape[-1]
    # One contiguous copy up front, instead of one hidden copy in every matmul that reads it.
    per_token = [t.to(dtype).transpose(1, 2).contiguous() for t in (q, k, u)]
    per_token += [g.to(dtype).transpose(1, 2).contiguous() for g in gates]
    grouped = [_split_into_chunks(t, chunk_size) for t in per_token]
    states = [q.new_zeros(B, H, V, K, dtype=dtype) if s is None else s.to(dtype)
              for s in initial_states]
    return list(zip(*grouped)), states


def _finish(outputs, q, u):
    """Concatenate per-group outputs [B,H,N,L,V] back to o [B,T,H,V] in q's dtype."""
    if not outputs:
        return u.new_zeros(u.shape, dtype=q.dtype)
    o = torch.cat([x.flatten(2, 3) for x in outputs], dim=2) if len(outputs) > 1 \
        else outputs[0].flatten(2, 3)                               # [B,H,T,V]
    return o.transpose(1, 2).to(q.dtype).contiguous()


def momentum_rule_chunked(q, k, u, alpha, beta, initial_state=None, initial_momentum=None,
                          chunk_size=64, output=True):
    """Z_t = beta_t Z_{t-1} + u_t k_t^T ; S_t = alpha_t S_{t-1} + Z_t ; o_t = S_t q_t
    (Titans Eq. 13-14), chunked. Returns (o [B,T,H,V], S_T, Z_T [B,H,V,K]).

    Unrolling one chunk from (S_0, Z_0), with A = P(alpha), Bm = P(beta) (module doc):
        Z_t = b_t Z_0 + sum_{i<=t} Bm[t,i] u_i k_i^T                  (b_t = Bm[t,0])
        S_t = a_t S_0 + sum_{j=1..t} A[t,j] Z_j                       (a_t = A[t,0])
            = a_t S_0 + c_t Z_0 + sum_{i<=t} W[t,i] u_i k_i^T
    with c_t = sum_{j=1..t} A[t,j] b_j and W[t,i] = sum_{j=i..t} A[t,j] Bm[j,i], i.e.
    c = A b and W = A Bm (both lower-triangular products, O(L^3) per chunk, tiny).
    Reading with the queries: O = diag(a) Q S_0^T + diag(c) Q Z_0^T + (W ∘ Q K^T) U.
    The state carry needs only the last row: S_L, Z_L from W[L,:], Bm[L,:].
    output=False: the state alone (o is None), without the readout's matmuls.
    """
    groups, (S, Z) = _prepare(q, k, u, (alpha, beta), (initial_state, initial_momentum),
                              chunk_size)
    outputs = []
    for Q, Kc, U, alpha_c, beta_c in groups:                        # [B,H,N,L,...]
        A = _segment_products(alpha_c)                              # [B,H,N,L+1,L+1]
        Bm = _segment_products(beta_c)
        a, b = A[..., 1:, 0], Bm[..., 1:, 0]                        # [B,H,N,L]
        A, Bm = A[..., 1:, 1:], Bm[..., 1:, 1:]                     # [B,H,N,L,L]
        W = A @ Bm
        c = (A @ b.unsqueeze(-1)).squeeze(-1)
        # Everything that does not involve the incoming states, for all chunks at once.
        intra = ((Q @ Kc.transpose(-1, -2)) * W) @ U if output else None   # [B,H,N,L,V]
        # Chunk-end update of the stacked state X = [S; Z]:
        #   S_L = a_L S_0 + c_L Z_0 + sum_i W[L,i] u_i k_i^T
        #   Z_L = b_L Z_0 + sum_i Bm[L,i] u_i k_i^T
        # i.e. X_L = M X_0 + write with the 2 x 2 mixing M = [[a_L, c_L], [0, b_L]].
        B, H, N, L, V = U.shape
        K = Kc.shape[-1]
        last_rows = torch.stack([W[..., -1, :], Bm[..., -1, :]], dim=-2)   # [B,H,N,2,L]
        weighted = last_rows.unsqueeze(-2) * U.transpose(-1, -2).unsqueeze(-3)  # [..,2,V,L]
        write = weighted.reshape(B, H, N, 2 * V, L) @ Kc                        # [..,2V,K]
        mixing = torch.stack([torch.stack([a[..., -1], c[..., -1]], dim=-1),
                              torch.stack([torch.zeros_like(b[..., -1]), b[..., -1]], dim=-1)],
                             dim=-2)                                      # [B,H,N,2,2]
        write = write.view(B * H, N, 2, V * K)
        mixing = mixing.view(B * H, N, 2, 2)
        # The only sequential part: the states entering each chunk, one tiny bmm per chunk.
        X = torch.stack([S, Z], dim=2).reshape(B * H, 2, V * K)
        X_starts = []
        for n in range(N):
            X_starts.append(X)
            X = torch.baddbmm(write[:, n], mixing[:, n], X)          # write + M X
        S, Z = (x.contiguous() for x in X.view(B, H, 2, V, K).unbind(2))
        if not output:
            continue
        X0 = _stack_starts(X_starts).view(B, H, N, 2 * V, K)         # [S_0; Z_0] per chunk
        QS0, QZ0 = (Q @ X0.transpose(-1, -2)).split(V, dim=-1)      # Q S_0^T, Q Z_0^T
        outputs.append(torch.addcmul(torch.addcmul(intra, a.unsqueeze(-1), QS0),
                                     c.unsqueeze(-1), QZ0))
    return (_finish(outputs, q, u) if output else None), S, Z


def delta_rule_chunked(q, k, u, alpha, eta, initial_state=None, chunk_size=64, output=True):
    """S_t = S_{t-1} (alpha_t I - eta_t k_t k_t^T) + u_t k_t^T ; o_t = S_t q_t
    (DGD, NL Eq. 57/88), chunked with the WY/UT form. Returns (o [B,T,H,V], S_T).

    Rewrite one step as S_t = alpha_t S_{t-1} + r_t k_t^T with the "residual write"
        r_t = u_t - eta_t S_{t-1} k_t.
    Unrolled over a chunk from S_0 with D = P(alpha) (module doc), gamma_t = D[t,0]:
        S_t = gamma_t S_0 + sum_{i<=t} D[t,i] r_i k_i^T.
    Substituting S_{t-1} into r_t gives a unit lower-triangular system for R = [r_t]:
        r_t + eta_t sum_{i<t} D[t-1,i] (k_t . k_i) r_i = u_t - eta_t gamma_{t-1} S_0 k_t
        (I + A) R = U - diag(eta gamma_prev) K S_0^T,   A = tril(diag(eta) (D_prev ∘ K K^T), -1)
    (A is `lower` in the code; L stays the chunk length)
    so with Tm = (I + A)^{-1} (a triangular solve, batched over all chunks):
        R = U' - W S_0^T,    U' = Tm U,    W = Tm diag(eta gamma_prev) K.
    This is fla's WY/UT form of the gated delta rule (beta' = eta/alpha, v' = u alpha/eta
    folded back), written without any division, so eta = 0 (then r_t = u_t) and alpha = 0
    are exact. The state carry is S_L = gamma_L S_0 + R^T diag(D[L,:]) K, an affine map
    of S_0 (one matmul per chunk in the sequential pass); afterwards R and the readout
    O = diag(gamma) Q S_0^T + (D ∘ Q K^T) R are computed for all chunks at once.
    output=False: the state alone (o is None), without R and the readout's matmuls.
    """
    groups, (S,) = _prepare(q, k, u, (alpha, eta), (initial_state,), chunk_size)
    outputs = []
    for Q, Kc, U, alpha_c, eta_c in groups:                         # [B,H,N,L,...]
        P = _segment_products(alpha_c)                              # [B,H,N,L+1,L+1]
        L = Kc.shape[3]
        gamma, gamma_prev = P[..., 1:, 0], P[..., :-1, 0]           # gamma_t, gamma_{t-1}
        D, D_prev = P[..., 1:, 1:], P[..., :-1, 1:]                 # D[t,i], D[t-1,i]
        # D_prev is zero on and above the diagonal, so this is already strictly lower.
        lower = eta_c.unsqueeze(-1) * D_prev * (Kc @ Kc.transpose(-1, -2))
        unit_lower = lower + torch.eye(L, dtype=lower.dtype, device=lower.device)
        rhs = torch.cat([U, (eta_c * gamma_prev).unsqueeze(-1) * Kc], dim=-1)
        solved = torch.linalg.solve_triangular(unit_lower, rhs, upper=False,
                                               unitriangular=True)
        B, H, N, _, V = U.shape
        K = Kc.shape[-1]
        U_prime, W = solved.split([V, K], dim=-1)
        # S_L = gamma_L S_0 + (U' - W S_0^T)^T Kd = S_0 (gamma_L I - W^T Kd) + U'^T Kd with
        # Kd = diag(D[L,:]) K: an affine map of S_0 per chunk, built for all chunks at once.
        decay_to_end = D[..., -1, :, None] * Kc                     # rows D[L,i] k_i
        write, W_T_Kd = (solved.transpose(-1, -2) @ decay_to_end).split([V, K], dim=-2)
        eye = torch.eye(K, dtype=Kc.dtype, device=Kc.device)
        transition = gamma[..., -1, None, None] * eye - W_T_Kd     # [B,H,N,K,K]
        # chunk-major [N, B*H, ...] so that every step reads contiguous matrices
        write = write.permute(2, 0, 1, 3, 4).reshape(N, B * H, V, K)
        transition = transition.permute(2, 0, 1, 3, 4).reshape(N, B * H, K, K)
        # The only sequential part: the state entering each chunk, one matmul per chunk.
        S_starts, S = [], S.reshape(B * H, V, K)
        for n in range(N):
            S_starts.append(S)
            S = torch.baddbmm(write[n], S, transition[n])          # write + S @ transition
        S = S.view(B, H, V, K)
        if not output:
            continue
        S0 = _stack_starts(S_starts).view(B, H, N, V, K)
        R = U_prime - W @ S0.transpose(-1, -2)                      # [B,H,N,L,V]
        readout = (Q @ Kc.transpose(-1, -2)) * D
        outputs.append(torch.addcmul(readout @ R, gamma.unsqueeze(-1),
                                     Q @ S0.transpose(-1, -2)))
    return (_finish(outputs, q, u) if output else None), S
