import copy

import pytest
import torch

from helpers import assert_cached_generation_matches, assert_streaming_matches
from model import build_model

ARCHS = ["transformer", "hope", "hope_attention"]
# Streaming and cached generation of the memory archs run in their own files with chunk sizes
# that every segment cuts (tests/test_hope.py, tests/test_titans.py); here the Transformer++'s.


def tiny(arch, **kw):
    cfg = {"arch": arch, "vocab_size": 61, "n_layer": 2, "n_head": 2, "d_model": 32}
    cfg.update(kw)
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_loss(arch):
    m = tiny(arch)
    idx = torch.randint(0, 61, (2, 13))
    logits, loss, state = m(idx, targets=idx)
    assert logits.shape == (2, 13, 61) and loss.ndim == 0 and state["pos"] == 13
    assert m(idx)[1] is None


@pytest.mark.parametrize("arch", ARCHS)
def test_causality(arch):
    """Changing token t leaves the logits before t unchanged (and changes some after)."""
    m = tiny(arch)
    idx = torch.randint(0, 61, (1, 24))
    t = 11
    other = idx.clone()
    other[0, t] = (idx[0, t] + 1) % 61
    a, b = m(idx)[0], m(other)[0]
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-5)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["transformer"])
def test_streaming_segments_equal_one_call(arch):
    assert_streaming_matches(tiny(arch), torch.randint(0, 61, (2, 32)), [(0, 16), (16, 24), (24, 32)], 1e-4)


@pytest.mark.parametrize("arch", ["transformer"])
def test_cached_generation_equals_full_forward(arch):
    """Greedy generation with the carried state == greedy decoding by re-running the full prefix."""
    assert_cached_generation_matches(tiny(arch), torch.randint(0, 61, (2, 9)), 8)


def test_tied_embeddings_and_counts():
    m = tiny("transformer")
    assert m.head.weight is m.embed.weight
    n = m.num_params()
    assert n == sum(p.numel() for p in m.parameters())
    assert m.num_params(non_embedding=True) == n - 61 * 32
    assert m.flops_per_token(64) > 6 * m.num_params(non_embedding=True)
    untied = tiny("transformer", tie_embeddings=False)
    assert untied.num_params() == n + 61 * 32


def test_sliding_window_attention_matches_masked_full():
    """Window attention over a stream == full attention restricted to the last w keys."""
    from config import ModelConfig
    from model import Attention
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=10, d_model=32, n_head=2)
    attn = Attention(cfg, window=5)
    x = torch.randn(1, 17, 32)
    full, _ = attn(x)
    state, parts = None, []
    for lo in range(0, 17, 4):
        y, state = attn(x[:, lo:lo + 4], state, pos=lo)
        parts.append(y)
        assert state["k"].shape[1] <= 4                       # cache holds window - 1 keys
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    # the last output must not depend on a token more than `window` back
    x2 = x.clone()
    x2[:, 16 - 5] += 1.0
    assert torch.allclose(attn(x2)[0][:, -1], full[:, -1], atol=1e-6)


TITANS = {"chunk_size": 4, "segment_size": 8, "window_size": 6, "n_persistent": 2}
BF16_MODELS = {"transformer": ("transformer", {}),
               "hope_attention": ("hope_attention", {"cms": {"chunk_sizes": [4, None]}}),
               **{f"titans_{v}": ("titans", {"titans": {"variant": v, **TITANS}}) for v in ("lmm", "mac", "mag", "mal")}}


@pytest.mark.parametrize("name", list(BF16_MODELS))
def test_bf16_weights_train_without_autocast(name):
    """model.to(bfloat16) runs forward + backward with no autocast: the memories keep their fast
    weights in float32 inside (memory.py, cms.py) and cast at the mixer boundaries. The loss and
    every parameter's gradient are finite and close to the float32 model's (bf16 rounding).
    13 tokens cross chunk (4), segment (8) and window (6) boundaries, and not at a multiple."""
    arch, kw = BF16_MODELS[name]
    fp32 = tiny(arch, **kw).train()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    idx = torch.randint(0, 61, (2, 13))
    losses = []
    for model in (fp32, bf16):
        _, loss, _ = model(idx, targets=idx)
        loss.backward()
        losses.append(loss)
    assert losses[1].dtype == torch.float32 and torch.isfinite(losses[1])
    assert abs(losses[1].item() - losses[0].item()) < 1e-2
    for (param_name, p16), p32 in zip(bf16.named_parameters(), fp32.parameters()):
        assert p16.dtype == torch.bfloat16 and torch.isfinite(p16.grad).all(), param_name
        error = (p16.grad.float() - p32.grad).norm() / p32.grad.norm()
        assert error < 0.1, f"{param_name}: gradient off by {error:.3f} (relative)"


