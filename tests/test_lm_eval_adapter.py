"""eval.lm_eval_adapter: request handling through Instance-like objects (no lm-eval needed),
numbers equal to our own WikiText / LAMBADA evaluator, and lm-eval parity when installed."""
import importlib.util
import logging
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import SHARED_DATA
from data.tokenizer import ByteTokenizer
from eval import perplexity as ppl
from eval.lm_eval_adapter import INSTALL_HINT, LMAdapter
from helpers import save_tiny_checkpoint
from model import build_model

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model({"arch": "transformer", "n_layer": 2, "n_head": 2, "d_model": 32, "vocab_size": 257})
    return model.eval(), ByteTokenizer()


def instance(*args):
    return SimpleNamespace(args=args)


def test_loglikelihood_equals_our_lambada(tiny, tmp_path):
    model, tok = tiny
    texts = ["the cat sat on the mat", "a dog ran far away", "she sells sea shells"]
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join('{"text": "%s"}\n' % t for t in texts))
    ours = ppl.lambada(model, tok, str(path), max_len=16, batch_size=2)
    lm = LMAdapter(model, tok, max_len=16, batch_size=2)
    results = lm.loglikelihood([instance(*ppl.lambada_context_target(t)) for t in texts])
    mean_ll = sum(ll for ll, _ in results) / len(results)
    assert math.exp(-mean_ll) == pytest.approx(ours["perplexity"], rel=1e-6)
    assert sum(g for _, g in results) / len(results) == ours["accuracy"]


def test_loglikelihood_rolling_equals_our_wikitext(tiny):
    model, tok = tiny
    raw = os.path.join(SHARED_DATA, "wikitext", "wiki.test.raw")
    docs = ppl.load_wikitext_documents(raw)[:1]
    docs = [docs[0][:1500]]                              # a slice keeps the test fast
    lm = LMAdapter(model, tok, max_len=64, batch_size=8)
    total = sum(lm.loglikelihood_rolling([instance(ppl.wikitext_detokenizer(d)) for d in docs]))
    windows = ppl.rolling_windows(tok.encode(ppl.wikitext_detokenizer(docs[0])), tok.eot_id, 64)
    expected = math.fsum(ll for ll, _ in ppl.loglikelihood_tokens(model, windows, max_len=64))
    assert total == pytest.approx(expected, rel=1e-6)
    words = len(re.split(r"\s+", docs[0]))
    assert math.exp(-total / words) > 1


class FixedTextModel(nn.Module):
    """Rigged LM: after a prompt of prompt_len tokens it always predicts TEXT, byte by byte
    (the position read with the state tells it where it is)."""
    TEXT = b"Paris. And then more"

    def __init__(self, prompt_len):
        super().__init__()
        self.prompt_len = prompt_len
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx, targets=None, state=None):
        start = 0 if state is None else state["pos"]
        logits = torch.zeros(idx.shape[0], idx.shape[1], 257)
        for t in range(idx.shape[1]):
            k = start + t - self.prompt_len + 1        # index in TEXT of the token position t predicts
            logits[:, t, self.TEXT[min(k, len(self.TEXT) - 1)] if k >= 0 else 0] = 10.0
        return logits + self.dummy, None, {"pos": start + idx.shape[1]}


def test_generate_until_is_greedy_and_stops_at_the_first_stop_string():
    tok = ByteTokenizer()
    context = "Q: capital of France?\nA: "
    model = FixedTextModel(len(tok.encode(context)))
    lm = LMAdapter(model, tok, max_len=256)
    out = lm.generate_until([instance(context, {"until": ["."], "max_gen_toks": 10}),
                             instance(context, {"until": "\n", "max_gen_toks": 4})])
    assert out == ["Paris", "Pari"]
    with pytest.raises(ValueError, match="greedy"):
        lm.generate_until([instance(context, {"do_sample": True, "temperature": 1.0})])


def test_bad_arguments_are_errors(tiny):
    with pytest.raises(ValueError, match="max_len"):
        LMAdapter(tiny[0], tiny[1], max_len=0)


def test_from_checkpoint_loads_model_tokenizer_and_context(tmp_path):
    """eval.common.load_checkpoint's model, tokenizer and device, and its one-line errors for a
    missing path, a folder without a checkpoint and a bad device."""
    from checkpoint import load_model
    path = save_tiny_checkpoint(tmp_path / "run")
    lm = LMAdapter.from_checkpoint(path, device="cpu", batch_size=2)
    assert lm.max_length == 256 and lm.batch_size == 2 and lm.device == torch.device("cpu")
    assert isinstance(lm.tokenizer, ByteTokenizer) and lm.eot_token_id == 256 and not lm.model.training
    saved, _ = load_model(path)
    for (name, p), q in zip(lm.model.named_parameters(), saved.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(FileNotFoundError, match="checkpoint .* not found"):
        LMAdapter.from_checkpoint(str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="no checkpoint found at"):
        LMAdapter.from_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="argument --device: must be auto, cpu, cuda or cuda:N"):
        LMAdapter.from_checkpoint(path, device="tpu")


