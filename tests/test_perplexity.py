"""eval/perplexity.py against toy models whose probabilities are known in closed form."""

import json
import math
import os
import re
import sys
import types

import pytest
import torch
import torch.nn as nn

from data.tokenizer import get_tokenizer
from eval import perplexity as ppl

SHARED_DATA = "/work/shared/data"
WIKITEXT_RAW = os.path.join(SHARED_DATA, "wikitext", "wiki.test.raw")
LAMBADA_JSONL = os.path.join(SHARED_DATA, "lambada", "lambada_test.jsonl")
needs_wikitext = pytest.mark.skipif(not os.path.isfile(WIKITEXT_RAW), reason="offline WikiText copy not present")
needs_lambada = pytest.mark.skipif(not os.path.isfile(LAMBADA_JSONL), reason="offline LAMBADA copy not present")


# -----------------------------------------------------------------------------
# toy models (same interface as model.py: logits, loss, state = model(idx, targets, state))

class FixedDistributionLM(nn.Module):
    """Ignores its input: every position predicts the distribution `probs`."""

    def __init__(self, probs):
        super().__init__()
        self.log_probs = nn.Parameter(torch.as_tensor(probs, dtype=torch.float32).log(), requires_grad=False)

    def forward(self, idx, targets=None, state=None):
        return self.log_probs.expand(*idx.shape, -1), None, state


class BigramLM(nn.Module):
    """p(next | current) = table[current, next]."""

    def __init__(self, table):
        super().__init__()
        self.log_table = nn.Parameter(torch.as_tensor(table, dtype=torch.float32).log(), requires_grad=False)

    def forward(self, idx, targets=None, state=None):
        return self.log_table[idx], None, state


class DecayingPrefixLM(nn.Module):
    """Causal and sensitive to every token of its input and their order:
    logits_t = sum_{s<=t} 0.7^(t-s) E[idx_s] + P[t]. Records every row it reads."""

    def __init__(self, vocab_size, max_positions=64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=g), requires_grad=False)
        self.pos = nn.Parameter(torch.randn(max_positions, vocab_size, generator=g), requires_grad=False)
        self.rows_seen = []

    def forward(self, idx, targets=None, state=None):
        self.rows_seen += [row.tolist() for row in idx]
        T = idx.shape[1]
        t = torch.arange(T)
        decay = torch.where(t[:, None] >= t[None, :], 0.7 ** (t[:, None] - t[None, :]).float(), torch.zeros(()))
        return decay @ self.embed[idx] + self.pos[:T], None, state

    def next_token_log_probs(self, context):
        """log p(. | context) from one unbatched call: the oracle."""
        logits = self(torch.tensor([context]))[0]
        return logits[0, -1].log_softmax(-1)


@pytest.fixture(scope="module")
def byte_tok():
    return get_tokenizer("bytes")


# -----------------------------------------------------------------------------
# evaluate_split

class FakeDataset:
    def __init__(self, tokens, n_bytes):
        self.tokens = tokens
        self.meta = {"splits": {"val": {"tokens": len(tokens), "bytes": n_bytes, "documents": 1}}}


def fake_iter_eval_batches(dataset, split, batch_size, seq_len, max_batches=None):
    """The loader's contract: consecutive non-overlapping windows x = t[i:i+T], y = t[i+1:i+T+1]."""
    tokens = torch.tensor(dataset.tokens)
    n_windows = (len(tokens) - 1) // seq_len
    windows = [(tokens[i * seq_len:(i + 1) * seq_len], tokens[i * seq_len + 1:(i + 1) * seq_len + 1])
               for i in range(n_windows)]
    for n, start in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and n >= max_batches:
            return
        chunk = windows[start:start + batch_size]
        yield torch.stack([x for x, _ in chunk]), torch.stack([y for _, y in chunk])


@pytest.fixture
def fake_loader(monkeypatch):
    module = types.ModuleType("data.loader")
    module.iter_eval_batches = fake_iter_eval_batches
    monkeypatch.setitem(sys.modules, "data.loader", module)


