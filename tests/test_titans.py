"""Titans (titans.py, DESIGN §3.4/§3.6): streaming state, causality, the variants'
dependency structure, configs and parameter counts, and an associative-recall sanity test."""
import glob
import os

import pytest
import torch

from config import ConfigError, load_config
from helpers import assert_cached_generation_matches, assert_streaming_matches, train_recall_accuracy
from model import build_model

VARIANTS = ["lmm", "mac", "mag", "mal"]
V = 61
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(variant, n_layer=2, **titans):
    # chunk 4, segments 8, window 6: the test lengths cross every kind of boundary
    t = {"variant": variant, "chunk_size": 4, "segment_size": 8, "window_size": 6, "n_persistent": 2}
    t.update(titans)
    torch.manual_seed(0)
    return build_model({"arch": "titans", "vocab_size": V, "n_layer": n_layer, "n_head": 2,
                        "d_model": 32, "titans": t}).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_loss_and_every_parameter_gets_gradient(variant):
    m = tiny(variant).train()
    idx = torch.randint(0, V, (2, 13))
    logits, loss, state = m(idx, targets=idx)
    assert logits.shape == (2, 13, V) and state["pos"] == 13 and torch.isfinite(loss)
    loss.backward()
    silent = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not silent, f"parameters without gradient: {silent}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_streaming_segments_equal_one_call(variant):
    """Segments of 5, 1, 11, 6 tokens (not multiples of chunk 4 / segment 8) == one call."""
    assert_streaming_matches(tiny(variant), torch.randint(0, V, (2, 23)), [(0, 5), (5, 6), (6, 17), (17, 23)], 1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_token_by_token_generation_equals_full_forward(variant):
    """Greedy generation with the carried state == greedy decoding re-running the prefix."""
    assert_cached_generation_matches(tiny(variant), torch.randint(0, V, (2, 7)), 11)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
    """Changing token t leaves the logits before t unchanged and changes later ones."""
    m = tiny(variant)
    idx = torch.randint(0, V, (1, 20))
    t = 9
    other = idx.clone()
    other[0, t] = (idx[0, t] + 1) % V
    with torch.no_grad():
        a, b = m(idx)[0], m(other)[0]
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4


def influence(m, idx, source):
    """Max change of the logits at every position when token `source` changes."""
    other = idx.clone()
    other[0, source] = (idx[0, source] + 1) % V
    with torch.no_grad():
        return (m(idx)[0] - m(other)[0]).abs().amax(dim=(0, 2))


@pytest.mark.parametrize("variant", VARIANTS)
def test_memory_is_the_only_long_range_path(variant):
    """With the inner lr fixed at 0, no forgetting and no conv the memory never changes, so a token
    influences only its attention span (window / segment); with learning it reaches far."""
    idx = torch.randint(0, V, (1, 24))
    frozen = influence(tiny(variant, n_layer=1, inner_lr_fixed=0.0, weight_decay=False, conv_size=0), idx, 2)
    learning = influence(tiny(variant, n_layer=1, conv_size=0), idx, 2)
    reach = {"lmm": 1, "mac": 6, "mag": 6, "mal": 6}[variant]   # itself / segment [0, 8) / window 6
    assert frozen[2 + reach:].max() < 1e-6
    assert learning[16:].min() > 1e-6


def test_mac_attention_is_segment_local():
    """MAC: tokens of the next segment see the current one only through the memory; the
    readout tokens h use the segment-start weights, so a change inside a segment reaches
    the rest of that segment through attention and later segments through the memory."""
    idx = torch.randint(0, V, (1, 24))
    m = tiny("mac", n_layer=1, inner_lr_fixed=0.0, weight_decay=False, conv_size=0)
    frozen = influence(m, idx, 9)                                  # segment [8, 16)
    assert frozen[9:16].max() > 1e-4 and frozen[16:].max() < 1e-6


def test_titans_flops_and_memory_flops():
    lmm, mag, mac = tiny("lmm"), tiny("mag"), tiny("mac")
    transformer = build_model({"arch": "transformer", "vocab_size": V, "n_layer": 2, "n_head": 2, "d_model": 32})
    assert transformer.memory_flops_per_token(64) == 0
    assert lmm.memory_flops_per_token(64) > 0
    n = lmm.num_params(non_embedding=True) + V * 32
    assert lmm.flops_per_token(64) == 6 * n                       # no attention
    # windowed attention: per layer 12 * D * (window + N_p), independent of seq_len past the window
    n = mag.num_params(non_embedding=True) + V * 32
    assert mag.flops_per_token(64) == 6 * n + 2 * 12 * 32 * (6 + 2)
    assert mac.flops_per_token(64) == 6 * (mac.num_params(non_embedding=True) + V * 32) + 2 * 12 * 32 * (16 + 2)


def test_gate_switches():
    """momentum=False gives beta = 0, weight_decay=False gives alpha = 1, inner_lr_fixed a constant lr."""
    m = tiny("lmm", momentum=False, weight_decay=False, inner_lr_fixed=0.25)
    x = torch.randn(2, 5, 32)
    lr, alpha, beta = m.blocks[0].mixer.memory.gates(x)
    assert torch.all(lr == 0.25) and torch.all(alpha == 1) and torch.all(beta == 0)
    lr, alpha, beta = tiny("lmm", theta_max=0.5).blocks[0].mixer.memory.gates(x)
    assert lr.max() < 0.5 and 0 < alpha.min() and alpha.max() < 1 and 0 < beta.min()


def test_bad_titans_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="model.titans.chunk_size must be >= 1"):
        tiny("lmm", chunk_size=0)
    with pytest.raises(ValueError, match="memory_depth"):
        tiny("lmm", memory_depth=3)
    with pytest.raises(ValueError, match="theta_max"):
        tiny("mag", theta_max=0.0)
    with pytest.raises(ConfigError, match="variant"):
        load_config(None, ["--model.arch=titans", "--model.titans.variant=xyz"])


