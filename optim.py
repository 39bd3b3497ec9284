"""Deep optimisers of Nested Learning (NL §4, §7.2, Alg. 1) as torch.optim.Optimizer subclasses.

    Muon                    momentum -> Newton-Schulz orthogonalisation (NL Eq. 52, 43-44)
    M3                      multi-scale momentum Muon (NL Algorithm 1), EMA accumulators
    DMGD                    deep momentum GD: the momentum is an MLP memory (NL Eq. 50)
    DeltaMomentum           delta-rule momentum m <- m(a I - e g^T g) - eta P g (NL Eq. 48-49)
    PreconditionedMomentum  m <- a m - eta P g with an Adam-style diagonal P (NL Eq. 46-47)

Every optimiser is a hybrid: param groups with `use_muon=True` (the default) get the deep
rule, groups with `use_muon=False` get AdamW. `split_param_groups(model, wd)` builds the
usual split (hidden matrices -> deep rule; embeddings, LM head, vectors -> AdamW), and
`build_optimizer(name, ...)` is what train.py calls. Weight decay is decoupled everywhere:
p <- p (1 - lr * wd) before the update. docs/OPTIMIZERS.md records every choice the paper
leaves open.

FSDP2: parameters, gradients and state may be DTensor shards. Elementwise rules run on the
local shards; rules that need the whole matrix (Newton-Schulz, the delta-momentum Gram
matrix) gather it with `full_tensor()`, compute on every rank, and keep their own slice
(`distribute_tensor(..., src_data_rank=None)`, no communication). Global reductions (norms,
means) all-reduce over the sharded mesh dimensions. Plain tensors take none of these paths.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

try:  # torch.distributed can be compiled out (some macOS / minimal builds)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - only on builds without torch.distributed
    dist, DTensor, distribute_tensor = None, None, None

__all__ = ["Muon", "M3", "DMGD", "DeltaMomentum", "PreconditionedMomentum", "OPTIMIZERS",
           "build_optimizer", "split_param_groups", "optimizer_options", "newton_schulz"]


# ----------------------------------------------------------------------------------------
# DTensor helpers: identity functions on plain tensors

def _is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard (an alias: in-place changes reach the DTensor) or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _gather(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose local shard is `local`, sharded like the DTensor `like`."""
    if not _is_dtensor(like):
        return local
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride()).full_tensor()


def _own_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `full` (identical on every rank), laid out like `like`."""
    if not _is_dtensor(like):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _global_sum(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a per-shard partial sum over the mesh dimensions on which `like` is sharded."""
    if _is_dtensor(like):
        for mesh_dim, placement in enumerate(like.placements):
            if placement.is_shard():
                dist.all_reduce(partial, group=like.device_mesh.get_group(mesh_dim))
    return partial


# ----------------------------------------------------------------------------------------
# Newton-Schulz orthogonalisation (NL Eq. 43-44, 52)