def test_evaluate_split_matches_hand_computed_bigram_nll(fake_loader):
    table = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.05, 0.05, 0.1, 0.8]])
    tokens = [0, 3, 3, 2, 0, 1, 2, 0, 0, 3, 1, 1, 0, 2, 2, 3, 0, 1, 3, 3, 2]  # 21 tokens -> 5 windows of 4
    model = BigramLM(table)
    result = ppl.evaluate_split(model, FakeDataset(tokens, n_bytes=42), "val", batch_size=2, seq_len=4)
    pairs = list(zip(tokens[:20], tokens[1:21]))
    nll = -sum(math.log(table[a, b]) for a, b in pairs)
    assert result["tokens"] == 20
    assert result["loss"] == pytest.approx(nll / 20, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(nll / 20), rel=1e-6)
    # 20 of 21 tokens scored -> 20/21 of the split's 42 bytes
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / 40, rel=1e-6)

    first = ppl.evaluate_split(model, FakeDataset(tokens, n_bytes=42), "val", batch_size=2, seq_len=4, max_batches=1)
    nll_first = -sum(math.log(table[a, b]) for a, b in pairs[:8])
    assert first["tokens"] == 8
    assert first["loss"] == pytest.approx(nll_first / 8, rel=1e-6)
    assert first["bits_per_byte"] == pytest.approx(nll_first / math.log(2) / (8 / 21 * 42), rel=1e-6)


def test_evaluate_split_rejects_bad_split_and_short_data(fake_loader):
    model = FixedDistributionLM([0.5, 0.5])
    with pytest.raises(ValueError, match="split 'test'"):
        ppl.evaluate_split(model, FakeDataset([0, 1, 0], 3), "test", batch_size=1, seq_len=2)
    with pytest.raises(ValueError, match="no full window"):
        ppl.evaluate_split(model, FakeDataset([0, 1, 0], 3), "val", batch_size=1, seq_len=8)
    damaged = FakeDataset([0, 1, 0], 0)          # meta.json's val split without its byte count
    damaged.data_dir = os.path.join("prepared", "here")
    with pytest.raises(ValueError, match=re.escape(f"{os.path.join('prepared', 'here', 'meta.json')}: split 'val' "
                                                   "has no positive 'bytes' count")):
        ppl.evaluate_split(model, damaged, "val", batch_size=1, seq_len=2)
    with pytest.raises(ValueError, match=r"split 'test' not in prepared.here.meta\.json"):
        ppl.evaluate_split(model, damaged, "test", batch_size=1, seq_len=2)


def test_evaluate_split_restores_training_mode(fake_loader):
    """Every forward of the score runs in eval mode (a model with dropout would be scored
    noisily in train mode), and the model's training mode is back afterwards. Kills the score
    run without eval_mode (the mode would be right afterwards, wrong during)."""
    modes = []

    class ModeRecordingLM(FixedDistributionLM):
        def forward(self, idx, targets=None, state=None):
            modes.append(self.training)
            return super().forward(idx, targets, state)

    model = ModeRecordingLM([0.5, 0.5]).train()
    ppl.evaluate_split(model, FakeDataset([0, 1, 0, 1, 1], 5), "val", batch_size=1, seq_len=2)
    assert modes == [False, False]
    assert model.training


def test_evaluate_split_on_a_prepared_dataset_scores_every_val_token_once(tmp_path):
    """With the real loader (data/loader.py), tail window included: every val token after
    the first is a target once, and bits per byte use the split's byte count."""
    from data.loader import TokenDataset
    from data.prepare import prepare

    docs = [f"Document {i}: the cat sat on mat number {i * 7}." for i in range(8)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "prepared"
    prepare(f"files:{tmp_path / 'docs.jsonl'}", str(out), tokenizer="bytes", val_fraction=0.4,
            num_workers=1, quiet=True)
    dataset = TokenDataset(str(out))
    n = dataset.num_tokens("val")
    val_tokens = dataset.tokens("val", 0, n).tolist()
    table = torch.softmax(torch.randn(257, 257, generator=torch.Generator().manual_seed(1)), -1)
    nll = -sum(math.log(table[a, b]) for a, b in zip(val_tokens[:-1], val_tokens[1:]))

    result = ppl.evaluate_split(BigramLM(table), dataset, "val", batch_size=2, seq_len=16)
    assert (n - 1) % 16 != 0  # so the loader's shorter tail batch is exercised
    assert result["tokens"] == n - 1
    assert result["loss"] == pytest.approx(nll / (n - 1), rel=1e-5)
    n_bytes = dataset.meta["splits"]["val"]["bytes"]
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / ((n - 1) / n * n_bytes), rel=1e-5)