def test_from_checkpoint_of_an_unreadable_checkpoint_is_a_one_line_error(tmp_path, caplog):
    """checkpoint.load_model's ValueError, also for DCP's CheckpointException (a BaseException),
    and nothing else: DCP's own warnings with tracebacks (root logger) are silenced."""
    path = save_tiny_checkpoint(tmp_path / "run")
    os.remove(os.path.join(path, "checkpoints", "step_000000", ".metadata"))   # DCP's index: no weights
    caplog.clear()
    with pytest.raises(ValueError, match="is unreadable") as error:
        LMAdapter.from_checkpoint(path)
    assert "\n" not in str(error.value)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.skipif(HAS_LM_EVAL, reason="lm-eval is installed")
def test_our_lm_without_lm_eval_names_the_install_command():
    import eval.lm_eval_adapter as adapter
    with pytest.raises(ImportError, match="requirements-eval.txt"):
        adapter.OurLM
    assert "pip install" in INSTALL_HINT


class StandInLM:
    """What OurLM inherits from lm-eval 0.4.13's lm_eval.api.model.LM: an __init__ that sets
    _rank, _world_size, _device = None, and read-only properties over them."""

    def __init__(self):
        self._rank, self._world_size, self._device = 0, 1, None

    @property
    def device(self):
        return self._device

    @property
    def rank(self):
        return self._rank


def test_our_lm_builds_on_lm_evals_read_only_device(tiny, tmp_path, monkeypatch):
    """Audit: LMAdapter assigned self.device, which lm-eval's LM makes a read-only property, so
    OurLM(...) and OurLM.from_checkpoint(...) raised AttributeError with the pinned lm-eval
    (the parity test below needs lm-eval installed, which CI does not have)."""
    import sys
    import types
    import eval.lm_eval_adapter as adapter
    api = types.ModuleType("lm_eval.api")
    api.model = types.SimpleNamespace(LM=StandInLM)
    for name, module in {"lm_eval": types.ModuleType("lm_eval"), "lm_eval.api": api,
                         "lm_eval.api.model": api.model}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(adapter, "_OUR_LM", None)
    model, tok = tiny
    lm = adapter.OurLM(model, tok, max_len=64, device="cpu")
    assert isinstance(lm, StandInLM) and lm.device == torch.device("cpu") and lm.rank == 0
    assert adapter.OurLM(model, tok, max_len=64).device == next(model.parameters()).device


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval not installed (pip install -r requirements-eval.txt)")
def test_parity_with_lm_eval(tiny):
    """lm-eval's own rolling windows give the same tokens as ours, and OurLM is an lm-eval LM
    whose rolling log-likelihood gives our WikiText word perplexity."""
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from eval.lm_eval_adapter import OurLM
    model, tok = tiny
    tokens = tok.encode("Some text for rolling windows, long enough to need several of them.")
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix_token=tok.eot_id,
                                                                         max_seq_len=16, context_len=1)]
    assert [(list(c), list(t)) for c, t in theirs] == ppl.rolling_windows(tokens, tok.eot_id, 16)
    lm = OurLM(model, tok, max_len=64)
    assert isinstance(lm, LM)
    raw = os.path.join(SHARED_DATA, "wikitext", "wiki.test.raw")
    doc = ppl.load_wikitext_documents(raw)[0][:1500]
    total = lm.loglikelihood_rolling([instance(ppl.wikitext_detokenizer(doc))])[0]
    windows = ppl.rolling_windows(tok.encode(ppl.wikitext_detokenizer(doc)), tok.eot_id, 64)
    assert total == pytest.approx(math.fsum(ll for ll, _ in ppl.loglikelihood_tokens(model, windows, max_len=64)))


# -----------------------------------------------------------------------------
# rolling totals per request, what generate_until reads

