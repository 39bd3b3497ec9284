"""
Perplexity evals (DESIGN §7; exact lm-eval definitions in reference/evals.md §3.2).

    evaluate_split            val loss, perplexity, bits per byte on a prepared split
    unigram_baseline          the same numbers for a unigram model of the train split
    wikitext_word_perplexity  lm-eval `wikitext`: per-document rolling log-likelihood,
                              word perplexity, byte perplexity, bits per byte
    lambada                   lm-eval `lambada_openai`: log-likelihood of the last word,
                              per-example perplexity and greedy accuracy

Every model follows `logits, loss, state = model(idx, targets=None, state=None)`.
Each scored window starts from a fresh state (state=None), exactly like a Transformer
with a context of `max_len` tokens, so all architectures are scored the same way.

CLI (see docs/EVAL.md):
    python -m eval.perplexity --checkpoint DIR [--tasks val,wikitext,lambada]
        [--wikitext PATH|hf] [--lambada PATH|hf] [--limit N] [--device auto|cpu|cuda]
        [--batch-size N] [--out results.json]
"""

import json
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

from cli import OneLineArgumentParser, check_hub, check_output_file, positive_int, read_text, write_atomic
from eval.common import (DATA_DIR_LOOKUP, checkpoint_identity, eval_mode, exit_on_error, exp_or_inf, first_line,
                         load_checkpoint, model_device, resolve_checkpoint_arg)

LN2 = math.log(2.0)
NO_DATA_DIR = f"no offline data folder: {DATA_DIR_LOOKUP}"
# the WikiText and LAMBADA test files in that folder (eval.run reads them there too)
WIKITEXT_FILE = os.path.join("wikitext", "wiki.test.raw")
LAMBADA_FILE = os.path.join("lambada", "lambada_test.jsonl")
HF_WIKITEXT = ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test")
HF_LAMBADA = ("EleutherAI/lambada_openai", "default", "test")


# -----------------------------------------------------------------------------
# 1. A prepared split: mean token NLL and bits per byte