def test_unigram_baseline_by_hand(tmp_path):
    from collections import Counter

    from data.loader import TokenDataset
    from data.prepare import prepare

    docs = ["aaab", "abba", "bbbbc", "cab", "aaaa"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare(f"files:{tmp_path / 'd.jsonl'}", str(tmp_path / "p"), tokenizer="bytes", val_fraction=0.4,
            num_workers=1, quiet=True)
    ds = TokenDataset(str(tmp_path / "p"))
    train = ds.tokens("train", 0, ds.num_tokens("train")).tolist()
    val = ds.tokens("val", 0, ds.num_tokens("val")).tolist()
    counts = Counter(train)
    total = len(train) + 257 * 0.5
    nll = -sum(math.log((counts[t] + 0.5) / total) for t in val[1:])
    r = ppl.unigram_baseline(ds, "val", smoothing=0.5)
    assert r["tokens"] == len(val) - 1
    assert r["loss"] == pytest.approx(nll / (len(val) - 1), rel=1e-9)
    assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / ((len(val) - 1) / len(val) * ds.num_bytes("val")))


# -----------------------------------------------------------------------------
# rolling windows (lm-eval get_rolling_token_windows + make_disjoint_window, context_len=1)

def test_rolling_windows_worked_example():
    P = 99
    tokens = [10, 11, 12, 13, 14, 15, 16, 17]
    assert ppl.rolling_windows(tokens, P, 3) == [
        ([P], [10, 11, 12]),        # model reads P 10 11
        ([12], [13, 14, 15]),       # reads 12 13 14
        ([14, 15], [16, 17]),       # reads 14 15 16: the last window keeps a full context
    ]
    assert ppl.rolling_windows([], P, 3) == []
    assert ppl.rolling_windows([5, 6], P, 4) == [([P], [5, 6])]


def expected_context(tokens, i, max_len, prefix):
    """Context lm-eval gives token i: the first max_len tokens follow [prefix] + all earlier
    tokens; token i of a later window [start, end) follows tokens[end - max_len - 1 : i]."""
    if i < max_len:
        return [prefix] + tokens[:i]
    start = (i // max_len) * max_len
    end = min(start + max_len, len(tokens))
    return tokens[end - max_len - 1:i]


@pytest.mark.parametrize("n_tokens", [1, 2, 5, 6, 7, 13, 20])
@pytest.mark.parametrize("max_len", [1, 3, 6])
def test_rolling_windows_score_every_token_once_with_lm_eval_contexts(n_tokens, max_len):
    P = 1000
    tokens = list(range(n_tokens))
    windows = ppl.rolling_windows(tokens, P, max_len)
    assert [t for _, cont in windows for t in cont] == tokens  # each token exactly once, in order
    i = 0
    for context, cont in windows:
        model_input = (context + cont)[:-1]
        assert len(model_input) <= max_len
        for j, token in enumerate(cont):
            seen = model_input[:len(model_input) - len(cont) + j + 1]
            assert seen == expected_context(tokens, i, max_len, P)
            i += 1


# -----------------------------------------------------------------------------
# loglikelihood_tokens: batching with right padding equals one request at a time

def test_loglikelihood_tokens_batched_equals_oracle():
    model = DecayingPrefixLM(vocab_size=7)
    requests = [([1, 2, 3], [4, 5]), ([6], [0]), ([2, 2, 2, 2, 2], [1, 3, 4]), ([5, 4], [3])]
    results = ppl.loglikelihood_tokens(model, requests, batch_size=3)
    for (context, cont), (ll, greedy) in zip(requests, results):
        seq = context + cont
        expected, expected_greedy = 0.0, True
        for k in range(len(context), len(seq)):
            log_probs = model.next_token_log_probs(seq[:k])
            expected += log_probs[seq[k]].item()
            expected_greedy &= log_probs.argmax().item() == seq[k]
        assert ll == pytest.approx(expected, abs=1e-5)
        assert greedy == expected_greedy


def test_loglikelihood_tokens_left_truncates_to_max_len():
    model = DecayingPrefixLM(vocab_size=7)
    ll, _ = ppl.loglikelihood_tokens(model, [([1, 2, 3, 4, 5], [6, 0])], max_len=4)[0]
    # the model reads the last 4 tokens of (context + continuation)[:-1]: 3 4 5 6
    expected = model.next_token_log_probs([3, 4, 5])[6].item() + model.next_token_log_probs([3, 4, 5, 6])[0].item()
    assert ll == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="exceeds max_len"):
        ppl.loglikelihood_tokens(model, [([1], [2, 3, 4])], max_len=2)
    with pytest.raises(ValueError, match="empty context"):
        ppl.loglikelihood_tokens(model, [([], [2])])


# -----------------------------------------------------------------------------
# WikiText