class UniformLM(nn.Module):
    """Every position predicts the uniform distribution over 257 tokens: log p = -ln 257."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx, targets=None, state=None):
        return torch.zeros(*idx.shape, 257) + self.dummy, None, state


def test_loglikelihood_rolling_gives_each_request_its_own_total():
    """One total per request, in order, each the sum over its own windows: a uniform model
    gives -n ln 257 for a text of n bytes (windows of 8: several per text). Kills crediting
    every window to the first request."""
    lm = LMAdapter(UniformLM(), ByteTokenizer(), max_len=8, batch_size=3)
    texts = ["a" * 20, "bb", "c" * 13]
    totals = lm.loglikelihood_rolling([instance(t) for t in texts])
    assert totals == [pytest.approx(-len(t) * math.log(257), rel=1e-6) for t in texts]


class RecordingLM(nn.Module):
    """Records every input row; always predicts byte 'z'. With arch set, eval.common treats it
    as a recurrent (state-carrying) model."""

    def __init__(self, arch=None):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(arch=arch)
        self.rows = []

    def forward(self, idx, targets=None, state=None):
        self.rows += [row.tolist() for row in idx]
        logits = torch.zeros(*idx.shape, 257)
        logits[..., ord("z")] = 10.0
        return logits + self.dummy, None, {"pos": (state or {"pos": 0})["pos"] + idx.shape[1]}


def test_generate_until_reads_the_last_tokens_that_leave_room_for_the_answer():
    """An attention model reads the last max_len - max_gen_toks context tokens (room for the
    answer in its context); a recurrent model reads the whole context. Kills keeping the first
    tokens, keeping max_len tokens (no room), and truncating recurrent models too."""
    tok = ByteTokenizer()
    attention = RecordingLM()
    request = instance("abcdefghij", {"until": [], "max_gen_toks": 2})
    out = LMAdapter(attention, tok, max_len=6).generate_until([request])
    assert out == ["zz"] and attention.rows[0] == tok.encode("ghij")
    recurrent = RecordingLM(arch="titans")
    LMAdapter(recurrent, tok, max_len=6).generate_until([request])
    assert recurrent.rows[0] == tok.encode("abcdefghij")


def test_generate_until_an_empty_context_starts_from_end_of_text():
    """lm-eval may send an empty context (an unconditional generation): the model reads the
    end-of-text token, its prefix token. Kills reading nothing (an error)."""
    tok, model = ByteTokenizer(), RecordingLM()
    assert LMAdapter(model, tok, max_len=6).generate_until([instance("", {"until": [], "max_gen_toks": 2})]) == ["zz"]
    assert model.rows[0] == [tok.eot_id]


def test_generate_until_takes_a_single_stop_string_whole():
    """`until` may be one string: it is one stop sequence, not a list of its characters (no 'P'
    or 'x' alone stops this output). Kills list(until) on a string."""
    tok = ByteTokenizer()
    context = "Q: capital of France?\nA: "
    lm = LMAdapter(FixedTextModel(len(tok.encode(context))), tok, max_len=256)
    assert lm.generate_until([instance(context, {"until": "Px", "max_gen_toks": 10})]) == ["Paris. And"]


# -----------------------------------------------------------------------------
# lm-eval 0.4.13's conventions, checked without lm-eval installed

def test_scoring_requests_are_lm_evals_tokens(monkeypatch):
    """The token requests LMAdapter hands to loglikelihood_tokens are lm-eval's, written out
    (the scoring tests above compare LMAdapter with the functions it calls, and the parity
    test needs lm-eval). Expected lists: lm-eval 0.4.13's output for these inputs, from
    lm_eval.utils.get_rolling_token_windows(context_len=1) + make_disjoint_window and
    TemplateLM.loglikelihood (_encode_pair; prefix token for an empty context), ByteTokenizer
    ids, end-of-text 256."""
    import eval.lm_eval_adapter as adapter
    seen = []

    def record(model, requests, max_len, **kwargs):
        seen.append((list(requests), max_len))
        return [(0.0, True)] * len(requests)

    monkeypatch.setattr(adapter, "loglikelihood_tokens", record)
    lm = LMAdapter(UniformLM(), ByteTokenizer(), max_len=4)
    lm.loglikelihood_rolling([instance("abcdefghij"), instance("hi")])
    assert seen.pop() == ([([256], [97, 98, 99, 100]), ([100], [101, 102, 103, 104]),
                           ([102, 103, 104], [105, 106]),
                           ([256], [104, 105])], 4)
    lm.loglikelihood([instance("Q: a", " b"), instance("the cat  ", "sat"), instance("", "hi"),
                      instance("x \n", "y")])
    assert seen.pop() == ([([81, 58, 32, 97], [32, 98]),                    # no trailing space
                           ([116, 104, 101, 32, 99, 97, 116], [32, 32, 115, 97, 116]),  # both spaces move
                           ([256], [104, 105]),                             # empty context: end-of-text
                           ([120], [32, 10, 121])], 4)                      # " \n" moves too


def test_generate_until_skips_empty_stop_strings():
    """An empty stop string stops nothing (lm-eval 0.4.13's postprocess_generated_text skips
    it; its eos stop string is '' for a tokenizer that decodes end-of-text to nothing). Kills
    text.split('') (ValueError) and an early stop that '' in text makes always true."""
    tok = ByteTokenizer()
    context = "Q: capital of France?\nA: "
    lm = LMAdapter(FixedTextModel(len(tok.encode(context))), tok, max_len=256)
    out = lm.generate_until([instance(context, {"until": ["", "."], "max_gen_toks": 10}),
                             instance(context, {"until": "", "max_gen_toks": 6})])
    assert out == ["Paris", "Paris."]


def test_generate_until_reads_lm_evals_max_token_aliases():
    """lm-eval 0.4.13's normalize_gen_kwargs: the first of max_gen_toks > max_new_tokens >
    max_tokens > max_completion_tokens that is not None, else the adapter's max_gen_toks.
    Kills reading max_gen_toks only (the default 256 for the others)."""
    tok = ByteTokenizer()
    context = "Q: capital of France?\nA: "
    lm = LMAdapter(FixedTextModel(len(tok.encode(context))), tok, max_len=256, max_gen_toks=5)
    kwargs = [{"max_new_tokens": 4}, {"max_tokens": 3}, {"max_completion_tokens": 2},
              {"max_gen_toks": 1, "max_new_tokens": 4}, {"max_tokens": 3, "max_new_tokens": 4},
              {"max_gen_toks": None, "max_tokens": 3}, {}]
    out = lm.generate_until([instance(context, {"until": [], **kw}) for kw in kwargs])
    assert out == ["Pari", "Par", "Pa", "P", "Pari", "Par", "Paris"]


def test_generate_until_with_do_sample_false_decodes_greedily():
    """do_sample=False wins over a temperature > 0 (lm-eval 0.4.13 warns and decodes
    greedily); sampling, asked for by do_sample=True or by a temperature > 0 without
    do_sample, is still an error. Kills raising for every temperature > 0."""
    tok = ByteTokenizer()
    context = "Q: capital of France?\nA: "
    lm = LMAdapter(FixedTextModel(len(tok.encode(context))), tok, max_len=256)
    with pytest.warns(UserWarning, match="temperature"):
        out = lm.generate_until([instance(context, {"until": ["."], "max_gen_toks": 10, "do_sample": False,
                                                        "temperature": 0.7})])
    assert out == ["Paris"]
    for kwargs in ({"temperature": 0.5}, {"do_sample": True}):
        with pytest.raises(ValueError, match="greedy"):
            lm.generate_until([instance(context, kwargs)])


def test_generate_until_without_room_for_the_prompt_is_an_error():
    """An attention model whose context is <= max_gen_toks has no room for the prompt: a
    one-line error before any generation (lm-eval 0.4.13 asserts max_length - max_gen_toks >
    0), not a prompt cut to its last token. A recurrent model reads the whole prompt anyway.
    Kills prompt_room's floor of one token."""
    tok = ByteTokenizer()
    attention = RecordingLM()
    lm = LMAdapter(attention, tok, max_len=4)
    for n in (4, 5):
        requests = [instance("abc", {"until": [], "max_gen_toks": 1}), instance("abcdefghij", {"max_gen_toks": n})]
        with pytest.raises(ValueError, match=f"max_gen_toks {n} leaves no room .* context of 4 tokens") as error:
            lm.generate_until(requests)
        assert "\n" not in str(error.value) and attention.rows == []
    recurrent = RecordingLM(arch="titans")
    assert LMAdapter(recurrent, tok, max_len=4).generate_until([requests[1]]) == ["zzzzz"]
    assert recurrent.rows[0] == tok.encode("abcdefghij")


def test_generate_until_a_negative_or_non_numeric_length_is_a_one_line_error_naming_its_key():
    """A negative max_gen_toks widened an attention model's prompt to max_len - max_gen_toks
    tokens, past its context (max_len 4, -5: 9 tokens read), and 'abc' raised int()'s message
    without the key. Both are one-line errors before any work; 0 generates nothing."""
    tok = ByteTokenizer()
    attention = RecordingLM()
    lm = LMAdapter(attention, tok, max_len=4)
    for kwargs, message in (({"max_gen_toks": -5}, "max_gen_toks must be a whole number >= 0, got -5"),
                            ({"max_new_tokens": "abc"}, "max_new_tokens must be a whole number >= 0, got 'abc'")):
        with pytest.raises(ValueError, match=f"^generate_until: {message}$"):
            lm.generate_until([instance("abc", {"until": [], "max_gen_toks": 1}), instance("abcdefghij", kwargs)])
        assert attention.rows == []
    assert lm.generate_until([instance("abcdefghij", {"max_gen_toks": 0})]) == [""]
    assert attention.rows == [tok.encode("ghij")]
