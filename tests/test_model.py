import copy
import math

import pytest
import torch

from helpers import assert_cached_generation_matches, assert_streaming_matches
from model import build_model, state_tensors

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
    opt_in = ("per-chunk path (the fused MLP memory kernel runs only with model.kernels=triton until a GPU has "
              "timed it in a model)")
    hope = tiny("hope")
    assert hope.kernel_report("cpu") == [f"HOPE M_mem x2: {on_cpu}", f"HOPE stage 1 (projection memories) x2: {on_cpu}",
                                         "CMS fast level (chunk 16) x2: per-chunk path (the fused CMS kernel "
                                         "runs only with model.kernels=triton until a GPU has timed it in a model)"]
    assert hope.kernel_report("cuda")[:2] == [f"HOPE M_mem x2: {opt_in}", f"HOPE stage 1 (projection memories) x2: {opt_in}"]
    fused = tiny("hope", kernels="triton").kernel_report("cuda")
    assert all(line.endswith(": fused Triton kernel") for line in fused) and len(fused) == 3
    # Titans' memory runs the momentum rule (beta = 0 without momentum), fused on CUDA
    linear = tiny("titans", kernels="triton", titans={"memory_depth": 1, "max_grad_norm": None})
    assert linear.kernel_report("cuda") == ["Titans memory x2: fused Triton kernel"]
    # head dim 128 with hidden 256: wider than the fused MLP kernel holds
    wide = tiny("titans", kernels="triton", n_head=1, d_model=128, titans={"memory_expansion": 2})
    assert wide.kernel_report("cuda") == [
        "Titans memory x2: per-chunk path (the fused MLP memory kernel does not cover d=128, hidden 256, "
        "chunk 16, rule momentum (triton_mlp_memory.fusable_mlp); its layers of key dim 256 (above 128) "
        "scan in PyTorch)"]
    # under "auto" on the CPU the scans are PyTorch's anyway: nothing to add
    assert tiny("titans", n_head=1, d_model=128, titans={"memory_expansion": 2}).kernel_report("cpu") == [
        "Titans memory x2: per-chunk path (backend 'auto' on cpu runs the chunked PyTorch path)"]
    assert not wide.blocks[0].mixer.memory.memory._use_fused_kernel(torch.zeros(1, 1, 1, 128, device="meta"))
    clipped = tiny("titans", kernels="triton", titans={"memory_depth": 1})        # clips by default
    assert clipped.kernel_report("cuda") == [
        "Titans memory x2: per-chunk path (the fused linear kernel does not clip (max_grad_norm))"]
    assert tiny("hope", kernels="triton", hope={"adaptive_q": True}).kernel_report("cuda")[1].startswith(
        "HOPE stage 1 (projection memories) x2: per-chunk path (the fused stage 1 takes the projections")
    # the step budget's loop (memory.chunk_step_budget): a kernel up to 128-token chunks
    budgeted = {"memory_depth": 1, "max_grad_norm": None, "step_budget": 0.5}
    assert tiny("titans", kernels="triton", titans=budgeted).kernel_report("cuda") == [
        "Titans memory x2: fused Triton kernel", "Titans step budget x2: fused Triton kernel"]
    assert tiny("titans", kernels="triton", titans={**budgeted, "chunk_size": 256}).kernel_report("cuda")[1] == (
        "Titans step budget x2: per-chunk path (the step-budget kernel holds chunks of at most 128 tokens, not 256)")
    assert tiny("titans", titans=budgeted).kernel_report("cpu")[1] == (
        "Titans step budget x2: per-chunk path (backend 'auto' on cpu runs the PyTorch loop)")
    assert tiny("transformer").kernel_report("cuda") == []


def test_flash_attention_without_flash_attn_is_refused_at_build():
    """model.attention=flash where flash-attn is not installed: a one-line ValueError when the
    model is built (train.py prints it), not a RuntimeError at the first forward."""
    import model as model_mod
    if model_mod.flash_attn_func is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ValueError, match="model.attention=flash needs the flash-attn package"):
        tiny("transformer", attention="flash")


