"""The one input check of the scan primitives (DESIGN §3.2 shapes), shared by the dispatcher
(kernels/__init__.py) and the Triton entry points (triton_scans.py, triton_memory.py,
triton_mlp_memory.py), so every path rejects the same bad input with the same one-line
ValueError naming it; check_tensors (dtype, device) also serves triton_hope.py and
triton_cms.py. Imports no Triton: the CPU path uses it too."""
import math
import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # the Triton kernels' inputs
MAX_KEY_DIM = 128      # the Triton kernels hold a state's whole key dimension in one tile
MAX_BUDGET_CHUNK = 128  # the step budget's kernel holds a chunk's [C, C] key overlaps (64 KiB fp32)


# Set by bench/precompile.compiling_offline while it compiles the kernels for a GPU on a CPU
# machine: every launch there compiles and runs nothing, so the entries take CPU tensors.
COMPILING_OFFLINE = False


def interpreting():
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1, see PLATFORM.md)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cpu_tensors_allowed():
    """Whether the Triton entries take CPU tensors: under the interpreter, or while
    bench/precompile.py compiles offline (COMPILING_OFFLINE)."""
    return interpreting() or COMPILING_OFFLINE


def compute_dtype(*tensors):
    """The scans' compute dtype: the widest dtype among the tensors given (None skipped), at
    least float32 (bf16 / fp16 are upcast, float64 stays float64, also in only one input)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def triton_blocker(model_cfg, device):
    """None unless model_cfg.kernels is "triton" and the Triton kernels cannot run on
    `device` (not CUDA, and CPU tensors not allowed); then why not (train.py and bench/step.py
    refuse the run; a checkpoint loaded for evaluation takes "auto" instead:
    checkpoint.load_model)."""
    if model_cfg.kernels != "triton" or torch.device(device).type == "cuda" or cpu_tensors_allowed():
        return None
    return (f"model.kernels=triton needs a CUDA device (or TRITON_INTERPRET=1, Triton's CPU "
            f"interpreter); this run is on {torch.device(device).type}: use model.kernels=auto")


def check_constant(name: str, value, positive: bool = False, optional: bool = False):
    """A kernel option passed as a Python number (a constant of the launch: a tensor's gradient
    would be dropped without a word): a one-line ValueError unless it is a finite int or float,
    > 0 where `positive`, or None where `optional`."""
    if optional and value is None:
        return
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (positive and value <= 0)):
        raise ValueError(f"{name} must be {'None or ' if optional else ''}a finite number"
                         f"{' > 0' if positive else ''} (a constant, not a tensor); got {value!r}")


def _shape(t):
    return list(t.shape)


def check_tensors(named, like, dtypes=None, kernels=None):
    """Every value of `named` (name -> tensor) is a tensor of one of `dtypes` (None: any
    floating dtype) on the device of named[like]; with `kernels` (their name in messages),
    that device is CUDA or cpu_tensors_allowed(). One-line ValueError naming the first bad one."""
    device = named[like].device if isinstance(named[like], torch.Tensor) else None
    names = [str(d).replace("torch.", "") for d in dtypes or ()]
    allowed = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if dtypes is None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {t.dtype}")
        if dtypes is not None and t.dtype not in dtypes:
            raise ValueError(f"{name} must be {allowed} for {kernels}; got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} must be on {like}'s device {device}; got {t.device}")
    if kernels is not None and device.type != "cuda" and not cpu_tensors_allowed():
        raise ValueError(f"{kernels} need CUDA tensors (or TRITON_INTERPRET=1 set before "
                         f"importing triton); got device {device}")


def check_scan_inputs(q, k, u, gates, states, chunk_size, *, u_name="u", dims=("K", "V"),
                      kernels=None, max_chunk=None, states_optional=True):
    """Raise a one-line ValueError naming the first bad argument and what it should be.

    q, k [B,T,H,K]; u [B,T,H,V]; gates: dict name -> [B,T,H]; states: dict name ->
    [B,H,V,K] (None allowed while states_optional); chunk_size an integer >= 1.
    u_name, dims: how the messages call u and (K, V); one name for both, ("d", "d") for the
    memory layers' square weights, also requires V == K.
    kernels: the Triton kernels' name in messages; given, the inputs must also suit them:
    SUPPORTED_DTYPES (else any floating dtype), CUDA or the interpreter, K <= MAX_KEY_DIM,
    and chunk_size <= max_chunk(K) where max_chunk is given."""
    key, value = dims
    named = {"q": q, "k": k, u_name: u, **gates,
             **{n: s for n, s in states.items() if s is not None or not states_optional}}
    check_tensors(named, "q", SUPPORTED_DTYPES if kernels else None, kernels)
    if q.dim() != 4:
        raise ValueError(f"q must be [B,T,H,{key}]; got {_shape(q)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must be [B,T,H,{key}] = q's shape {_shape(q)}; got {_shape(k)}")
    square = key == value
    if u.dim() != 4 or u.shape[:3] != q.shape[:3] or (square and u.shape[3] != K):
        matching = f"B,T,H,{key}" if square else "B,T,H"
        raise ValueError(f"{u_name} must be [B,T,H,{value}] with {matching} matching q "
                         f"{_shape(q)}; got {_shape(u)}")
    V = u.shape[3]
    for name, g in gates.items():
        if g.shape != (B, T, H):
            raise ValueError(f"{name} must be [B,T,H] = {[B, T, H]}; got {_shape(g)}")
    for name, s in states.items():
        if s is not None and s.shape != (B, H, V, K):
            raise ValueError(f"{name} must be [B,H,{value},{key}] = {[B, H, V, K]}; "
                             f"got {_shape(s)}")
    if kernels is not None and K > MAX_KEY_DIM:
        raise ValueError(f"key head dim {key}={K} exceeds {MAX_KEY_DIM}, the most {kernels} "
                         f"hold in one tile")
    top = None if max_chunk is None else max_chunk(K)
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
            or (top is not None and chunk_size > top)):
        allowed = ("an integer >= 1" if top is None else
                   f"an integer in [1, {top}] for {kernels} at key head dim {K}")
        raise ValueError(f"chunk_size must be {allowed}; got {chunk_size!r}")


def check_saved_chunks(chunk_states, caller):
    """The backward needs the chunk-start states that the forward saves only under grad
    tracking (else an empty placeholder): a one-line RuntimeError naming `caller` if absent."""
    if chunk_states.dim() != 4:
        raise RuntimeError(f"{caller}: backward through a forward run without grad tracking "
                           f"(no chunk-start states were saved)")