def test_wikitext_detokenizer_on_lines_of_the_test_set():
    du_fu = " Du Fu ( Wade – Giles : Tu Fu ; Chinese : 杜甫 ; 712 – 770 ) was a prominent Chinese poet ."
    assert ppl.wikitext_detokenizer(du_fu) == " Du Fu (Wade – Giles: Tu Fu; Chinese: 杜甫; 712 – 770) was a prominent Chinese poet ."
    boulter = (' In 2000 Boulter had a guest @-@ starring role on the television series The Bill ; '
               'he portrayed " Scott Parry " in the episode , " In Safe Hands " . Boulter')
    assert ppl.wikitext_detokenizer(boulter) == (' In 2000 Boulter had a guest-starring role on the television series '
                                                 'The Bill; he portrayed "Scott Parry" in the episode, "In Safe Hands". Boulter')
    assert ppl.wikitext_detokenizer(" Most of what is known of Du Fu 's life") == " Most of what is known of Du Fu's life"
    assert ppl.wikitext_detokenizer("a 1 @,@ 000 @.@ 5 km road ") == "a 1,000.5 km road "
    assert ppl.wikitext_detokenizer(" = = Career = = \n = = = 2000 – 2005 = = = \n") == " == Career ==\n=== 2000 – 2005 ===\n"
    # lm-eval drops both spaces around a degree sign
    assert ppl.wikitext_detokenizer("the players ' union , 40 ° north") == "the players' union, 40°north"


def test_split_documents_at_top_level_titles_only():
    raw = " = A = \r\n text a . \r\n = = Sub = = \r\n more a \r\n = B = \r\n text b \r\n"
    assert ppl.split_wikitext_documents(raw) == [" = A = \n text a . \n = = Sub = = \n more a ",
                                                 " = B = \n text b \n"]


@needs_wikitext
def test_offline_wikitext_has_62_articles_and_lm_eval_word_counts():
    docs = ppl.load_wikitext_documents(WIKITEXT_RAW)
    assert len(docs) == 62
    assert docs[0].startswith(" = Robert Boulter = \n") and docs[1].startswith(" = Du Fu = \n")
    assert sum(len(d.split()) for d in docs) == 241_211  # whitespace-separated tokens (MANIFEST)
    # lm-eval's count, len(re.split(r"\s+", page)), adds the empty strings before the leading
    # and after the trailing whitespace of each article: 241,211 + 2 * 62
    assert sum(len(re.split(r"\s+", d)) for d in docs) == 241_211 + 2 * 62


@needs_wikitext
def test_wikitext_uniform_model_gives_closed_form_perplexities(byte_tok):
    model = FixedDistributionLM(torch.full((257,), 1 / 257))
    result = ppl.wikitext_word_perplexity(model, byte_tok, WIKITEXT_RAW, max_len=64, limit_docs=2, batch_size=16)
    docs = ppl.load_wikitext_documents(WIKITEXT_RAW)[:2]
    n_tokens = sum(len(ppl.wikitext_detokenizer(d).encode("utf-8")) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nll = n_tokens * math.log(257)  # every byte costs ln 257
    assert (result["docs"], result["tokens"], result["words"], result["max_len"]) == (2, n_tokens, words, 64)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert result["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)


def test_wikitext_scores_each_token_with_its_lm_eval_context(tmp_path, byte_tok):
    raw = " = Alpha = \r\n One @-@ two , ( three ) . \r\n = = Sub = = \r\n Four 's five \r\n = Be = \r\n Hi \r\n"
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(raw.encode("utf-8"))
    model = DecayingPrefixLM(vocab_size=257)
    max_len = 7
    result = ppl.wikitext_word_perplexity(model, byte_tok, str(path), max_len=max_len, batch_size=3)

    docs = ppl.split_wikitext_documents(raw)
    total_ll, words = 0.0, 0
    for doc in docs:
        tokens = list(ppl.wikitext_detokenizer(doc).encode("utf-8"))
        for i, token in enumerate(tokens):
            context = expected_context(tokens, i, max_len, byte_tok.eot_id)
            total_ll += model.next_token_log_probs(context)[token].item()
        words += len(re.split(r"\s+", doc))
    assert result["docs"] == 2 and result["words"] == words
    assert result["word_perplexity"] == pytest.approx(math.exp(-total_ll / words), rel=1e-5)


# -----------------------------------------------------------------------------
# LAMBADA

class LongestMatchTokenizer:
    """Longest match over a small vocabulary: merges across a context/continuation boundary
    as a BPE tokenizer's do."""
    eot_id = 99

    def __init__(self, vocab):
        self.vocab = vocab

    def encode(self, text):
        ids = []
        while text:
            piece = max((v for v in self.vocab if text.startswith(v)), key=len)
            ids.append(self.vocab.index(piece))
            text = text[len(piece):]
        return ids


def test_lambada_context_target_and_encode_pair():
    assert ppl.lambada_context_target("He said to Bob") == ("He said to", " Bob")
    assert ppl.lambada_context_target("Bob") == ("", " Bob")
    tok = LongestMatchTokenizer(["hello", " world", " ", "world", "x"])   # ' world' one token, 'hello ' two
    # the trailing space moves to the continuation, which then encodes as the single " world"
    assert ppl.encode_pair(tok, "hello ", "world") == ([0], [1])
    assert ppl.encode_pair(tok, "hello", " world") == ([0], [1])
    assert ppl.encode_pair(tok, "", " x") == ([99], [2, 4])


def _preferred_bigram_table():
    """p = 0.5 for the preferred next byte ('a'->'b', 'b'->' ', ' '->'b'), the rest uniform."""
    table = torch.full((257, 257), 0.5 / 256)
    for current, preferred in (("a", "b"), ("b", " "), (" ", "b")):
        table[ord(current), ord(preferred)] = 0.5
    return table


def test_lambada_three_handmade_examples(tmp_path, byte_tok):
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["ab ba", "a b", "ab b"]))
    result = ppl.lambada(BigramLM(_preferred_bigram_table()), byte_tok, str(path), batch_size=2)
    hi, lo = math.log(0.5), math.log(0.5 / 256)
    lls = [
        hi + hi + lo,  # "ab" -> " ba": b->' ' (preferred), ' '->b (preferred), b->a: not greedy
        lo + hi,       # "a"  -> " b":  a->' ' is not the argmax
        hi + hi,       # "ab" -> " b":  both preferred: greedy
    ]
    assert result["n"] == 3
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["perplexity"] == pytest.approx(math.exp(-sum(lls) / 3), rel=1e-5)