# ----------------------------------------------------------------------------------------
# the Transformer++ against its equations; init, generation, counts

def _rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _rotate(x, positions, theta):
    """RoPE on [T, H, D] from its definition: the pair (x_i, x_{i+D/2}) is the complex number
    x_i + i x_{i+D/2}, multiplied by exp(i p theta^(-2i/D)) at position p."""
    D = x.shape[-1]
    freq = theta ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2 / D)
    z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.polar(
        torch.ones(len(positions), D // 2, dtype=torch.float64), positions[:, None].double() * freq)[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def _transformer_by_equation(m, idx):
    """model.py's docstring stack in float64, one sequence at a time, with explicit softmax:
    x = E[idx]; per block x += W_o Attn(RoPE(q), RoPE(k), v) of RMSNorm(x) (causal, scale
    1/sqrt(d_head)), x += W_down (SiLU(W_gate h) * W_up h) of h = RMSNorm(x); logits =
    RMSNorm(x) E^T (tied head)."""
    cfg = m.config
    H, D = cfg.n_head, cfg.d_model // cfg.n_head
    out = []
    for seq in idx:
        T = len(seq)
        pos = torch.arange(T)
        x = m.embed.weight[seq]
        for block in m.blocks:
            h = _rms_norm(x, block.mixer_norm.weight, cfg.norm_eps)
            q, k, v = (h @ w.T for w in block.mixer.wqkv.weight.chunk(3, dim=0))
            q, k, v = q.view(T, H, D), k.view(T, H, D), v.view(T, H, D)
            q, k = _rotate(q, pos, cfg.rope_theta), _rotate(k, pos, cfg.rope_theta)
            scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
            scores = scores.masked_fill(pos[None, :, None] < pos[None, None, :], float("-inf"))
            y = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, H * D)
            x = x + y @ block.mixer.wo.weight.T
            h = _rms_norm(x, block.ffn_norm.weight, cfg.norm_eps)
            ffn = block.ffn
            gate, up = h @ ffn.w_gate.weight.T, h @ ffn.w_up.weight.T
            x = x + (gate * torch.sigmoid(gate) * up) @ ffn.w_down.weight.T
        out.append(_rms_norm(x, m.norm.weight, cfg.norm_eps) @ m.embed.weight.T)
    return torch.stack(out)


def test_transformer_matches_a_float64_reference_of_the_equations():
    """The whole Transformer++ forward (float64, O(1) weights so that attention is far from
    uniform and every nonlinearity matters, norm gains random, eps large enough to see)
    equals the equations written out above. Kills: RMSNorm eps outside the sqrt, RoPE's
    inverse frequencies or rotation sign, SwiGLU's gate/up swapped, a missing pre-norm,
    the final norm skipped, the attention mask/scale."""
    m = tiny("transformer", norm_eps=0.05, rope_theta=50.0).double()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5, generator=g)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
    idx = torch.randint(0, 61, (2, 10), generator=g)
    with torch.no_grad():
        logits = m(idx)[0]
        expected = _transformer_by_equation(m, idx)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)