# Quintic iteration X <- a X + b (X X^T) X + c (X X^T)^2 X with coefficients chosen (Keller
# Jordan's Muon) to push every non-negligible singular value into [0.68, 1.21] (the band
# a s + b s^3 + c s^5 maps into itself) in 5 steps, faster than
# the cubic X <- 1.5 X - 0.5 X X^T X that one GD step on ||X^T X - I||_F^2 gives (NL Eq. 44).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U V^T of matrix = U S V^T (batched over leading dims); bf16 on CUDA, fp32 else."""
    if matrix.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix (or a batch of them), got shape {tuple(matrix.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(torch.bfloat16 if matrix.is_cuda else torch.float32)
    transposed = x.size(-2) > x.size(-1)
    if transposed:                        # iterate on the wide side: X X^T is the smaller Gram
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)   # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return x.to(matrix.dtype)


def _as_matrices(t: torch.Tensor) -> torch.Tensor:
    """2-D stays 2-D; a >2-D parameter is a batch of matrices over its leading dims."""
    return t if t.dim() == 2 else t.reshape(-1, t.size(-2), t.size(-1))


# ----------------------------------------------------------------------------------------
# the hybrid base class

def _check(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


class _HybridOptimizer(torch.optim.Optimizer):
    """Deep rule on `use_muon` groups, AdamW (decoupled weight decay) on the other groups."""

    name = "hybrid"
    needs_matrices = False      # True: every use_muon parameter must be at least 2-D

    def __init__(self, params, defaults):
        lr, wd, betas, eps = defaults["lr"], defaults["weight_decay"], defaults["betas"], defaults["eps"]
        _check(lr >= 0, f"{self.name}: lr must be >= 0, got {lr}")
        _check(wd >= 0, f"{self.name}: weight_decay must be >= 0, got {wd}")
        _check(len(betas) == 2 and all(0 <= b < 1 for b in betas),
               f"{self.name}: betas must be two numbers in [0, 1), got {betas}")
        _check(eps > 0, f"{self.name}: eps must be > 0, got {eps}")
        defaults = dict(defaults, betas=tuple(betas), use_muon=True)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if group["use_muon"] and self.needs_matrices and p.dim() < 2:
                raise ValueError(f"{self.name}: a parameter of shape {tuple(p.shape)} is in a use_muon group, but "
                                 f"orthogonalisation needs matrices; put vectors in a group with use_muon=False")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{self.name} does not support sparse gradients")
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                if group["use_muon"]:
                    self._deep_step(p, p.grad, state, group)
                else:
                    _adamw_step(p, p.grad, state, group)
        return loss

    def _deep_step(self, p, grad, state, group):
        raise NotImplementedError


def _adamw_step(p, grad, state, group):
    """AdamW (Loshchilov & Hutter) exactly as torch.optim.AdamW computes it, on local shards."""
    lr, wd, (beta1, beta2), eps, t = group["lr"], group["weight_decay"], group["betas"], group["eps"], state["step"]
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    param, g = _local(p), _local(grad)
    exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
    param.mul_(1 - lr * wd)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** t))


def _zeros_state(state, p, *names):
    for key in names:
        if key not in state:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)


# ----------------------------------------------------------------------------------------
# Muon (NL Eq. 52: a linear momentum memory with Newton-Schulz as its output nonlinearity)

MUON_SCALES = ("match_adamw", "spectral")


def _muon_scale(shape, scale: str) -> float:
    rows, cols = shape[-2], shape[-1]
    if scale == "match_adamw":
        # NS output has RMS 1/sqrt(max(rows, cols)); this makes the update RMS 0.2, about
        # AdamW's, so Muon shares AdamW's lr and weight decay (Moonlight, Liu et al. 2025).
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))  # "spectral": Keller Jordan's scale, use lr ~ 0.02


class Muon(_HybridOptimizer):
    """Muon for `use_muon` matrices (momentum -> Newton-Schulz), AdamW for the other groups.

    buf <- momentum * buf + (1 - momentum) g;  d = (1 - momentum) g + momentum * buf (Nesterov) or buf;
    p <- p (1 - lr wd) - lr * scale(shape) * NS(d).
    """

    name = "Muon"
    needs_matrices = True

    def __init__(self, params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8,
                 momentum=0.95, nesterov=True, ns_steps=5, scale="match_adamw"):
        _check(0 <= momentum < 1, f"Muon: momentum must be in [0, 1), got {momentum}")
        _check(isinstance(ns_steps, int) and ns_steps >= 1, f"Muon: ns_steps must be an integer >= 1, got {ns_steps}")
        _check(scale in MUON_SCALES, f"Muon: scale must be one of {', '.join(MUON_SCALES)}, got {scale!r}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum,
                                      nesterov=bool(nesterov), ns_steps=ns_steps, scale=scale))

    def _deep_step(self, p, grad, state, group):
        _zeros_state(state, p, "momentum_buffer")
        beta, g, buf = group["momentum"], _local(grad), _local(state["momentum_buffer"])
        buf.lerp_(g, 1 - beta)
        direction = g.lerp(buf, beta) if group["nesterov"] else buf
        full = _gather(direction, p)
        ortho = newton_schulz(_as_matrices(full), group["ns_steps"]).reshape(full.shape)
        param = _local(p)
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(_own_slice(ortho, p), alpha=-group["lr"] * _muon_scale(p.shape, group["scale"]))


# ----------------------------------------------------------------------------------------
# M3: multi-scale momentum Muon (NL Algorithm 1)