@needs_lambada
def test_lambada_first_five_passages_uniform_model(byte_tok):
    model = FixedDistributionLM(torch.full((257,), 1 / 257))
    result = ppl.lambada(model, byte_tok, LAMBADA_JSONL, limit=5, max_len=128)
    last_words = ["signs", "Shane", "insurance", "Helen", "chains"]  # read off the file
    n_target_bytes = [len(" " + w) for w in last_words]
    assert result["n"] == 5
    assert result["accuracy"] == 0.0  # uniform logits: argmax is byte 0, never a target byte
    assert result["perplexity"] == pytest.approx(math.exp(sum(n_target_bytes) / 5 * math.log(257)), rel=1e-5)


def test_lambada_bad_file(tmp_path, byte_tok):
    model = FixedDistributionLM(torch.full((257,), 1 / 257))
    with pytest.raises(FileNotFoundError, match="not found"):
        ppl.lambada(model, byte_tok, str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        ppl.lambada(model, byte_tok, str(bad))


# -----------------------------------------------------------------------------
# CLI errors: one line, exit 2

@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent/ckpt", "--tasks", "val,piqa"], "unknown task"),
    (["--checkpoint", "/nonexistent/ckpt", "--tasks", " , "], "--tasks ' , ' names no task; choose from val,"),
    (["--checkpoint", "/nonexistent/ckpt", "--tasks", "wikitext", "--wikitext", "/nonexistent/wiki.raw"], "not found"),
    (["--checkpoint", "/nonexistent/ckpt", "--tasks", "lambada", "--lambada", "/nonexistent/l.jsonl"], "not found"),
    (["--checkpoint", "/nonexistent/ckpt", "--tasks", "val"], "checkpoint /nonexistent/ckpt not found"),
    (["--checkpoint", "/nonexistent/ckpt", "--tasks", "val", "--limit", "0"], "--limit"),
])
def test_cli_errors_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("eval.common.default_data_dir", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        ppl.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_wikitext_needs_a_path(capsys, monkeypatch):
    monkeypatch.setattr("eval.common.default_data_dir", lambda: None)
    with pytest.raises(SystemExit):
        ppl.main(["--checkpoint", "/nonexistent/ckpt", "--tasks", "wikitext"])
    assert "needs --wikitext" in capsys.readouterr().err


def test_cli_finds_the_offline_data_beside_the_repo(tmp_path, monkeypatch):
    """Without flags the files come from $NL_DATA_DIR, else $NL_SHARED_DATA, else
    ../shared/data beside the repo (eval.common.default_data_dir, as the other eval CLIs)."""
    import eval.common as common
    for name in ("NL_DATA_DIR", "NL_SHARED_DATA"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.setattr(common, "REPO", str(tmp_path / "repo"))
    wiki = os.path.join("wikitext", "wiki.test.raw")
    assert ppl._default_path(None, wiki) == str(tmp_path / "shared" / "data" / wiki)
    monkeypatch.setenv("NL_DATA_DIR", str(tmp_path))
    assert ppl._default_path(None, wiki) == os.path.join(str(tmp_path), wiki)
    assert ppl._default_path("given.raw", wiki) == "given.raw"


def test_cli_end_to_end_with_a_stub_checkpoint_loader(tmp_path, monkeypatch, capsys, byte_tok):
    """The CLI wiring: tasks, paths, --limit, table and JSON, with checkpoint.load_model
    replaced by a toy model so the test needs no training run."""
    import checkpoint
    from data.loader import TokenDataset
    from data.prepare import prepare

    docs = [f"Line {i} of a small corpus, with words." for i in range(8)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare(f"files:{tmp_path / 'docs.jsonl'}", str(tmp_path / "prepared"), tokenizer="bytes", val_fraction=0.4,
            num_workers=1, quiet=True)
    wiki = tmp_path / "wiki.test.raw"
    wiki.write_text(" = A = \n Some text , here . \n = B = \n More @-@ text \n")
    lam = tmp_path / "lambada.jsonl"
    lam.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["ab ba", "a b", "ab b"]))
    model = BigramLM(_preferred_bigram_table())
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(tokenizer="bytes", data_dir=str(tmp_path / "prepared"),
                                                           dataset="unused"),
                                train=types.SimpleNamespace(seq_len=16),
                                distributed=types.SimpleNamespace(activation_checkpointing=False))
    monkeypatch.setattr(checkpoint, "load_model", lambda path, device: (model, cfg))
    (tmp_path / "ckpt").mkdir()
    out = tmp_path / "results.json"
    ppl.main(["--checkpoint", str(tmp_path / "ckpt"), "--wikitext", str(wiki), "--lambada", str(lam),
              "--limit", "2", "--device", "cpu", "--out", str(out)])
    results = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "word_perplexity" in printed and "settings" not in printed
    # the JSON says what it is of: the checkpoint, --limit and the files (it said only the numbers)
    assert results["settings"] == {"checkpoint": str(tmp_path / "ckpt"), "checkpoint_dir": str(tmp_path / "ckpt"),
                                   "tasks": ["val", "unigram", "wikitext", "lambada"], "limit": 2, "batch_size": 8,
                                   "max_len": 16, "wikitext": str(wiki), "lambada": str(lam), "device": "cpu"}
    dataset = TokenDataset(str(tmp_path / "prepared"))
    assert results["val"] == pytest.approx(ppl.evaluate_split(model, dataset, "val", 8, 16, max_batches=2))
    assert results["wikitext"] == pytest.approx(ppl.wikitext_word_perplexity(model, byte_tok, str(wiki), 16, limit_docs=2))
    assert results["lambada"] == pytest.approx(ppl.lambada(model, byte_tok, str(lam), limit=2, max_len=16))
    assert results["lambada"]["n"] == 2 and results["wikitext"]["docs"] == 2


