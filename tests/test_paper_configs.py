"""Paper-scale configs (configs/*_{340m,400m,760m,1.3b}.yaml): they build, their size matches
their name, and they carry the papers' training recipe (Titans §5.1, which NL §9.3 defers to).

Parameter-count convention (docs/REPRODUCE.md): all parameters, the tied embedding counted
once (an untied head counted too), of the model with the papers' 32K vocabulary (Llama-2
tokenizer). The papers size their models with that vocabulary; ours trains with the GPT-2
vocabulary (50,257), which adds (50257 - 32000) x d_model parameters that belong to the
tokenizer, not to the architecture. Each model is built on the meta device with the vocabulary
of its own tokenizer (the model train.py builds) and the count is moved to 32K exactly.
"""
import glob
import os
import re

import pytest
import torch

from config import load_config
from data.tokenizer import get_tokenizer
from model import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_VOCAB = 32000                      # Llama-2 tokenizer (Titans §5.1, NL §9.3)
SIZE = {"340m": 340e6, "400m": 400e6, "760m": 760e6, "1.3b": 1.3e9}
TOKENS = {"340m": 15e9, "400m": 15e9, "760m": 30e9, "1.3b": 100e9}   # Titans §5.1, NL §9.3
BATCH_TOKENS = 524_288                   # "0.5M tokens": 128 sequences of 4096
NAME = re.compile(r"^(?P<model>.+)_(?P<size>340m|400m|760m|1\.3b)\.yaml$")

PAPER_CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml"))
                       if NAME.match(os.path.basename(p)))


def _size_of(path):
    return NAME.match(os.path.basename(path)).group("size")


def paper_vocab_count(cfg) -> tuple[int, int]:
    """(parameters with the tokenizer's vocabulary, the same model's count with 32K)."""
    vocab = get_tokenizer(cfg.data.tokenizer).vocab_size
    model_cfg = cfg.model
    model_cfg.vocab_size = model_cfg.vocab_size or vocab        # what train.py does
    with torch.device("meta"):
        model = build_model(model_cfg)
    n = sum(p.numel() for p in model.parameters())            # parameters() counts a tied weight once
    vocab_tables = 1 if model_cfg.tie_embeddings else 2
    return n, n - (model_cfg.vocab_size - PAPER_VOCAB) * model_cfg.d_model * vocab_tables


def test_every_table_architecture_has_paper_scale_configs():
    names = {os.path.basename(p) for p in PAPER_CONFIGS}
    needed = {f"{arch}_{size}.yaml" for arch in ("transformer", "titans_lmm", "hope")
              for size in ("340m", "760m", "1.3b")}
    needed |= {f"titans_{v}_{size}.yaml" for v in ("mac", "mag", "mal") for size in ("340m", "760m")}
    needed |= {"hope_attention_760m.yaml"}
    assert needed <= names, f"missing: {sorted(needed - names)}"


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=os.path.basename)
def test_parameter_count_matches_the_name(path):
    cfg = load_config(path)
    n_trained, n_paper = paper_vocab_count(cfg)
    target = SIZE[_size_of(path)]
    assert abs(n_paper - target) / target <= 0.05, (
        f"{os.path.basename(path)}: {n_paper / 1e6:.1f}M parameters with the 32K vocabulary "
        f"({n_trained / 1e6:.1f}M as trained), not within 5% of {target / 1e6:.0f}M")


def test_count_convention_moves_only_the_embedding():
    """The 32K count equals a model really built with vocab_size=32000."""
    cfg = load_config(os.path.join(REPO, "configs", "transformer_340m.yaml"))
    _, n_paper = paper_vocab_count(cfg)
    cfg.model.vocab_size = PAPER_VOCAB
    with torch.device("meta"):
        direct = sum(p.numel() for p in build_model(cfg.model).parameters())
    assert n_paper == direct


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=os.path.basename)
def test_recipe_fields(path):
    cfg = load_config(path)
    t, o, d, m = cfg.train, cfg.optim, cfg.data, cfg.model
    name = os.path.basename(path)
    assert t.seq_len == 4096 and m.max_seq_len >= 4096, f"{name}: 4K context"
    assert t.batch_size * t.seq_len == BATCH_TOKENS, f"{name}: 0.5M-token batches"
    assert t.batch_size % t.grad_accum == 0
    assert t.lr == pytest.approx(4e-4) and o.name == "adamw" and o.schedule == "cosine", f"{name}: AdamW 4e-4 cosine"
    assert o.weight_decay == pytest.approx(0.1), f"{name}: weight decay 0.1"
    assert t.max_steps == round(TOKENS[_size_of(path)] / BATCH_TOKENS), f"{name}: training tokens"
    assert d.dataset.startswith("hf:HuggingFaceFW/fineweb-edu") and d.hf_streaming, f"{name}: FineWeb-Edu"
    assert d.sampling == "shuffled", f"{name}: one pass over the data (trained on N tokens), not with replacement"
    assert d.tokenizer == "gpt2"
    assert os.path.basename(t.out_dir.rstrip("/")) == name[:-len(".yaml")]


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=os.path.basename)
def test_vocab_is_the_tokenizers(path):
    """train.py refuses a model.vocab_size below the tokenizer's: 0 (take it from the
    tokenizer) is the only value that trains with GPT-2 and keeps the count honest."""
    cfg = load_config(path)
    vocab = get_tokenizer(cfg.data.tokenizer).vocab_size
    assert cfg.model.vocab_size in (0, vocab), (
        f"{os.path.basename(path)}: model.vocab_size={cfg.model.vocab_size} but the {cfg.data.tokenizer} "
        f"tokenizer has {vocab} (train.py stops on a smaller vocab)")