class M3(_HybridOptimizer):
    """NL Algorithm 1 with EMA accumulators (the paper's literal sums never decay).

    M1 <- b1 M1 + (1-b1) g;  V <- b2 V + (1-b2) g^2;  O1 = NS(M1)
    every `frequency` steps:  M2 <- b3 M2 + (1-b3) sum(last f gradients);  O2 = NS(M2)
    D = (O1 + alpha O2) / (sqrt(V / (1 - b2^t)) + eps)
    p <- p (1 - lr wd) - lr * update_rms * D / RMS(D)     (update_rms = 0 or None: - lr * D, literal)
    """

    name = "M3"
    needs_matrices = True

    def __init__(self, params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8,
                 beta3=0.9, frequency=10, alpha=1.0, ns_steps=5, update_rms=0.2):
        _check(0 <= beta3 < 1, f"M3: beta3 must be in [0, 1), got {beta3}")
        _check(isinstance(frequency, int) and frequency >= 1, f"M3: frequency must be an integer >= 1, got {frequency}")
        _check(alpha >= 0, f"M3: alpha must be >= 0, got {alpha}")
        _check(isinstance(ns_steps, int) and ns_steps >= 1, f"M3: ns_steps must be an integer >= 1, got {ns_steps}")
        _check(update_rms is None or update_rms >= 0, f"M3: update_rms must be >= 0 or None, got {update_rms}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, beta3=beta3,
                                      frequency=frequency, alpha=alpha, ns_steps=ns_steps, update_rms=update_rms))

    def _deep_step(self, p, grad, state, group):
        _zeros_state(state, p, "fast_momentum", "second_moment", "slow_momentum", "grad_sum", "slow_update")
        (beta1, beta2), t = group["betas"], state["step"]
        g = _local(grad)
        m1, v = _local(state["fast_momentum"]), _local(state["second_moment"])
        m2, grad_sum, o2 = _local(state["slow_momentum"]), _local(state["grad_sum"]), _local(state["slow_update"])
        m1.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        grad_sum.add_(g)
        if t % group["frequency"] == 0:   # the slow level: once per f steps, on the chunk's summed gradient
            m2.lerp_(grad_sum, 1 - group["beta3"])
            grad_sum.zero_()
            o2.copy_(self._orthogonalise(m2, p, group))
        o1 = self._orthogonalise(m1, p, group)
        update = (o1 + group["alpha"] * o2) / ((v / (1 - beta2 ** t)).sqrt_().add_(group["eps"]))
        if group["update_rms"]:     # rescale D to a fixed RMS (a tensor op: no host sync on CUDA)
            mean_square = _global_sum(update.float().square().sum(), p) / p.numel()
            update = update * (group["update_rms"] / (mean_square.sqrt() + 1e-12)).to(update.dtype)
        param = _local(p)
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(update, alpha=-group["lr"])

    @staticmethod
    def _orthogonalise(local_momentum, p, group):
        full = _gather(local_momentum, p)
        return _own_slice(newton_schulz(_as_matrices(full), group["ns_steps"]).reshape(full.shape), p)


# ----------------------------------------------------------------------------------------
# DMGD: deep momentum gradient descent (NL Eq. 50)