def test_rms_norm_and_rope_by_hand():
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g with eps inside the square root (a large
    eps makes its placement visible), computed in float32 for half-precision inputs; RoPE tables cos/sin(p theta^(-2i/D)) and the rotation
    of the pairs (x_i, x_{i+D/2}) by hand for D = 4, theta = 100 (frequencies 1 and 0.1)."""
    from model import RMSNorm, apply_rope, rope_cos_sin
    norm = RMSNorm(2, eps=0.5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, -1.0]))
    x = torch.tensor([[3.0, 4.0]])                         # mean(x^2) = 12.5, + eps = 13
    torch.testing.assert_close(norm(x), torch.tensor([[6.0, -4.0]]) / 13 ** 0.5)
    # half precision is normalised in float32: 300^2 overflows float16 (max 65504)
    half = RMSNorm(2, eps=1e-6).half()
    torch.testing.assert_close(half(torch.tensor([[300.0, 400.0]], dtype=torch.float16)),
                               torch.tensor([[0.6, 0.8]], dtype=torch.float16) * 2 ** 0.5)
    positions = torch.tensor([0, 1, 5])
    cos, sin = rope_cos_sin(positions, 4, 100.0, "cpu")
    angles = torch.tensor([[0.0, 0.0], [1.0, 0.1], [5.0, 0.5]])
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())
    v = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 3, 1, 4)     # pairs (1, 3) and (2, 4)
    out = apply_rope(v, cos, sin)[0, :, 0]
    c, s = angles.cos(), angles.sin()
    expected = torch.stack([1 * c[:, 0] - 3 * s[:, 0], 2 * c[:, 1] - 4 * s[:, 1],
                            1 * s[:, 0] + 3 * c[:, 0], 2 * s[:, 1] + 4 * c[:, 1]], dim=-1)
    torch.testing.assert_close(out, expected)


def test_rope_rotates_by_the_distance_alone_at_ten_million_tokens():
    """RoPE's score between a query at p and a key at p - 3 depends on the distance only, also
    at the positions a streamed 10M-token BABILong input reaches: float32 angles rotated the
    pair 0.4 rad wrong there (head dim 64, theta 10^4, its fastest frequencies)."""
    from model import apply_rope, rope_cos_sin
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)

    def score(p):
        cos, sin = rope_cos_sin(torch.tensor([p, p - 3]), 64, 10_000.0, "cpu")
        return (apply_rope(q, cos[:1], sin[:1]) * apply_rope(k, cos[1:], sin[1:])).sum().item()
    near = score(3)
    for p in (1_000_003, 9_999_997):
        assert score(p) == pytest.approx(near, abs=1e-4), p


def test_init_std_and_residual_projection_scaling():
    """GPT-2 init (model.py, DESIGN): every Linear and the embedding N(0, init_std), the
    residual output projections (attention W_o, SwiGLU W_down) N(0, init_std / sqrt(2 L)),
    norm gains 1. Empirical std over >= 4096 entries is within 5 % (sampling error ~1 %)."""
    m = tiny("transformer", d_model=64, n_head=2, n_layer=3, init_std=0.05)
    residual = 0.05 / (2 * 3) ** 0.5
    for block in m.blocks:
        for w, std in ((block.mixer.wqkv.weight, 0.05), (block.ffn.w_gate.weight, 0.05),
                       (block.ffn.w_up.weight, 0.05), (block.mixer.wo.weight, residual),
                       (block.ffn.w_down.weight, residual)):
            assert abs(w.std().item() / std - 1) < 0.05, (tuple(w.shape), w.std().item(), std)
            assert abs(w.mean().item()) < 0.1 * std
        assert torch.equal(block.mixer_norm.weight, torch.ones(64))
    assert abs(m.embed.weight.std().item() / 0.05 - 1) < 0.05


def test_sampling_uses_temperature_and_top_k(monkeypatch):
    """generate() with temperature > 0 samples from softmax(logits / temperature) restricted
    to the top_k logits (renormalised). A spy on torch.multinomial records each distribution
    and takes its most likely token; each is checked against the last logits of a full
    forward over the tokens so far (temperature 0.5 and top_k 5; top_k 1 is greedy; a top_k
    above the vocabulary size keeps every token)."""
    m = tiny("transformer")
    with torch.no_grad():                       # spread the logits so that temperature matters
        m.embed.weight.mul_(20)
    seen = []

    def spy(probs, num_samples, generator=None):
        seen.append(probs.clone())
        return probs.argmax(-1, keepdim=True)

    monkeypatch.setattr(torch, "multinomial", spy)
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(1))
    out = m.generate(prompt, 3, temperature=0.5, top_k=5)
    assert len(seen) == 3
    for i, probs in enumerate(seen):
        logits = m(out[:, :5 + i])[0][:, -1].double() / 0.5
        kth = logits.topk(5, dim=-1).values[:, -1:]
        expected = torch.where(logits >= kth, logits, torch.tensor(float("-inf"))).softmax(-1)
        assert ((probs > 0).sum(-1) == 5).all()
        torch.testing.assert_close(probs.double(), expected, rtol=1e-4, atol=1e-6)
    seen.clear()
    greedy = m.generate(prompt, 3, temperature=0)
    assert torch.equal(m.generate(prompt, 3, temperature=0.7, top_k=1), greedy)
    assert all(((p > 0).sum(-1) == 1).all() for p in seen)
    seen.clear()                                # top_k above the vocabulary: no restriction
    m.generate(prompt, 1, temperature=1.0, top_k=1000)
    torch.testing.assert_close(seen[0].double(), m(prompt)[0][:, -1].double().softmax(-1), rtol=1e-4, atol=1e-6)


def test_generate_samples_only_the_tokenizers_ids():
    """A padded embedding (model.vocab_size above the tokenizer's, e.g. 50304 for GPT-2) has
    ids no tokenizer decodes: sample.py and train.py's end-of-run sample failed with a
    KeyError once one was drawn. generate(vocab_size=n) and greedy_generate draw below n."""
    from eval.common import greedy_generate
    m = tiny("transformer")                     # vocabulary 61; the ids from 40 on the most likely by far
    m.head.forward = lambda x: torch.cat([torch.zeros(*x.shape[:-1], 40), torch.full((*x.shape[:-1], 21), 30.0)], -1)
    logits = m(torch.zeros(1, 1, dtype=torch.long))[0]
    assert int(m.generate(torch.zeros(1, 1, dtype=torch.long), 1, temperature=0)[0, -1]) >= 40   # unlimited
    prompt = torch.zeros(4, 3, dtype=torch.long)
    for temperature in (0, 1.0):
        out = m.generate(prompt, 20, temperature=temperature, vocab_size=40,
                         generator=torch.Generator().manual_seed(0))
        assert int(out[:, 3:].max()) < 40

    class Tok:
        vocab_size, eot_id = 40, 39

        @staticmethod
        def decode(ids):
            assert max(ids, default=0) < 40
            return "".join(chr(65 + i % 26) for i in ids)
    assert greedy_generate(m, Tok(), logits[0, -1], None, 5, "cpu") == "AAAAA"


def test_loss_ignores_targets_of_minus_one():
    """forward's loss is the mean cross entropy over the targets that are not -1 (padding)."""
    m = tiny("transformer")
    idx = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(2))
    targets = idx.roll(-1, dims=1)
    targets[0, -3:] = -1
    targets[1, 0] = -1
    logits, loss, _ = m(idx, targets=targets)
    keep = targets != -1
    nll = -logits.log_softmax(-1)[keep].gather(-1, targets[keep][:, None])
    torch.testing.assert_close(loss, nll.mean())


