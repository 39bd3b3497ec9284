"""The two scan primitives every memory update reduces to (DESIGN §3.2), with dispatch.

    delta_rule     S_t = S_{t-1} (alpha_t I - eta_t k_t k_t^T) + u_t k_t^T ; o_t = S_t q_t
    momentum_rule  Z_t = beta_t Z_{t-1} + u_t k_t^T ; S_t = alpha_t S_{t-1} + Z_t ; o_t = S_t q_t

shapes: q, k [B,T,H,K]; u [B,T,H,V]; alpha, eta, beta [B,T,H]; S, Z [B,H,V,K]; o [B,T,H,V].

Names: here (and in every kernel file) eta is the erase strength of the delta rule, NL's
eta' = lr / (1 + lr ||k||^2) of DGD (0 for plain GD; memory.py computes it), not the inner learning
rate, which hope.py and titans.py call eta / theta and memory.py `lr`; u is the write
(lr-scaled target) that memory.py hands over.

Backends (fla's triad, DESIGN §4):
    "reference"  kernels/reference.py, sequential over tokens (the oracle)
    "torch"      kernels/chunked.py, chunked PyTorch (the CPU path)
    "triton"     kernels/triton_scans.py, fused Triton kernels (the CUDA path)
    "auto"       triton when the inputs are on CUDA, none float64, K <= checks.MAX_KEY_DIM
                 and Triton imports; else torch (select_backend)
"""
import importlib

import torch

from . import chunked
from .checks import MAX_KEY_DIM, SUPPORTED_DTYPES, check_scan_inputs
from .reference import delta_rule_reference, momentum_rule_reference

BACKENDS = ("auto", "reference", "torch", "triton")

__all__ = ["delta_rule", "momentum_rule", "delta_rule_reference", "momentum_rule_reference",
           "select_backend", "BACKENDS"]


def _triton_scans():
    """Import the Triton kernels lazily, so the CPU path never imports triton."""
    return importlib.import_module(".triton_scans", __name__)


def _triton_scans_or_error():
    try:
        return _triton_scans()
    except ImportError as e:
        raise ImportError(f"backend='triton' needs kernels.triton_scans and triton: {e}") from e


def select_backend(backend, device, dtype=torch.float32, key_dim=None):
    """Resolve `backend` ("auto" included) to the concrete backend used for `device`.
    `dtype`: the inputs' dtype, or a sequence of every input's dtype (None entries skipped).
    "auto" takes the chunked PyTorch path where the Triton kernels do not apply: off CUDA,
    any input outside checks.SUPPORTED_DTYPES (float64: they are fp32/bf16/fp16) and key
    dims above checks.MAX_KEY_DIM."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend != "auto":
        return backend
    dtypes = [dtype] if isinstance(dtype, torch.dtype) else [d for d in dtype if d is not None]
    if torch.device(device).type != "cuda" or any(d not in SUPPORTED_DTYPES for d in dtypes):
        return "torch"
    if key_dim is not None and key_dim > MAX_KEY_DIM:
        return "torch"
    try:
        _triton_scans()
    except ImportError:
        return "torch"
    return "triton"


def _dtypes(*tensors):
    """Every given tensor's dtype (None for an absent one): what select_backend weighs."""
    return [None if t is None else t.dtype for t in tensors]


def delta_rule(q, k, u, alpha, eta, initial_state=None, chunk_size=64, backend="auto", output=True):
    """Gated delta rule / DGD step (NL Eq. 57/88). Returns (o [B,T,H,V], S_T [B,H,V,K]).
    `chunk_size` changes speed, never the result (beyond float rounding). output=False: o is
    None, and the chunked PyTorch path skips the readout (HOPE's projection memories keep
    only their states); the other backends compute it and drop it."""
    check_scan_inputs(q, k, u, {"alpha": alpha, "eta": eta}, {"initial_state": initial_state},
                      chunk_size)
    backend = select_backend(backend, q.device, _dtypes(q, k, u, alpha, eta, initial_state),
                             q.shape[-1])
    if backend == "torch":
        return chunked.delta_rule_chunked(q, k, u, alpha, eta, initial_state, chunk_size, output)
    if backend == "reference":
        o, S = delta_rule_reference(q, k, u, alpha, eta, initial_state)
    else:
        o, S = _triton_scans_or_error().delta_rule_triton(q, k, u, alpha, eta, initial_state, chunk_size)
    return (o if output else None), S


def momentum_rule(q, k, u, alpha, beta, initial_state=None, initial_momentum=None,
                  chunk_size=64, backend="auto", output=True):
    """GD with momentum (Titans Eq. 13-14). Returns (o [B,T,H,V], S_T, Z_T [B,H,V,K]).
    `chunk_size` changes speed, never the result (beyond float rounding). output=False: o is
    None (as for delta_rule)."""
    check_scan_inputs(q, k, u, {"alpha": alpha, "beta": beta},
                      {"initial_state": initial_state, "initial_momentum": initial_momentum},
                      chunk_size)
    backend = select_backend(backend, q.device, _dtypes(q, k, u, alpha, beta, initial_state,
                                                        initial_momentum), q.shape[-1])
    if backend == "torch":
        return chunked.momentum_rule_chunked(q, k, u, alpha, beta, initial_state,
                                             initial_momentum, chunk_size, output)
    if backend == "reference":
        o, S, Z = momentum_rule_reference(q, k, u, alpha, beta, initial_state, initial_momentum)
    else:
        o, S, Z = _triton_scans_or_error().momentum_rule_triton(q, k, u, alpha, beta, initial_state,
                                                                initial_momentum, chunk_size)
    return (o if output else None), S, Z