class DMGD(_HybridOptimizer):
    """Deep momentum: the momentum is a memory m(.) learned by GD on an internal objective (NL Eq. 50).

    W_{i+1} = W_i + lr * m_{i+1}(u_i),   m_{i+1} = momentum * m_i - eta * grad L2(m_i; u_i)

    Our instantiation, per parameter tensor (docs/OPTIMIZERS.md):
      u^ = u / RMS(u)                               normalised gradient (scale-free inner problem)
      m(u^)_j = b_j + w_out . SiLU(W_in z_j + c),   z_j = (u^_j, b_j)
    b (one entry per coordinate) is the linear momentum memory of NL Eq. 33-34; the MLP
    (W_in [hidden, 2], c, w_out [hidden]) is shared by all coordinates of the tensor and acts
    elementwise. The internal objective is NL Eq. 33's dot-product objective with value u^,
        L2(m; u^) = mean_j <m(u^)_j, u^_j>,
    and every memory parameter takes one decayed GD step on it per outer step:
        b <- momentum * b - (1 - momentum) u^        (b's step: the EMA, the gradient's direct
                                                      term; the part through the MLP is left out)
        theta <- momentum * theta - inner_lr * dL2/dtheta   (theta = W_in, c, w_out; at the new b)
    w_out starts at 0, but its inner step comes before the read-out, so step 1 already adds
    a small MLP term to normalised momentum; inner_lr = 0 keeps the update plain normalised
    momentum forever. The MLP's state stays fp32 whatever the parameter's dtype.
    """

    name = "DMGD"
    chunk_elements = 1 << 18      # the elementwise MLP runs over flat chunks: hidden x chunk temporaries

    def __init__(self, params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8,
                 momentum=0.9, hidden=8, inner_lr=0.05):
        _check(0 <= momentum < 1, f"DMGD: momentum must be in [0, 1), got {momentum}")
        _check(isinstance(hidden, int) and hidden >= 1, f"DMGD: hidden must be an integer >= 1, got {hidden}")
        _check(inner_lr >= 0, f"DMGD: inner_lr must be >= 0, got {inner_lr}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum,
                                      hidden=hidden, inner_lr=inner_lr))

    MLP_STATE = ("mlp_in", "mlp_bias", "mlp_out")

    def load_state_dict(self, state_dict):
        """torch's, but the MLP memory comes back as saved (fp32): torch casts every state
        tensor to its parameter's dtype, which for a bf16 parameter rounded the MLP and then
        failed the next step at a dtype mismatch."""
        super().load_state_dict(state_dict)
        saved = [i for group in state_dict["param_groups"] for i in group["params"]]
        for i, p in zip(saved, [p for group in self.param_groups for p in group["params"]]):
            for key in self.MLP_STATE:
                if key in state_dict["state"].get(i, {}):
                    value = state_dict["state"][i][key]
                    self.state[p][key] = value.to(device=_local(p).device, dtype=torch.float32, copy=True)

    def _deep_step(self, p, grad, state, group):
        beta, hidden = group["momentum"], group["hidden"]
        if "momentum_buffer" not in state:   # contiguous: the MLP runs over its flat view
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        if "mlp_in" not in state:
            # deterministic init (same on every rank, no RNG use): input directions spread
            # evenly over the unit circle of the 2 features; zero output -> step 1 = momentum
            angle = torch.arange(hidden, dtype=torch.float32, device=_local(p).device) * (2 * math.pi / hidden)
            state["mlp_in"] = torch.stack([angle.cos(), angle.sin()], dim=1)
            state["mlp_bias"] = torch.zeros(hidden, device=angle.device)
            state["mlp_out"] = torch.zeros(hidden, device=angle.device)
        w_in, c, w_out = state["mlp_in"], state["mlp_bias"], state["mlp_out"]
        g, b = _local(grad).float(), _local(state["momentum_buffer"])
        mean_square = _global_sum(g.square().sum(), p) / p.numel()
        g_hat = (g / (mean_square.sqrt() + group["eps"])).flatten()
        b_flat = b.view(-1)
        b_flat.mul_(beta).add_(g_hat.to(b.dtype), alpha=-(1 - beta))      # linear memory: GD on <b, u^>

        # inner GD step on the MLP: dL2/dtheta, summed over local chunks, then over shards
        grad_in, grad_c, grad_out = torch.zeros_like(w_in), torch.zeros_like(c), torch.zeros_like(w_out)
        for g_chunk, b_chunk in zip(g_hat.split(self.chunk_elements), b_flat.split(self.chunk_elements)):
            z = torch.stack([g_chunk, b_chunk.float()])                  # [2, N]
            pre = w_in @ z + c[:, None]                                  # [hidden, N]
            sig = torch.sigmoid(pre)
            grad_out += (pre * sig) @ g_chunk                           # d/dw_out of sum_j u^_j m_j
            d_pre = (w_out[:, None] * g_chunk[None, :]) * sig * (1 + pre * (1 - sig))   # SiLU'
            grad_in += d_pre @ z.T
            grad_c += d_pre.sum(dim=1)
        flat_grads = _global_sum(torch.cat([grad_in.flatten(), grad_c, grad_out]), p) / p.numel()
        gi, gc, go = flat_grads.split([grad_in.numel(), hidden, hidden])
        w_in.mul_(beta).sub_(gi.view_as(w_in), alpha=group["inner_lr"])
        c.mul_(beta).sub_(gc, alpha=group["inner_lr"])
        w_out.mul_(beta).sub_(go, alpha=group["inner_lr"])

        # the update is the memory's output for this gradient: W <- W + lr * m_{i+1}(u^)
        param = _local(p)
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param_flat = param.view(-1) if param.is_contiguous() else None
        outputs = []
        for g_chunk, b_chunk in zip(g_hat.split(self.chunk_elements), b_flat.split(self.chunk_elements)):
            z = torch.stack([g_chunk, b_chunk.float()])
            outputs.append(b_chunk.float() + w_out @ torch.nn.functional.silu(w_in @ z + c[:, None]))
        update = torch.cat(outputs).to(param.dtype)
        if param_flat is not None:
            param_flat.add_(update, alpha=group["lr"])
        else:
            param.add_(update.view(param.shape), alpha=group["lr"])