def test_ffn_hidden_rounds_up_to_the_multiple():
    """SwiGLU hidden = ffn_mult * d_model rounded *up* to ffn_multiple_of: Llama-7B's 11008
    for d 4096, 8/3, 256; the default d 128 -> 341.3 -> 352; the built layers use it."""
    from config import ModelConfig
    from model import ffn_hidden
    assert ffn_hidden(ModelConfig(d_model=4096, ffn_mult=8 / 3, ffn_multiple_of=256)) == 11008
    assert ffn_hidden(ModelConfig(d_model=128)) == 352
    assert ffn_hidden(ModelConfig(d_model=64, ffn_mult=2.0, ffn_multiple_of=32)) == 128   # exact: no round-up
    assert tiny("transformer").blocks[0].ffn.w_up.weight.shape == (96, 32)               # 85.3 -> 96


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_is_the_palm_formula(tie):
    """PaLM appendix B: 6 N + 12 L d T, N = non-embedding parameters plus the LM head, counted
    here from the architecture: per layer 4 d^2 (qkv, o) + 3 d h (SwiGLU) + 2 d (norms), the
    final norm d and the head V d. Tied or not, the head counts once and the input embedding not."""
    V, d, L, T = 61, 32, 2, 64
    m = tiny("transformer", tie_embeddings=tie)
    h = m.blocks[0].ffn.w_up.weight.shape[0]
    n = L * (4 * d * d + 3 * d * h + 2 * d) + d + V * d
    assert m.flops_per_token(T) == 6 * n + 12 * L * d * T