@torch.no_grad()
def evaluate_split(model, dataset, split="val", batch_size=8, seq_len=256, max_batches=None, device=None,
                   rank: int = 0, world_size: int = 1) -> dict:
    """Mean next-token NLL over the split's consecutive non-overlapping windows of seq_len.

    bits_per_byte = total NLL (nats) / ln 2 / bytes, where bytes is the split's UTF-8 byte
    count scaled to the tokens actually scored: tokens_scored / split_tokens * split_bytes
    (exact when the whole split is scored; with max_batches it assumes the scored prefix has
    the split's average bytes per token). Tokenizer-independent, so bytes and gpt2 runs compare.

    Over ranks (train.py under torchrun): each of world_size ranks scores its rows of every
    batch, the sums are all-reduced, and the numbers are those of one process. A rank left
    without rows (a short last batch) still runs a forward, unscored, because FSDP2 needs
    every rank in each forward's all-gathers.
    """
    from data.loader import iter_eval_batches  # lazy: keeps this module importable on its own
    from distributed import all_reduce_sum     # a no-op without a process group

    splits = dataset.meta.get("splits", {})
    meta_json = os.path.join(getattr(dataset, "data_dir", ""), "meta.json")   # a TokenDataset's folder
    if split not in splits:
        raise ValueError(f"split {split!r} not in {meta_json} (has {sorted(splits)})")
    split_meta = splits[split]
    for key in ("tokens", "bytes"):
        if not split_meta.get(key):
            raise ValueError(f"{meta_json}: split {split!r} has no positive {key!r} count")
    device = torch.device(device) if device is not None else model_device(model)

    rows_per_rank = -(-batch_size // world_size)
    sums = torch.zeros(2, dtype=torch.float64, device=device)        # NLL (nats), tokens scored
    with eval_mode(model):
        for x, y in iter_eval_batches(dataset, split, batch_size, seq_len, max_batches=max_batches):
            lo = rank * rows_per_rank
            hi = min(lo + rows_per_rank, x.shape[0])
            rows = slice(lo, hi) if hi > lo else slice(0, 1)
            logits = model(x[rows].to(device))[0]
            if hi > lo:
                targets = y[rows].to(device)
                sums[0] += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").double()
                sums[1] += targets.numel()
    total_nll, tokens_scored = all_reduce_sum(sums).tolist()
    if tokens_scored == 0:
        raise ValueError(f"split {split!r} has no full window of seq_len={seq_len} + 1 tokens to score")
    loss = total_nll / tokens_scored
    bytes_scored = tokens_scored / split_meta["tokens"] * split_meta["bytes"]
    return {
        "loss": loss,
        "perplexity": exp_or_inf(loss),
        "bits_per_byte": total_nll / LN2 / bytes_scored,
        "tokens": int(tokens_scored),
    }


def unigram_baseline(dataset, split="val", smoothing=1.0) -> dict:
    """The reference point a trained model must beat: a unigram model fitted on the train
    split (add-`smoothing` counts over the vocabulary) scored on `split` like evaluate_split
    (every token after the first is a target). Returns {loss, perplexity, bits_per_byte, tokens}."""
    counts = np.full(dataset.vocab_size, smoothing, dtype=np.float64)
    for shard in dataset.shards["train"]:
        counts += np.bincount(np.asarray(shard), minlength=dataset.vocab_size)[:dataset.vocab_size]
    log_p = np.log(counts / counts.sum())
    n = dataset.num_tokens(split)
    targets = np.asarray(dataset.tokens(split, 1, n)).astype(np.int64)
    total_nll = float(-log_p[targets].sum())
    bytes_scored = len(targets) / n * dataset.num_bytes(split)
    loss = total_nll / len(targets)
    return {"loss": loss, "perplexity": exp_or_inf(loss), "bits_per_byte": total_nll / LN2 / bytes_scored,
            "tokens": len(targets)}


# -----------------------------------------------------------------------------
# Log-likelihood of continuations (lm-eval's `_loglikelihood_tokens` semantics)

@torch.no_grad()
def loglikelihood_tokens(model, requests, max_len=None, device=None, batch_size=8, progress=False) -> list:
    """For each (context_ids, continuation_ids): (sum of log p(continuation | context), is_greedy).

    As lm-eval: the model reads (context + continuation)[:-1], left-truncated to its last
    max_len tokens, and the last len(continuation) positions predict the continuation.
    is_greedy: every continuation token is the argmax. Requests are sorted by length and
    right-padded into batches; padding sits after every scored position, so a causal model
    gives the same numbers as one request at a time.
    """
    device = torch.device(device) if device is not None else model_device(model)
    rows = []  # (request index, model input ids, continuation ids)
    for i, (context_ids, continuation_ids) in enumerate(requests):
        if len(context_ids) == 0:
            raise ValueError(f"request {i} has an empty context: prefix it with the end-of-text token")
        ids = list(context_ids) + list(continuation_ids)
        if max_len is not None:
            if len(continuation_ids) > max_len:
                raise ValueError(f"request {i}: continuation of {len(continuation_ids)} tokens exceeds max_len={max_len}")
            ids = ids[-(max_len + 1):]
        rows.append((i, ids[:-1], list(continuation_ids)))
    rows.sort(key=lambda row: -len(row[1]))  # longest first: little padding per batch

    results = [None] * len(rows)
    batches = range(0, len(rows), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="scoring", unit="batch")
    with eval_mode(model):
        for start in batches:
            batch = rows[start:start + batch_size]
            width = len(batch[0][1])
            x = torch.zeros(len(batch), width, dtype=torch.long)
            for b, (_, inp, _) in enumerate(batch):
                x[b, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            logits = model(x.to(device))[0]
            for b, (i, inp, cont) in enumerate(batch):
                if not cont:
                    results[i] = (0.0, True)
                    continue
                scored = logits[b, len(inp) - len(cont):len(inp)].float().log_softmax(-1)
                target = torch.tensor(cont, dtype=torch.long, device=scored.device)
                ll = scored.gather(-1, target[:, None]).sum().item()
                is_greedy = bool((scored.argmax(-1) == target).all().item())
                results[i] = (ll, is_greedy)
    return results


# -----------------------------------------------------------------------------
# 2. WikiText (lm-eval `wikitext`, output type loglikelihood_rolling)

def wikitext_detokenizer(text: str) -> str:
    """lm-eval's `wikitext_detokenizer` (tasks/wikitext/preprocess_wikitext.py): undo
    WikiText's tokenisation, in the same order of rules, so the model scores natural text."""
    # contractions (the second rule is lm-eval's, kept as is: it only matches "/' 0/"-like text)
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    # number separators: 1 @,@ 000 -> 1,000; 2 @.@ 5 -> 2.5; well @-@ known -> well-known
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    # punctuation
    for mark in (":", ";", ".", "!", "?", ","):
        text = text.replace(f" {mark} ", f"{mark} ")
    # brackets and quotes: drop the spaces just inside them
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    # miscellaneous: heading markers, degrees, line-edge spaces, lm-eval's " N " rule, 's
    text = text.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    text = text.replace(" \u00b0 ", "\u00b0")
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    text = text.replace(" N ", " 1 ")
    text = text.replace(" 's", "'s")
    return text


def _is_article_title(line: str) -> bool:
    # " = Title = " starts an article; " = = Section = = " does not (EleutherAI's
    # wikitext_document_level builder collapses "= =" first, so sections start with "==")
    collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
    return collapsed.startswith("= ") and collapsed.endswith(" =")


def split_wikitext_documents(raw_text: str) -> list:
    """A raw WikiText file -> one string per article, as EleutherAI/wikitext_document_level:
    CRLF normalised to LF, lines joined by LF, a new article at each top-level title line."""
    lines = raw_text.replace("\r\n", "\n").split("\n")
    documents, current = [], []
    for line in lines:
        if _is_article_title(line):
            page = "\n".join(current)
            if page.strip():
                documents.append(page)
            current = []
        current.append(line)
    page = "\n".join(current)
    if page.strip():
        documents.append(page)
    return documents


def _hf_column(dataset: tuple, column: str) -> list:
    """One column of a (name, config, split) Hugging Face dataset, as a list. Offline, or
    without `datasets`, one clear line (as eval.babilong's Hub loaders), not a traceback."""
    name, config, split = dataset
    try:
        import datasets
    except ImportError:
        raise ImportError(f"'hf' ({name}) needs the package 'datasets' (pip install datasets)") from None
    try:
        check_hub()
        return [row[column] for row in datasets.load_dataset(name, config, split=split)]
    except Exception as e:
        raise ConnectionError(f"cannot load {name} ({config}, {split}) from the Hugging Face Hub: {first_line(e)}; "
                              "offline, pass the file's path instead of 'hf'") from None


def _require_file(path: str, what: str, want: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} not found (want {want}, or 'hf')")


def load_wikitext_documents(path: str) -> list:
    """Articles of a raw WikiText file, or of the HF document-level test split for path='hf'."""
    if path == "hf":
        return _hf_column(HF_WIKITEXT, "page")
    _require_file(path, "WikiText", "wiki.test.raw")
    documents = split_wikitext_documents(read_text(path))
    if not documents:
        raise ValueError(f"WikiText file {path} has no article (no ' = Title = ' line)")
    return documents


def rolling_windows(tokens, prefix_token: int, max_len: int) -> list:
    """lm-eval's get_rolling_token_windows(context_len=1) + make_disjoint_window, as
    (context_ids, continuation_ids) pairs that predict every token exactly once.

    Window 1 predicts tokens[:max_len] from [prefix] + tokens[:max_len-1]. Each later
    window predicts the next max_len tokens, reading from the token just before them; the
    last (shorter) window predicts what is left but reads a full max_len tokens of context.
    Example, tokens t0..t7, max_len 3: [P t0 t1]->t0 t1 t2; [t2 t3 t4]->t3 t4 t5;
    [t4 t5 t6]->t6 t7 (t6 predicted from t4 t5, t7 from t4 t5 t6).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n_predict = min(len(tokens) - predicted, max_len)
        end = predicted + n_predict
        # model input = tokens[end - max_len - 1 : end - 1]; its last n_predict positions score
        windows.append((tokens[end - max_len - 1:end - n_predict], tokens[end - n_predict:end]))
        predicted = end
    return windows


@torch.no_grad()
def wikitext_word_perplexity(model, tokenizer, path, max_len, device=None, limit_docs=None,
                             batch_size=8, progress=False) -> dict:
    """lm-eval `wikitext` on the test articles at `path` (a raw file, or 'hf').

    Each article is detokenized, encoded, and scored in rolling windows of max_len with the
    end-of-text token as the first token's context. Words and bytes are counted on the
    article *before* detokenization (lm-eval's process_results):
      word_perplexity = exp(-sum ll / sum words), words = len(re.split(r"\\s+", article))
      byte_perplexity = exp(-sum ll / sum bytes), bytes = len(article.encode("utf-8"))
      bits_per_byte   = -sum ll / sum bytes / ln 2
    The numbers depend on max_len (the window): report it with them.
    """
    documents = load_wikitext_documents(path)
    if limit_docs is not None:
        documents = documents[:limit_docs]
    requests = []
    words = n_bytes = n_tokens = 0
    for article in documents:
        tokens = tokenizer.encode(wikitext_detokenizer(article))
        windows = rolling_windows(tokens, tokenizer.eot_id, max_len)
        requests += windows
        words += len(re.split(r"\s+", article))
        n_bytes += len(article.encode("utf-8"))
        n_tokens += len(tokens)
    results = loglikelihood_tokens(model, requests, max_len=max_len, device=device,
                                   batch_size=batch_size, progress=progress)
    total_ll = math.fsum(ll for ll, _ in results)
    return {
        "word_perplexity": exp_or_inf(-total_ll / words),
        "byte_perplexity": exp_or_inf(-total_ll / n_bytes),
        "bits_per_byte": -total_ll / n_bytes / LN2,
        "docs": len(documents),
        "words": words,
        "tokens": n_tokens,
        "max_len": max_len,
    }


# -----------------------------------------------------------------------------
# 3. LAMBADA (lm-eval `lambada_openai`, output type loglikelihood)

def load_lambada_texts(path: str) -> list:
    """The passages of a LAMBADA jsonl file ({"text": ...} per line), or the HF test split."""
    if path == "hf":
        return _hf_column(HF_LAMBADA, "text")
    _require_file(path, "LAMBADA", "lambada_test.jsonl")
    texts = []
    for line_number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            text = None
        if not isinstance(text, str):               # a number or null would fail only when scored
            raise ValueError(f"{path}:{line_number}: not a JSON object with a 'text' string")
        texts.append(text)
    if not texts:
        raise ValueError(f"LAMBADA file {path} has no passage")
    return texts


def lambada_context_target(text: str) -> tuple:
    """lm-eval lambada_openai: context = the text minus its last space-separated word,
    target = " " + that word (doc_to_text / doc_to_target split on " ")."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple:
    """lm-eval's TemplateLM._encode_pair: trailing spaces of the context move to the
    continuation; the continuation's ids are those of enc(context + continuation) after the
    first len(enc(context)) ids, so merges across the boundary follow the whole string.
    An empty context becomes the end-of-text token (lm-eval's prefix token)."""
    if context == "":
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def lambada(model, tokenizer, path, device=None, limit=None, max_len=None, batch_size=8, progress=False) -> dict:
    """lm-eval `lambada_openai` on the passages at `path` (a jsonl file, or 'hf').

    ll = total log-prob of the target word's tokens given the context (left-truncated to
    max_len); accuracy = mean(is_greedy); perplexity = exp(-mean ll), a per-example (per
    word) perplexity, not per token.
    """
    texts = load_lambada_texts(path)
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise ValueError(f"LAMBADA source {path} has no passage")
    requests = [encode_pair(tokenizer, *lambada_context_target(text)) for text in texts]
    results = loglikelihood_tokens(model, requests, max_len=max_len, device=device,
                                   batch_size=batch_size, progress=progress)
    mean_ll = math.fsum(ll for ll, _ in results) / len(results)
    return {
        "perplexity": exp_or_inf(-mean_ll),
        "accuracy": sum(greedy for _, greedy in results) / len(results),
        "n": len(results),
    }


# -----------------------------------------------------------------------------
# CLI

def _default_path(flag_value, relative_path):
    """The flag's path, else the file in the offline data folder (eval.common.default_data_dir:
    $NL_DATA_DIR, $NL_SHARED_DATA or ../shared/data), else None."""
    if flag_value:
        return flag_value
    from eval.common import default_data_dir  # looked up at each call, so that a test can replace it
    data_dir = default_data_dir()
    return os.path.join(data_dir, relative_path) if data_dir else None


def _format_table(results: dict) -> str:
    lines = [f"{'task':<10} {'metric':<16} {'value':>12}", "-" * 40]
    for task, metrics in results.items():
        if task == "settings":              # what was scored, in the JSON; the command line says it here
            continue
        for metric, value in metrics.items():
            if isinstance(value, float):  # an untrained model's perplexities are huge
                shown = f"{value:.4f}" if abs(value) < 1e7 else f"{value:.4e}"
            else:
                shown = str(value)
            lines.append(f"{task:<10} {metric:<16} {shown:>12}")
    return "\n".join(lines)


TASKS = ("val", "unigram", "wikitext", "lambada")


def run(args) -> dict:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks:
        raise ValueError(f"--tasks {args.tasks!r} names no task; choose from {','.join(TASKS)}")
    if unknown:
        raise ValueError(f"--tasks {args.tasks!r}: unknown task(s) {unknown}; choose from {','.join(TASKS)}")
    # looked up only for the tasks asked for: a bad $NL_DATA_DIR does not stop --tasks val
    wikitext_path = _default_path(args.wikitext, WIKITEXT_FILE) if "wikitext" in tasks else None
    lambada_path = _default_path(args.lambada, LAMBADA_FILE) if "lambada" in tasks else None
    if "wikitext" in tasks and wikitext_path is None:
        raise ValueError(f"task wikitext needs --wikitext PATH|hf ({NO_DATA_DIR})")
    if "lambada" in tasks and lambada_path is None:
        raise ValueError(f"task lambada needs --lambada PATH|hf ({NO_DATA_DIR})")
    # read the data before the checkpoint loads and anything is scored: a missing, malformed or
    # unreachable file is an error up front, not after the val split (read again when scored)
    if "wikitext" in tasks:
        load_wikitext_documents(wikitext_path)
    if "lambada" in tasks:
        load_lambada_texts(lambada_path)
    # resolved once, as eval.run does: an out_dir names its latest step, which training may move
    # on, so the step loaded and the step recorded are one and the same
    resolved = resolve_checkpoint_arg(args.checkpoint)
    model, cfg, tokenizer, device = load_checkpoint(resolved, args.device)
    max_len = cfg.train.seq_len
    # what the numbers are of, for a results file read without the command line that made it
    results = {"settings": {"checkpoint": os.path.abspath(args.checkpoint), "checkpoint_dir": os.path.abspath(resolved),
                            **checkpoint_identity(resolved), "tasks": tasks, "limit": args.limit,
                            "batch_size": args.batch_size, "max_len": max_len, "wikitext": wikitext_path,
                            "lambada": lambada_path, "device": str(device)}}
    if "val" in tasks or "unigram" in tasks:
        from train import open_training_data  # the folder train.py prepared and validated on
        dataset = open_training_data(cfg)
    if "val" in tasks:
        results["val"] = evaluate_split(model, dataset, "val", args.batch_size, max_len,
                                        max_batches=args.limit, device=device)
    if "unigram" in tasks:
        results["unigram_val"] = unigram_baseline(dataset, "val")
    if "wikitext" in tasks:
        results["wikitext"] = wikitext_word_perplexity(model, tokenizer, wikitext_path, max_len, device=device,
                                                       limit_docs=args.limit, batch_size=args.batch_size,
                                                       progress=True)
    if "lambada" in tasks:
        results["lambada"] = lambada(model, tokenizer, lambada_path, device=device, limit=args.limit,
                                     max_len=max_len, batch_size=args.batch_size, progress=True)
    return results


def main(argv=None):
    parser = OneLineArgumentParser(prog="python -m eval.perplexity",
                                   description="Val loss / bits per byte, WikiText word perplexity, LAMBADA.")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint directory written by train.py, its out_dir (the latest checkpoint) or an exported "
                             ".safetensors")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma list from {','.join(TASKS)}")
    parser.add_argument("--wikitext", help=f"wiki.test.raw path or 'hf' (default: wikitext/wiki.test.raw in the "
                                           f"offline data folder: {DATA_DIR_LOOKUP})")
    parser.add_argument("--lambada", help=f"lambada_test.jsonl path or 'hf' (default: lambada/lambada_test.jsonl in "
                                          f"the offline data folder: {DATA_DIR_LOOKUP})")
    parser.add_argument("--limit", type=positive_int,
                        help="val batches / WikiText articles / LAMBADA passages to score")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", help="write the results as JSON here (a file; its folder is made)")
    args = parser.parse_args(argv)
    with exit_on_error():
        if args.out:
            check_output_file(args.out)                  # before the eval, not after it
        results = run(args)
    print(_format_table(results))
    if args.out:
        write_atomic(args.out, json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