# ----------------------------------------------------------------------------------------
# Delta momentum (NL Eq. 48-49) and preconditioned momentum (NL Eq. 46-47)

PRECONDITIONERS = ("adam", "none")


def _adam_preconditioned(g, state, p, beta2, eps, t):
    """P g with the diagonal P = 1 / (sqrt(v / (1 - beta2^t)) + eps), v the EMA of g^2 (NL App. B)."""
    _zeros_state(state, p, "second_moment")
    v = _local(state["second_moment"])
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    return g / ((v / (1 - beta2 ** t)).sqrt_().add_(eps))


class DeltaMomentum(_HybridOptimizer):
    """Delta-rule momentum (NL Eq. 48-49), in EMA form, for matrices; elementwise for vectors.

    matrices:  m <- m (momentum I - e g^T g) + (1 - momentum) P g,   e = s / (1 + s ||g||_F^2)
    vectors:   m <- m * (momentum - e * g^2) + (1 - momentum) P g,  e = s / (1 + s g^2), per entry
    p <- p (1 - lr wd) - lr m          (s = delta_strength; >2-D: a batch of matrices)
    NL Eq. 49 is GD on ||m g^T - P||^2: the g^T g term erases what the momentum stored along
    the current gradient's row space before the new gradient is written (a delta rule). The
    step e is the exact proximal step of that objective, as DGD's eta' = eta / (1 + eta ||k||^2)
    (NL Eq. 57/88, DESIGN §3.3): e g^T g has eigenvalues in [0, 1), so the transition is a
    contraction at any gradient scale; small gradients give plain momentum, large ones erase.
    P: "adam" (the diagonal second-moment preconditioner, so the lr is AdamW-like) or "none"
    (P = I, SGD-like lr). delta_strength = 0 is plain EMA momentum.
    """

    name = "DeltaMomentum"

    def __init__(self, params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8,
                 momentum=0.9, delta_strength=1.0, preconditioner="adam"):
        _check(0 <= momentum < 1, f"DeltaMomentum: momentum must be in [0, 1), got {momentum}")
        _check(delta_strength >= 0, f"DeltaMomentum: delta_strength must be >= 0, got {delta_strength}")
        _check(preconditioner in PRECONDITIONERS,
               f"DeltaMomentum: preconditioner must be one of {', '.join(PRECONDITIONERS)}, got {preconditioner!r}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum,
                                      delta_strength=delta_strength, preconditioner=preconditioner))

    def _deep_step(self, p, grad, state, group):
        _zeros_state(state, p, "momentum_buffer")
        beta, strength, t = group["momentum"], group["delta_strength"], state["step"]
        g, m = _local(grad), _local(state["momentum_buffer"])
        if group["preconditioner"] == "adam":
            write = _adam_preconditioned(g, state, p, group["betas"][1], group["eps"], t)
        else:
            write = g
        if strength > 0 and p.dim() >= 2:
            # the matrix rule needs whole rows and columns: gather, compute everywhere, keep our slice
            full_g, full_m = _as_matrices(_gather(g, p)).float(), _as_matrices(_gather(m, p)).float()
            step = strength / (1 + strength * full_g.square().sum(dim=(-2, -1), keepdim=True))
            rows, cols = full_g.shape[-2:]
            # m g^T g two ways; pick the cheaper association (rows x rows or cols x cols Gram)
            erased = (full_m @ full_g.mT) @ full_g if rows <= cols else full_m @ (full_g.mT @ full_g)
            new_m = _own_slice((beta * full_m - step * erased).reshape(p.shape), p)
            m.copy_(new_m).add_(write, alpha=1 - beta)
        elif strength > 0:
            g_sq = g.float().square()
            m.mul_(beta - strength * g_sq / (1 + strength * g_sq)).add_(write, alpha=1 - beta)
        else:
            m.mul_(beta).add_(write, alpha=1 - beta)
        param = _local(p)
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(m, alpha=-group["lr"])