@pytest.mark.parametrize("arch", ["transformer", "hope"])
def test_generate_continues_from_a_passed_state(arch):
    """generate(suffix, n, state=state after prefix) continues the sequence the state holds:
    its new tokens are those of generate(prefix + suffix, n). Kills: generate ignoring the
    `state` argument (the prompt read as a fresh sequence), and a decode loop that re-runs
    only the tokens of this call without the state."""
    # init_std 0.5: an untrained model whose greedy tokens depend on the context, not only
    # on the last token (at 0.02 the Transformer++ repeats one token whatever came before)
    m = tiny(arch, init_std=0.5, hope={"chunk_other": 3, "chunk_mem": 5},
             cms={"chunk_sizes": [4, None], "inner_lr": 0.01})
    idx = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(3))
    prefix, suffix = idx[:, :7], idx[:, 7:]
    with torch.no_grad():
        _, _, state = m(prefix)
    full = m.generate(idx, 6, temperature=0)
    cont = m.generate(suffix, 6, temperature=0, state=state)
    assert torch.equal(cont, full[:, 7:])
    assert not torch.equal(m.generate(suffix, 6, temperature=0)[:, 4:], full[:, 11:])   # the state matters


def test_generate_top_k_zero_samples_from_every_token_and_a_negative_one_is_refused():
    """top_k 0 means the whole vocabulary, as sample.py's --top-k 0 (it was an IndexError);
    a negative or non-integer top_k is a one-line ValueError (it was a RuntimeError)."""
    m = tiny("transformer")
    idx = torch.randint(0, 61, (1, 3))
    runs = [m.generate(idx, 4, top_k=k, generator=torch.Generator().manual_seed(0)) for k in (0, None)]
    assert torch.equal(*runs)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="top_k must be None or an integer >= 0"):
            m.generate(idx, 2, top_k=bad)


def test_generate_refuses_a_vocab_size_below_one():
    """vocab_size 0 left no id to draw (a RuntimeError in argmax or multinomial); a negative one
    sliced logits[:, :-n] and silently never drew the last n ids."""
    m = tiny("transformer")
    idx = torch.randint(0, 61, (1, 3))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"^vocab_size must be None or an integer >= 1; got {bad!r}$"):
            m.generate(idx, 2, temperature=0, vocab_size=bad)
        with pytest.raises(ValueError, match="vocab_size must be None"):
            m.generate_from(m(idx)[0][:, -1], m(idx)[2], 2, vocab_size=bad)


@pytest.mark.parametrize("arch", ["transformer", "titans", "hope", "hope_attention"])
def test_empty_input_and_a_state_of_another_batch_are_one_line_errors(arch):
    """Every architecture answers the same: T = 0 tokens (a reshape RuntimeError in most, a
    HOPE ValueError, logits of length 0 for MAC) and a state made for another batch size (a
    raw torch.cat size error in some) are one-line ValueErrors."""
    m = tiny(arch)
    _, _, state = m(torch.randint(0, 61, (2, 5)))
    with pytest.raises(ValueError, match=r"T >= 1 tokens; got shape \[2, 0\]"):
        m(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="the state holds 2 sequences, but idx has batch size 1"):
        m(torch.randint(0, 61, (1, 3)), state=state)