@pytest.mark.parametrize("tasks", ["val", "unigram"])
def test_cli_refuses_data_of_another_tokenizer_in_one_line(tasks, tmp_path, monkeypatch, capsys):
    """A checkpoint's val split read from a folder prepared with another tokenizer (a shared
    data_dir prepared again) would score other tokens, or overflow the embedding: refused."""
    import checkpoint
    from data.prepare import prepare

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"Line {i}."}) + "\n" for i in range(8)))
    prepare(f"files:{tmp_path / 'docs.jsonl'}", str(tmp_path / "prepared"), tokenizer="bytes", val_fraction=0.4,
            num_workers=1, quiet=True)
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(tokenizer="gpt2", data_dir=str(tmp_path / "prepared"),
                                                           dataset="builtin"),
                                train=types.SimpleNamespace(seq_len=16),
                                distributed=types.SimpleNamespace(activation_checkpointing=False))
    monkeypatch.setattr(checkpoint, "load_model", lambda path, device: (FixedDistributionLM([0.5, 0.5]), cfg))
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        ppl.main(["--checkpoint", str(tmp_path / "ckpt"), "--tasks", tasks, "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: ") and "prepared with tokenizer 'bytes', but data.tokenizer='gpt2'" in err


def test_cli_checks_out_before_the_eval(tmp_path, monkeypatch, capsys):
    """A folder as --out, or a path through a file, is a one-line error before anything is
    scored (not a traceback after it); a missing folder on the way is made."""
    monkeypatch.setattr(ppl, "run", lambda args: pytest.fail("evaluated before checking --out"))
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for out, message in ((tmp_path, "is a folder; give a file name"), (a_file / "r.json", "a_file is not a folder")):
        with pytest.raises(SystemExit) as exit_info:
            ppl.main(["--checkpoint", "ckpt", "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: --out {out}") and message in err
        assert err.count("\n") == 1
    assert a_file.read_text() == "keep me"
    monkeypatch.setattr(ppl, "run", lambda args: {"val": {"loss": 1.0}})
    out = tmp_path / "missing" / "deeper" / "r.json"
    ppl.main(["--checkpoint", "ckpt", "--out", str(out)])
    assert json.loads(out.read_text()) == {"val": {"loss": 1.0}}


@pytest.mark.parametrize("argv, message", [
    (["--limit", "-1"], "error: argument --limit: must be >= 1, got -1\n"),
    (["--batch-size", "0"], "error: argument --batch-size: must be >= 1, got 0\n"),
    (["--tasks"], "error: argument --tasks: expected one argument\n"),
    ([], "error: the following arguments are required: --checkpoint\n"),
])
def test_cli_flag_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ppl.main((["--checkpoint", "ckpt"] if argv else []) + argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err == message


# -----------------------------------------------------------------------------
# encode_pair across a merge, empty continuations, LAMBADA accuracy over passages

def test_encode_pair_takes_the_continuation_ids_from_the_whole_string():
    """lm-eval's _encode_pair: the continuation's ids are enc(context + continuation) after
    the first len(enc(context)) ids, so a merge across the boundary follows the whole string
    ('a' + 'bc' -> 'ab' 'c': the continuation is scored as the single token 'c'). Kills
    returning tokenizer.encode(continuation) on its own."""
    tok = LongestMatchTokenizer(["ab", "a", "b", "c"])
    assert ppl.encode_pair(tok, "a", "bc") == ([1], [3])
    assert ppl.encode_pair(tok, "c", "ab") == ([3], [0])      # no merge: its own ids


def test_loglikelihood_tokens_empty_continuation_is_zero_and_greedy():
    """An empty continuation has log-likelihood 0 and is greedy (lm-eval: the sum and the
    all() over no tokens). Kills (0.0, True) -> (0.0, False)."""
    model = DecayingPrefixLM(vocab_size=7)
    assert ppl.loglikelihood_tokens(model, [([1, 2], []), ([3], [4])])[0] == (0.0, True)


def test_lambada_accuracy_is_the_mean_over_every_passage(tmp_path, byte_tok):
    """Accuracy = mean(is_greedy) over all passages, the first included: here only the first
    of three is greedy ("ab" -> " b" both preferred), so 1/3. Kills averaging over results[1:]."""
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["ab b", "ab ba", "a b"]))
    result = ppl.lambada(BigramLM(_preferred_bigram_table()), byte_tok, str(path), batch_size=2)
    hi, lo = math.log(0.5), math.log(0.5 / 256)
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["perplexity"] == pytest.approx(math.exp(-((hi + hi) + (hi + hi + lo) + (lo + hi)) / 3), rel=1e-5)


@pytest.mark.parametrize("task, content, message", [
    ("wikitext", b" = A = \n caf\xe9 \n", "{path} is not UTF-8 text (byte 0xe9 at offset 12)"),
    ("lambada", b'{"text": "a b"}\n\xff\n', "{path} is not UTF-8 text (byte 0xff at offset 16)"),
    ("lambada", b'{"text": "a b"}\n{"text": 123}\n', "{path}:2: not a JSON object with a 'text' string"),
    ("lambada", b"\n", "LAMBADA file {path} has no passage"),
])
def test_cli_bad_data_files_are_one_line_errors_before_the_checkpoint_loads(task, content, message, tmp_path,
                                                                            monkeypatch, capsys):
    """A data file that is not UTF-8, has a line without a text string or no passage is named
    in one line before the checkpoint loads (not a decoder message without the file, a
    traceback, or an error after the val split is scored)."""
    monkeypatch.setattr(ppl, "load_checkpoint", lambda *a: pytest.fail("loaded the checkpoint before the data"))
    path = tmp_path / ("wiki.test.raw" if task == "wikitext" else "lambada.jsonl")
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        ppl.main(["--checkpoint", str(tmp_path), "--tasks", f"val,{task}", f"--{task}", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == f"error: {message.format(path=path)}\n"


@pytest.mark.parametrize("datasets_module, message", [
    (None, "'hf' (EleutherAI/lambada_openai) needs the package 'datasets'"),
    (types.SimpleNamespace(load_dataset=lambda *a, **k: (_ for _ in ()).throw(
        ConnectionError("Couldn't reach 'EleutherAI/lambada_openai' on the Hub (OfflineModeIsEnabled)"))),
     "cannot load EleutherAI/lambada_openai (default, test) from the Hugging Face Hub: Couldn't reach"),
])
def test_cli_hf_data_offline_is_one_line(datasets_module, message, monkeypatch, capsys):
    """--lambada hf (or --wikitext hf) without `datasets` or without network: one line naming
    the dataset before the checkpoint loads, not the hub client's traceback."""
    monkeypatch.setitem(sys.modules, "datasets", datasets_module)
    monkeypatch.setattr(ppl, "load_checkpoint", lambda *a: pytest.fail("loaded the checkpoint before the data"))
    with pytest.raises(SystemExit) as exit_info:
        ppl.main(["--checkpoint", "ckpt", "--tasks", "lambada", "--lambada", "hf"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1


def test_lambada_splits_on_single_spaces_only():
    """lm-eval's lambada_openai: doc_to_text = text.split(' ')[:-1] joined by ' ', doc_to_target
    = ' ' + text.split(' ')[-1]. Most OpenAI passages hold line breaks, which stay in the
    context as they are (and in the last 'word' when they precede it). Kills splitting on any
    whitespace, which turns every line break of the context into a space."""
    assert ppl.lambada_context_target('said.\n\n"No  way" he told Bob') == ('said.\n\n"No  way" he told', " Bob")
    assert ppl.lambada_context_target("He waved.\nBob") == ("He", " waved.\nBob")


def test_wikitext_detokenizer_keeps_lm_evals_n_rule():
    """lm-eval's detokenizer turns ' N ' into ' 1 ' (a quirk kept so the scored text is
    lm-eval's). Kills dropping that rule."""
    assert ppl.wikitext_detokenizer("a N m high") == "a 1 m high"


def test_val_alone_does_not_look_up_the_offline_data(monkeypatch, capsys):
    """A bad $NL_DATA_DIR is an error where the offline data is read (eval.common), but
    --tasks val reads none of it: it got as far as loading the checkpoint before."""
    monkeypatch.setenv("NL_DATA_DIR", "/nonexistent/data")
    monkeypatch.setattr(ppl, "load_checkpoint", lambda *a: (_ for _ in ()).throw(FileNotFoundError("checkpoint x")))
    with pytest.raises(SystemExit):
        ppl.main(["--checkpoint", "x", "--tasks", "val"])
    assert capsys.readouterr().err == "error: checkpoint x\n"
    with pytest.raises(SystemExit):
        ppl.main(["--checkpoint", "x", "--tasks", "lambada"])
    assert "$NL_DATA_DIR=/nonexistent/data is not a folder" in capsys.readouterr().err


def test_a_diverged_model_gets_infinite_perplexity_not_an_overflow_error(tmp_path, byte_tok, fake_loader):
    """A model that puts all its mass on a wrong token costs ~1000 nats per token: every
    perplexity is past the float range. Each score returns inf (and the finite loss / bits per
    byte) instead of math.exp's OverflowError after the whole eval (in train.py, the run's)."""
    model = FixedDistributionLM(torch.ones(257))
    model.log_probs[0] = 1000.0                     # logits: token 0 at 1000, every other at 0
    val = ppl.evaluate_split(model, FakeDataset([5, 6, 7, 8, 9], 5), "val", batch_size=1, seq_len=2)
    assert val["perplexity"] == math.inf and val["loss"] == pytest.approx(1000.0, rel=1e-3)
    lam = tmp_path / "lambada.jsonl"
    lam.write_text(json.dumps({"text": "the end"}) + "\n")
    assert ppl.lambada(model, byte_tok, str(lam), max_len=16)["perplexity"] == math.inf
    wiki = tmp_path / "wiki.test.raw"
    wiki.write_text(" = A = \n Some text , here . \n")
    result = ppl.wikitext_word_perplexity(model, byte_tok, str(wiki), 16)
    assert result["word_perplexity"] == result["byte_perplexity"] == math.inf
    assert math.isfinite(result["bits_per_byte"]) and result["bits_per_byte"] > 1000