# ----------------------------------------------------------------------------------------
# configs

def test_titans_configs_parse_and_tiny_ones_build():
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "titans_*.yaml")))
    names = {os.path.basename(p) for p in paths}
    for v in VARIANTS:
        assert {f"titans_{v}_tiny.yaml", f"titans_{v}_340m.yaml", f"titans_{v}_760m.yaml"} <= names
    for path in paths:
        cfg = load_config(path)
        assert cfg.model.arch == "titans" and os.path.basename(path).startswith(f"titans_{cfg.model.titans.variant}_")
        if path.endswith("_tiny.yaml"):
            cfg.model.vocab_size = 50257
            build_model(cfg.model)


# Paper-scale parameter counts (within 5 % of the name) are checked for every config in
# tests/test_paper_configs.py.


# ----------------------------------------------------------------------------------------
# associative recall: the memory must learn in context

N_KEYS, N_VALUES, N_PAIRS = 16, 8, 6


def recall_batch(batch_size, gen):
    """k1 v1 ... k6 v6 q1 a1 ... q6 a6 (keys distinct, each q_i one of the keys): predict
    a_i, the value stored with q_i, after q_i. Chance is 1/8."""
    keys = torch.stack([torch.randperm(N_KEYS, generator=gen)[:N_PAIRS] for _ in range(batch_size)])
    values = N_KEYS + torch.randint(0, N_VALUES, (batch_size, N_PAIRS), generator=gen)
    which = torch.randint(0, N_PAIRS, (batch_size, N_PAIRS), generator=gen)
    context = torch.stack([keys, values], 2).flatten(1)
    queries = torch.stack([keys.gather(1, which), values.gather(1, which)], 2).flatten(1)
    idx = torch.cat([context, queries], 1)
    targets = torch.full_like(idx, -1)
    targets[:, 2 * N_PAIRS::2] = values.gather(1, which)             # the answer follows its key
    return idx[:, :-1], targets[:, :-1]


def train_recall(inner_lr_fixed, steps=200):
    """One linear-memory LMM layer (d = 64, one head, chunk 8), AdamW 3e-3 with gradient
    clipping 1.0 (as train.py), 64 sequences per step; returns the answer accuracy."""
    torch.manual_seed(0)
    m = build_model({"arch": "titans", "vocab_size": N_KEYS + N_VALUES, "n_layer": 1, "n_head": 1,
                     "d_model": 64, "titans": {"variant": "lmm", "memory_depth": 1, "chunk_size": 8,
                                               "inner_lr_fixed": inner_lr_fixed}})
    return train_recall_accuracy(m, recall_batch, steps, batch_size=64, eval_size=256)


def test_associative_recall_needs_the_inner_learning_rate():
    """The tiny LMM learns in context to recall values of keys seen up to 22 tokens
    earlier (~95 % after 200 steps); with theta fixed at 0 (memory frozen at its meta
    init) only pairs inside the conv window are recallable (~25 %; chance 12.5 %)."""
    learned, frozen = train_recall(None), train_recall(0.0)
    assert frozen < 0.4, frozen
    assert learned > 0.6 and learned > frozen + 0.3, (learned, frozen)