@pytest.mark.parametrize("arch", ["transformer", "titans", "hope", "hope_attention"])
def test_a_state_of_another_precision_is_a_one_line_error(arch):
    """An fp32 model's state fed to its float64 copy (or back) was "expected scalar type Float
    but found Double" deep in Titans and HOPE, and silently promoted elsewhere. A bf16 model
    and autocast keep fp32 fast weights beside bf16 caches: those states still stream."""
    import copy
    m = tiny(arch)
    idx = torch.randint(0, 61, (2, 8))
    state = m(idx[:, :5])[2]
    wide = copy.deepcopy(m).double()
    with pytest.raises(ValueError, match=r"^the state holds torch.float32 tensors, but this model's states are "
                                         r"torch.float64: cast the state's tensors"):
        wide(idx[:, 5:], state=state)
    with pytest.raises(ValueError, match="the state holds torch.float64 tensors, but this model's states are "
                                         "torch.float32"):
        m(idx[:, 5:], state=wide(idx[:, :5])[2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(idx[:, 5:], state=m(idx[:, :5])[2])
    m.to(torch.bfloat16)
    m(idx[:, 5:], state=m(idx[:, :5])[2])


@pytest.mark.parametrize("arch", ["transformer", "hope"])
def test_a_training_forward_without_state_frees_each_blocks_state(arch):
    """forward(return_state=False) gives the same logits, loss and gradients, bitwise, and no
    state. Under activation checkpointing (distributed.apply_activation_checkpointing) the
    returned states were the only references left to each layer's KV cache, whose v pinned
    the fused q/k/v projection, and CMS fast weights: held until the forward returned. Kills:
    a block still handing its state back (block 0's state tensors alive at the final norm)."""
    import gc
    import weakref
    import distributed
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    runs = []
    for return_state in (True, False):
        m = tiny(arch, cms={"chunk_sizes": [4, None]})
        distributed.apply_activation_checkpointing(m)
        made, alive = [], []    # block 0's parts' end states; which of them live on past the blocks
        for part in (m.blocks[0].mixer, m.blocks[0].ffn):
            part.register_forward_hook(lambda mod, inp, out: made.extend(map(weakref.ref, state_tensors(out[1]))))

        def check_alive(mod, inp, out, made=made, alive=alive):
            gc.collect()
            alive.extend(r() is not None for r in made)
        m.norm.register_forward_hook(check_alive)
        logits, loss, state = m(idx, targets=idx, return_state=return_state)
        assert made and alive == [return_state] * len(made)
        assert (state is not None) == return_state
        loss.backward()
        runs.append((logits, loss, [p.grad for p in m.parameters()]))
    (l1, loss1, g1), (l2, loss2, g2) = runs
    assert torch.equal(l1, l2) and torch.equal(loss1, loss2) and all(map(torch.equal, g1, g2))


def test_a_state_of_another_depth_is_a_one_line_error():
    """A state made by a model with another number of layers: the blocks were zipped with its
    layers, so a deeper model silently skipped the blocks past them (logits from 2 of 3 blocks)."""
    idx = torch.randint(0, 61, (2, 5))
    state = tiny("transformer")(idx)[2]
    with pytest.raises(ValueError, match="^the state holds 2 layers, but this model has 3$"):
        tiny("transformer", n_layer=3)(idx, state=state)


@pytest.mark.parametrize("arch, variant", [("titans", "lmm"), ("titans", "mag"), ("titans", "mal"), ("hope", None)])
def test_a_state_holds_only_what_later_calls_read(arch, variant):
    """Every tensor of the state owns its storage: conv buffers hold the last w - 1 inputs and
    sliding-window KV caches the last window - 1 keys. As views they kept the call's whole
    inputs, keys and values (v: the fused q/k/v projection) alive between calls, in every layer:
    a streamed eval held O(segment) per layer, not O(window) (here 200 tokens, window 8: MAG's
    state held 7x its size). The Transformer's full cache (every key is read later) and MAC's
    segment cache (reset every segment) are not checked."""
    cfg = {"vocab_size": 61, "n_layer": 1, "n_head": 2, "d_model": 32, "arch": arch,
           "titans": {"variant": variant or "lmm", "window_size": 8}}
    torch.manual_seed(0)
    with torch.no_grad():
        state = build_model(cfg)(torch.randint(0, 61, (1, 200)))[2]
    for t in state_tensors(state):
        assert t.untyped_storage().nbytes() <= t.numel() * t.element_size(), tuple(t.shape)


@pytest.mark.parametrize("arch, variant", [("transformer", None), ("titans", "lmm"), ("titans", "mac"),
                                           ("titans", "mag"), ("titans", "mal"), ("hope", None),
                                           ("hope_attention", None)])
def test_a_forward_leaves_the_state_it_was_passed_unchanged(arch, variant):
    """sample.py reads the prompt once and starts every sample from its state
    (LanguageModel.generate_from): that holds only if no forward writes into the state it is
    passed (a KV cache or fast weight updated in place would leak one sample into the next).
    Chunk-sized steps and single tokens, as training streams and generation feed them."""
    cfg = {"vocab_size": 61, "n_layer": 2, "n_head": 2, "d_model": 16, "arch": arch}
    if variant:
        cfg["titans"] = {"variant": variant}
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    idx = torch.randint(0, 61, (2, 40))
    with torch.no_grad():
        state = m(idx[:, :21])[2]
        before = [t.clone() for t in state_tensors(state)]
        for step in (idx[:, 21:22], idx[:, 21:]):
            first = m(step, state=state)[0]
            assert all(torch.equal(a, b) for a, b in zip(before, state_tensors(state), strict=True))
            assert torch.equal(m(step, state=state)[0], first)          # the same state, the same answer
    out = m.generate_from(m(idx[:, :21])[0][:, -1], state, 5, temperature=0)
    assert torch.equal(out, m.generate(idx[:, :21], 5, temperature=0)[:, 21:])


@pytest.mark.parametrize("arch, variant", [("transformer", None), ("titans", "lmm"), ("titans", "mac"),
                                           ("titans", "mag"), ("titans", "mal"), ("hope", None),
                                           ("hope_attention", None)])
@pytest.mark.slow
def test_every_block_compiles_as_one_graph(arch, variant):
    """train.compile compiles each block: a graph break inside it splits the block and can send
    the memory's chunk loop back to eager (a hand-called autocast __enter__ in memory.py broke
    every Titans and HOPE block into 10-24 graphs; divmod on a symbolic length dropped whole
    functions). torch._dynamo.explain traces without compiling."""
    import torch._dynamo as dynamo
    cfg = {"vocab_size": 61, "n_layer": 1, "n_head": 2, "d_model": 16, "arch": arch}
    if variant:
        cfg["titans"] = {"variant": variant}
    m = build_model(cfg)
    x = m.embed(torch.randint(0, 61, (2, 40))).detach()
    dynamo.reset()
    explained = dynamo.explain(m.blocks[0].forward)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
        [r.reason.splitlines()[0] for r in explained.break_reasons]


def test_compiled_blocks_stream_uncompiled(monkeypatch):
    """distributed.apply_compile: training forwards (grad enabled) run the compiled block,
    streaming ones (sampling, evals: no grad) the block itself, whose chunk boundaries move
    with every position (51 recompiles for a 16-token sample before)."""
    import distributed
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn: lambda *a, **k: calls.append("compiled") or fn(*a, **k))
    m = tiny("hope")
    distributed.apply_compile(m)
    idx = torch.randint(0, 61, (1, 6))
    m(idx, targets=idx)
    assert calls == ["compiled"] * len(m.blocks)
    with torch.no_grad():
        m.generate(idx, 3)
    assert calls == ["compiled"] * len(m.blocks)


def test_chunk_split_traces_a_symbolic_length():
    """kernels.chunked._split_into_chunks under torch.compile's dynamic shapes: divmod on a
    symbolic T made dynamo drop the whole function to eager."""
    import torch._dynamo as dynamo
    from kernels.chunked import _split_into_chunks
    x = torch.randn(2, 2, 37, 4)
    dynamo.reset()
    dynamo.mark_dynamic(x, 2)
    assert dynamo.explain(_split_into_chunks)(x, 8).graph_count == 1