def test_memory_flops_count_every_block_and_its_cms():
    """LanguageModel.memory_flops_per_token sums each block's sequence mixer and CMS: for
    HOPE-attention (softmax attention + CMS levels C 16 and static, hidden 2 x 32) it is the
    fast level's local gradients (3 matmuls of 2 C D hidden per chunk) and update (2 FLOPs per
    weight entry per chunk), per token and x3 for the backward, in each of the 2 layers."""
    D, hidden, C = 32, 64, 16
    by_hand = 3 * (3 * 2 * C * D * hidden + 2 * 2 * hidden * D) // C
    attention = tiny("hope_attention")
    assert attention.memory_flops_per_token(64) == 2 * by_hand > 0
    assert tiny("hope_attention", cms={"chunk_sizes": [None, None]}).memory_flops_per_token(64) == 0
    assert tiny("hope_attention", hope={"cms": False}).memory_flops_per_token(64) == 0
    assert tiny("transformer").memory_flops_per_token(64) == 0
    hope = tiny("hope")
    assert hope.memory_flops_per_token(64) == sum(b.mixer.memory_flops_per_token(64) for b in hope.blocks) + 2 * by_hand


def test_kernel_report_names_each_memory_parts_path():
    """LanguageModel.kernel_report: one line per (part, path) with its layer count; the reason
    a part is not fused is the same function that routes scan() (fused_kernel_blocker)."""
    on_cpu = "per-chunk path (backend 'auto' on cpu runs the chunked PyTorch path)"
    opt_in = "per-chunk path (the fused MLP memory kernel runs only with model.kernels=triton until GPU-tested)"
    hope = tiny("hope")
    assert hope.kernel_report("cpu") == [f"HOPE M_mem x2: {on_cpu}", f"HOPE stage 1 (projection memories) x2: {on_cpu}",
                                         "CMS fast level (chunk 16) x2: per-chunk path (the fused CMS kernel "
                                         "runs only with model.kernels=triton until GPU-tested)"]
    assert hope.kernel_report("cuda")[:2] == [f"HOPE M_mem x2: {opt_in}", f"HOPE stage 1 (projection memories) x2: {opt_in}"]
    fused = tiny("hope", kernels="triton").kernel_report("cuda")
    assert all(line.endswith(": fused Triton kernel") for line in fused) and len(fused) == 3
    assert tiny("titans", kernels="triton", titans={"memory_depth": 1, "max_grad_norm": None}
                ).kernel_report("cuda") == ["Titans memory x2: fused Triton kernel"]
    # head dim 128 with hidden 256: wider than the fused MLP kernel holds
    wide = tiny("titans", kernels="triton", n_head=1, d_model=128, titans={"memory_expansion": 2})
    assert wide.kernel_report("cuda") == [
        "Titans memory x2: per-chunk path (the fused MLP memory kernel does not cover d=128, hidden 256, "
        "chunk 16, rule momentum (triton_mlp_memory.fusable_mlp))"]
    assert not wide.blocks[0].mixer.memory.memory._use_fused_kernel(torch.zeros(1, 1, 1, 128, device="meta"), ())
    clipped = tiny("titans", kernels="triton", titans={"memory_depth": 1})        # clips by default
    assert clipped.kernel_report("cuda") == [
        "Titans memory x2: per-chunk path (the fused linear kernel does not clip (max_grad_norm))"]
    assert tiny("hope", kernels="triton", hope={"adaptive_q": True}).kernel_report("cuda")[1].startswith(
        "HOPE stage 1 (projection memories) x2: per-chunk path (the fused stage 1 takes the projections")
    assert tiny("transformer").kernel_report("cuda") == []


def test_flash_attention_without_flash_attn_is_refused_at_build():
    """model.attention=flash where flash-attn is not installed: a one-line ValueError when the
    model is built (train.py prints it), not a RuntimeError at the first forward."""
    import model as model_mod
    if model_mod.flash_attn_func is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ValueError, match="model.attention=flash needs the flash-attn package"):
        tiny("transformer", attention="flash")