class PreconditionedMomentum(_HybridOptimizer):
    """Preconditioned momentum (NL Eq. 46-47) with the Adam-style diagonal P, in EMA form.

    v <- b2 v + (1 - b2) g^2;  P = diag(1 / (sqrt(v / (1 - b2^t)) + eps))
    m <- b1 m + (1 - b1) P g;  p <- p (1 - lr wd) - lr m / (1 - b1^t)
    Unlike Adam, P multiplies each gradient as it is written into the momentum (the memory
    stores preconditioned gradients), rather than the accumulated momentum at read-out.
    """

    name = "PreconditionedMomentum"

    def __init__(self, params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))

    def _deep_step(self, p, grad, state, group):
        _zeros_state(state, p, "momentum_buffer")
        (beta1, beta2), t = group["betas"], state["step"]
        g, m = _local(grad), _local(state["momentum_buffer"])
        m.mul_(beta1).add_(_adam_preconditioned(g, state, p, beta2, group["eps"], t), alpha=1 - beta1)
        param = _local(p)
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(m, alpha=-group["lr"] / (1 - beta1 ** t))


# ----------------------------------------------------------------------------------------
# construction from a config (train.py)

OPTIMIZERS = {
    "adamw": torch.optim.AdamW,
    "muon": Muon,
    "m3": M3,
    "dmgd": DMGD,
    "delta_momentum": DeltaMomentum,
    "preconditioned_momentum": PreconditionedMomentum,
}

# optimiser keyword -> OptimConfig field, per optimiser (fields that are None are left to the class default)
CONFIG_FIELDS = {
    "adamw": {},
    "muon": {"momentum": "momentum", "nesterov": "nesterov", "ns_steps": "ns_steps", "scale": "muon_scale"},
    "m3": {"beta3": "m3_beta3", "frequency": "m3_frequency", "alpha": "m3_alpha", "ns_steps": "ns_steps",
           "update_rms": "m3_update_rms"},
    "dmgd": {"momentum": "momentum", "hidden": "dmgd_hidden", "inner_lr": "dmgd_inner_lr"},
    "delta_momentum": {"momentum": "momentum", "delta_strength": "delta_strength",
                       "preconditioner": "delta_preconditioner"},
    "preconditioned_momentum": {},
}
_ADAMW_OPTIONS = ("fused", "foreach")


def optimizer_options(name: str, optim_cfg) -> dict:
    """The keyword options of optimiser `name` read from an OptimConfig-like object (or dict)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r} is not one of: {', '.join(OPTIMIZERS)}")
    get = optim_cfg.get if isinstance(optim_cfg, dict) else lambda key, default=None: getattr(optim_cfg, key, default)
    options = {}
    for keyword, field_name in CONFIG_FIELDS[name].items():
        value = get(field_name, None)
        if value is not None:
            options[keyword] = value
    return options


def split_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameters of 2+ dims -> deep rule (use_muon): the hidden matrices, and also conv
    kernels, per-head gate weights, persistent tokens and memory initial weights (a batch of
    matrices over the leading dims); embeddings, LM head and vectors -> AdamW.

    Embeddings and the output head are excluded from orthogonalisation (as in Muon): their
    rows are per-token and their gradients sparse in the vocabulary. Vectors (norm gains,
    biases, gates) are not decayed (the GPT-2/nanoGPT split). Tied weights appear once.
    """
    excluded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "head", None)              # LanguageModel's output head
    if isinstance(head, nn.Linear):
        excluded.add(id(head.weight))
    hidden_matrices, embeddings, vectors, seen = [], [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2:
            vectors.append(p)
        elif id(p) in excluded:
            embeddings.append(p)
        else:
            hidden_matrices.append(p)
    groups = [{"params": hidden_matrices, "weight_decay": weight_decay, "use_muon": True},
              {"params": embeddings, "weight_decay": weight_decay, "use_muon": False},
              {"params": vectors, "weight_decay": 0.0, "use_muon": False}]
    return [g for g in groups if g["params"]]


def build_optimizer(name: str, params_or_groups, lr: float, weight_decay: float, betas, eps: float, **opts):
    """optim.name -> optimiser. Groups may carry use_muon / weight_decay; other opts go to the class."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r} is not one of: {', '.join(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    valid = _ADAMW_OPTIONS if name == "adamw" else tuple(CONFIG_FIELDS[name])
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for optimizer {name!r}; "
                         f"valid: {', '.join(valid) or '(none)'}")
    return cls(params_or_groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **opts)
