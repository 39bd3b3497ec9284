"""Shared test code: small harnesses that several test files run the same way.

    needs_data                      skip mark: the offline data folder is not here
    triton_kernels_or_skip()          the Triton preamble: interpreter without a GPU, skip without triton
    prepare_shakespeare(root, ...)    a prepared byte-level dataset of tiny-shakespeare documents
                                      (the shared `corpus` fixture of tests/conftest.py is one)
    save_tiny_checkpoint(path)        an untrained 1-layer byte Transformer checkpoint for the eval CLIs
    RiggedByteModel(text)             a stateless byte "model" that always continues `text`
    assert_streaming_matches(...)     segments with the state carried == one call
    assert_cached_generation_matches  greedy generation with the state == re-running the prefix
    train_recall_accuracy(...)        train a tiny model on an associative-recall task, return its accuracy

Test files import it as `from helpers import ...` (tests/ is on sys.path, as for conftest).
"""
import contextlib
import copy
import os

import pytest
import torch

from conftest import SHARED_DATA

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "austen")),
                                  reason=f"offline data not at {SHARED_DATA}")


@contextlib.contextmanager
def fp32_matmul_precision(setting):
    """torch.set_float32_matmul_precision(setting) inside the block, the old one after it
    ("high": the fp32 products of the Triton kernels are tf32, as in bf16 training)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def triton_kernels_or_skip():
    """Call at the top of a Triton test module, before importing kernels.triton_*: without a
    GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1 must be set before triton
    is first imported; tests/conftest.py does it, so does this), and the whole module is
    skipped when triton is not installed. Returns the skip mark `needs_kernels` for the case
    where triton was imported before TRITON_INTERPRET was set (no GPU and no interpreter)."""
    if not CUDA:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from kernels import triton_delta
    interpreted = type(triton_delta._delta_prep_kernel).__name__ == "InterpretedFunction"
    return pytest.mark.skipif(not CUDA and not interpreted,
                              reason="no GPU, and triton was imported before TRITON_INTERPRET=1 was set")


def prepare_shakespeare(root, n_chars: int, n_docs: int) -> str:
    """The first n_chars of tiny-shakespeare split at blank lines into at most n_docs documents
    under `root` (a pathlib folder), prepared byte-level (10 % val) -> the prepared folder."""
    from data.prepare import prepare
    with open(os.path.join(SHARED_DATA, "shakespeare", "tinyshakespeare.txt")) as f:
        text = f.read()[:n_chars]
    for i, doc in enumerate(text.split("\n\n")[:n_docs]):
        (root / f"doc{i:04d}.txt").write_text(doc)
    out = str(root / "prepared")
    prepare(f"files:{root}/*.txt", out, tokenizer="bytes", val_fraction=0.1, num_workers=1, quiet=True)
    return out


def save_tiny_checkpoint(out_dir) -> str:
    """An untrained byte-level Transformer (d 32, 1 layer, context 256), seed 0, saved as a
    training out_dir (out_dir/checkpoints/step 0) -> str(out_dir)."""
    from checkpoint import save_checkpoint
    from config import Config, DataConfig, ModelConfig, TrainConfig
    from model import build_model
    cfg = Config(model=ModelConfig(arch="transformer", vocab_size=257, d_model=32, n_layer=1, n_head=2),
                 data=DataConfig(tokenizer="bytes"), train=TrainConfig(seq_len=256))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    save_checkpoint(os.path.join(str(out_dir), "checkpoints"), 0, model, torch.optim.AdamW(model.parameters()),
                    {"step": 0}, cfg)
    return str(out_dir)


class RiggedByteModel(torch.nn.Module):
    """A stateless byte-level 'model' that continues `text` whatever came before: after a byte
    of `text` it puts logit 10 on the byte that follows it there (0 elsewhere, 257 classes)."""

    def __init__(self, text: str):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))
        self.next_byte = {ord(a): ord(b) for a, b in zip(text, text[1:])}

    def forward(self, idx, targets=None, state=None):
        logits = torch.zeros(*idx.shape, 257)
        for b in range(idx.shape[0]):
            for t in range(idx.shape[1]):
                nxt = self.next_byte.get(int(idx[b, t]))
                if nxt is not None:
                    logits[b, t, nxt] = 10.0
        return logits, None, {"pos": (state or {"pos": 0})["pos"] + idx.shape[1]}


def assert_streaming_matches(model, idx, bounds, tol: float):
    """The logits of idx[:, lo:hi] for (lo, hi) in `bounds`, with the state carried from one
    segment to the next, equal one call on the whole of idx (rtol = atol = tol)."""
    with torch.no_grad():
        full = model(idx)[0]
        state, parts = None, []
        for lo, hi in bounds:
            logits, _, state = model(idx[:, lo:hi], state=state)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=tol, atol=tol)


def assert_cached_generation_matches(model, prompt, n_new: int):
    """model.generate (greedy, the state carried token by token) == greedy decoding that
    re-runs the full prefix for every new token."""
    out = model.generate(prompt, n_new, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(n_new):
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def train_recall_accuracy(model, recall_batch, steps: int, batch_size: int, eval_size: int, seed: int = 0) -> float:
    """Train `model` for `steps` AdamW steps (lr 3e-3, no weight decay, gradient clipping 1.0,
    as train.py) on recall_batch(batch_size, generator seeded `seed`) -> (idx, labels with -1
    where nothing is asked); then the argmax accuracy on the asked positions of
    recall_batch(eval_size, generator seeded 1)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(*recall_batch(batch_size, gen))[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    idx, labels = recall_batch(eval_size, torch.Generator().manual_seed(1))
    with torch.no_grad():
        pred = model(idx)[0].argmax(-1)
    asked = labels >= 0
    return (pred[asked] == labels[asked]).float().mean().item()


# A 2-rank gloo job can abort in its teardown after all its work is done (PLATFORM.md: ~2 of
# 60 FSDP2 runs, even after dist.barrier() and destroy_process_group()).
GLOO_EXIT_ABORT = "terminate called without an active exception"


def assert_torchrun_finished(result, success_lines):
    """A torchrun job (subprocess.run result) did its work: each success line in its stdout,
    and exit status 0, or the gloo abort at exit above, which comes after the work."""
    log = result.stdout[-3000:] + result.stderr[-3000:]
    missing = [line for line in success_lines if line not in result.stdout]
    assert not missing, f"missing {missing}: {log}"
    assert result.returncode == 0 or GLOO_EXIT_ABORT in result.stderr, log


def fused_vs_oracle_errors(fused, inputs, segments, run_segments, outputs_of, param_names, device) -> dict:
    """Relative errors (max |diff| / max(1, max |ref|)) of every output and of the gradient of
    every input and meta-learned initial weight, for the loss sum <out, random cotangent>:
    the memory `fused` (fp32, fused kernels) against its float64 copy on the torch path (the
    oracle). run_segments(memory, inputs, segments, dtype) -> (leaves, y, state) and
    outputs_of(y, state) -> {name: tensor} come from the calling test file."""
    oracle = copy.deepcopy(fused).double()
    oracle.backend = "torch"
    ref_leaves, ref_y, ref_state = run_segments(oracle, inputs, segments, torch.float64)
    tri_leaves, tri_y, tri_state = run_segments(fused, inputs, segments, torch.float32)
    ref_out, tri_out = outputs_of(ref_y, ref_state), outputs_of(tri_y, tri_state)
    assert tri_state["pos"] == ref_state["pos"] == sum(segments)
    gen = torch.Generator().manual_seed(2)
    cot = {n: torch.randn(r.shape, generator=gen, dtype=torch.float64).to(device) for n, r in ref_out.items()}
    ref_grads = torch.autograd.grad(sum((r * cot[n]).sum() for n, r in ref_out.items()),
                                    list(ref_leaves.values()) + list(oracle.init_weights))
    tri_grads = torch.autograd.grad(sum((t.double() * cot[n]).sum() for n, t in tri_out.items()),
                                    list(tri_leaves.values()) + list(fused.init_weights))
    err = lambda x, ref: ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()  # noqa: E731
    errors = {n: err(tri_out[n], ref_out[n]) for n in ref_out}
    names = list(ref_leaves) + list(param_names)
    errors.update({"d" + n: err(t, r) for n, t, r in zip(names, tri_grads, ref_grads)})
    return errors


# ----------------------------------------------------------------------------------------
# the memories' token-by-token oracle (tests/test_memory.py, tests/test_hope.py)

def apply_memory(weights, x, act):
    """M(x) for per-sequence weights [B, H, out, in] and x [B, H, d] (DESIGN §3.3): W x for
    one layer, x + W_out s(W_in x) for [W_in, W_out]."""
    if len(weights) == 1:
        return torch.einsum("bhoi,bhi->bho", weights[0], x)
    hidden = act(torch.einsum("bhoi,bhi->bho", weights[0], x))
    return x + torch.einsum("bhoi,bhi->bho", weights[1], hidden)


def oracle_write(weights, start, key, target, lr, alpha, rule, act, max_grad_norm=None,
                 beta=None, momenta=None):
    """One token's write from the definition: the gradient of ||M(k) - v||^2 by autograd at
    the chunk-start weights `start` with the target held fixed (rescaled to Frobenius norm
    <= max_grad_norm over all layers), then per layer, with a its input at `start`:
      momentum  Z = beta Z - lr g,  W = alpha W + Z                    (Titans Eq. 13-14)
      dgd       W = W (alpha I - eta' a a^T) - eta' g a^T, eta' = lr / (1 + lr ||a||^2)  (NL Eq. 57/88)
      gd        W = alpha W - lr g a^T
    lr, alpha, beta [B, H]. Returns (new weights, new momenta or None)."""
    at = [w.clone() for w in start]            # a differentiable copy: d/d(at) holds v fixed
    loss = (apply_memory(at, key, act) - target).pow(2).sum()
    grads = torch.autograd.grad(loss, at, create_graph=True)
    if max_grad_norm is not None:
        norm = sum(g.pow(2).sum((-2, -1)) for g in grads).sqrt()[..., None, None]
        grads = [g * max_grad_norm / norm.clamp(min=max_grad_norm) for g in grads]
    layer_inputs = [key] if len(start) == 1 else [key, act(torch.einsum("bhoi,bhi->bho", start[0], key))]
    lr, alpha = lr[..., None, None], alpha[..., None, None]
    new, new_momenta = [], [] if rule == "momentum" else None
    for i, (w, grad, a) in enumerate(zip(weights, grads, layer_inputs)):
        if rule == "momentum":
            new_momenta.append(beta[..., None, None] * momenta[i] - lr * grad)
            new.append(alpha * w + new_momenta[i])
        elif rule == "dgd":
            eta = lr / (1 + lr * a.pow(2).sum(-1)[..., None, None])
            wa = torch.einsum("bhoi,bhi->bho", w, a)
            new.append(alpha * w - eta * wa[..., None] * a[..., None, :] - eta * grad)
        else:
            new.append(alpha * w - lr * grad)
    return new, new_momenta


def stored_transposed(t, dims=(1, 2)):
    """Same values stored with `dims` swapped: a dense view with permuted strides, as the
    einsums in memory.py leave `hidden` for the per-chunk scans (the kernels' fake
    implementations must give the real ops' contiguous outputs for it)."""
    return t.transpose(*dims).contiguous().transpose(*dims)
