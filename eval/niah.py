"""
S-NIAH: RULER's single-needle retrieval tasks (Hsieh et al., arXiv 2404.06654), as in the
Nested Learning Table 1 and Titans Table 2 (reference/paper-digest.md §5.3).

    niah_single_1  pass-key: a 7-digit number hidden in repeated noise sentences
    niah_single_2  number:   a 7-digit number hidden in an essay (book text)
    niah_single_3  UUID:     a UUID hidden in an essay

One needle "One of the special magic {numbers|uuids} for {key} is: {value}." is placed at a
sentence boundary at the requested depth (0 = start, 1 = end of the haystack), with RULER's
template around it, and the model completes RULER's answer prefix. Lengths are GPT-2 tokens
of the whole prompt plus the RULER_TOKENS_TO_GENERATE (128) that RULER keeps free for the
answer; "4k" = 4096 as in RULER. Keys are "adjective-noun" words as in RULER (our own word
lists; RULER draws from the `wonderwords` package). RULER's essays are Paul Graham's, which
are not available offline: the essay haystack here is contiguous text of a public-domain
book (Austen or KJV test books, PG19 through the Hub), which the results record.

Scores, both labelled in the output:
  accuracy          RULER's string_match_all for one needle: the value occurs in the greedy
                    output (case-insensitive);
  ranking_accuracy  the value has a higher log-likelihood after the answer prefix than each
                    of `n_distractors` random values of the same kind (a tie is wrong).
Long inputs are handled as in eval.babilong (eval.common.fit_prompt): recurrent models stream
in segments with the state carried; attention models truncate or skip a prompt that leaves
no room for the answer within max_len.

CLI:
    python -m eval.niah --checkpoint DIR --tasks 1,2,3 --lengths 1k,2k,4k --samples N --out DIR
"""
from __future__ import annotations

import itertools
import os
import random
import re
import time
import uuid

import torch

from cli import OneLineArgumentParser, check_unique, fraction_list, positive_int, seed_int, write_json
from eval.babilong import BACKGROUNDS, length_tokenizer, load_books, sentence_splitter, window_sentences
from eval.common import (DATA_DIR_HELP, MAX_CONTEXT_TOKENS, bf16_autocast, check_data_dir, check_long_inputs,
                         context_handling, continuation_logprobs, eval_mode, exit_on_error, fit_prompt,
                         format_accuracy, greedy_generate, is_recurrent, load_for_generation, longest_input_note,
                         mean_over_scored, model_device, notes_of, prefill)

# RULER scripts/data/synthetic/constants.py and niah.py
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
                 "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")
RULER_TOKENS_TO_GENERATE = 128

# RULER synthetic.yaml: niah_single_{1,2,3}
TASKS = {
    "niah_single_1": {"haystack": "noise", "value": "numbers"},
    "niah_single_2": {"haystack": "essay", "value": "numbers"},
    "niah_single_3": {"haystack": "essay", "value": "uuids"},
}
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_DISTRACTORS = 4         # random values the needle's is ranked against
MAX_EMPTY_WINDOWS = 1000        # book windows without a whole sentence before the books are refused

_ADJECTIVES = ("ancient", "bitter", "brave", "calm", "clever", "crooked", "curious", "damp", "eager", "faint",
               "fearless", "fierce", "gentle", "gleaming", "hollow", "humble", "icy", "jolly", "lively", "lonely",
               "misty", "noisy", "odd", "pale", "proud", "quiet", "rapid", "rusty", "shy", "silent", "sleepy",
               "smooth", "steady", "sturdy", "tender", "tidy", "vast", "wandering", "wise", "young")
_NOUNS = ("anchor", "apricot", "badge", "banjo", "barrel", "beacon", "bucket", "candle", "canyon", "cellar",
          "comet", "compass", "cottage", "crayon", "dragon", "engine", "falcon", "feather", "fountain", "glacier",
          "harbor", "helmet", "island", "kettle", "lantern", "meadow", "mirror", "orchard", "pebble", "pepper",
          "quilt", "saddle", "shovel", "spindle", "teapot", "thimble", "tunnel", "violin", "walnut", "window")


def parse_task(task) -> str:
    """'niah_single_2' | 's-niah-2' | '2' -> 'niah_single_2'."""
    text = str(task).strip().lower()
    match = re.fullmatch(r"(?:niah_single_|s-niah-)?([123])", text)
    if not match:
        raise ValueError(f"unknown S-NIAH task {task!r}; valid: niah_single_1, niah_single_2, niah_single_3 (or 1,2,3)")
    return f"niah_single_{match.group(1)}"


def parse_length(label) -> int:
    """'4k' -> 4096 (RULER's powers of two), '16k' -> 16384, '3000' -> 3000."""
    text = str(label).strip()
    match = re.fullmatch(r"(\d+)([kK]?)", text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"bad S-NIAH length {label!r}; use e.g. 1k, 4k, 16k or a token count")
    tokens = int(match.group(1)) * (1024 if match.group(2) else 1)
    if tokens > MAX_CONTEXT_TOKENS:
        raise ValueError(f"S-NIAH length {label!r} is past the {MAX_CONTEXT_TOKENS:,} tokens allowed")
    return tokens


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))                  # RULER: 7 digits
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _random_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _haystack_sentences(kind: str, books, rng: random.Random, gpt2, n_tokens: int) -> list[tuple[str, int]]:
    """(sentence, GPT-2 tokens of ' ' + sentence) until n_tokens are filled (never more); an
    essay's last sentence is cut at a word to fill them."""
    out, total = [], 0
    if kind == "noise":         # RULER's noise sentences in turn, endlessly: returns when the next would not fit
        for sentence, n in itertools.cycle([(s, len(gpt2.encode(" " + s))) for s in NOISE_SENTENCES]):
            if total + n > n_tokens:
                return out
            out.append((sentence, n))
            total += n

    def count(text):
        # ' ' + text, except that the prompt's first sentence has no space before it ("Colonel"
        # is 2 tokens, " Colonel" 1): the first one counts the longer, so no prompt is a token over
        n = len(gpt2.encode(" " + text))
        return n if out else max(n, len(gpt2.encode(text)))

    empty_windows = 0
    while True:                 # an essay: contiguous text of a random book from a random place
        _, sentences = window_sentences(books, rng, n_tokens - total)
        if not sentences:
            # a window of a real book is empty only when it starts in the book's last two
            # sentences; books of a sentence or two (damaged files) would loop here for ever
            empty_windows += 1
            if empty_windows == MAX_EMPTY_WINDOWS:
                raise ValueError(f"the essay haystack's books ({', '.join(name for name, _ in books)}) gave no whole "
                                 f"sentence in {MAX_EMPTY_WINDOWS} random windows: too little text (damaged files?)")
            continue
        empty_windows = 0
        for sentence, ids in zip(sentences, gpt2.encode_batch([" " + s for s in sentences])):
            n = len(ids) if out else count(sentence)
            if total + n > n_tokens:
                # the words of this sentence that fit end the haystack (RULER cuts its essays at
                # a word too): stopping at the whole sentence left a 1k haystack up to 13% short
                words = sentence.split(" ")
                lo, hi = 0, len(words) - 1              # binary search for the most words that fit
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if total + count(" ".join(words[:mid])) <= n_tokens else (lo, mid - 1)
                if lo:
                    part = " ".join(words[:lo])
                    out.append((part, count(part)))
                return out
            out.append((sentence, n))
            total += n


def _sample_rng(task: str, total: int, background: str, seed: int) -> random.Random:
    """The random stream of one S-NIAH cell's keys, values and haystacks."""
    return random.Random(f"niah-{task}-{total}-{background}-{seed}")


def _needle_and_budget(kind: str, key: str, value: str, length, total: int, gpt2) -> tuple:
    """-> (needle, answer prefix, GPT-2 tokens left for the haystack); a ValueError where the
    template, needle and the 128 answer tokens do not fit in `total`."""
    needle = NIAH_NEEDLE.format(type_needle_v=kind, key=key, value=value)
    answer_prefix = NIAH_ANSWER_PREFIX.format(type_needle_v=kind, query=key)
    frame = NIAH_TEMPLATE.format(type_needle_v=kind, context="", query=key) + answer_prefix
    budget = total - RULER_TOKENS_TO_GENERATE - len(gpt2.encode(frame)) - len(gpt2.encode(" " + needle))
    if budget < 0:
        raise ValueError(f"length {length} is too short for the S-NIAH template and the 128 answer tokens")
    return needle, answer_prefix, budget


def check_niah_length(task, length: int, background: str = "austen", seed: int = 0, gpt2=None,
                      data_dir: str | None = None) -> None:
    """build_niah's ValueError for a length too short for its first sample's template, without
    building a haystack: eval.niah's CLI checks every cell so before scoring the first (a later
    sample's longer key can still fail a length within a few tokens of that, when it is built)."""
    task = parse_task(task)
    rng = _sample_rng(task, length, background, seed)
    kind = TASKS[task]["value"]
    key, value = _random_key(rng), _random_value(kind, rng)      # sample 0's, drawn first as in build_niah
    _needle_and_budget(kind, key, value, length, length, gpt2 or length_tokenizer(data_dir))


def build_niah(task, length, n_samples: int, depths=DEFAULT_DEPTHS, background: str = "austen", seed: int = 0,
               n_distractors: int = DEFAULT_DISTRACTORS, data_dir: str | None = None, gpt2=None,
               books=None) -> list[dict]:
    """S-NIAH samples of `length` GPT-2 tokens (prompt + answer prefix + 128 reserved).
    Sample i puts its needle at depths[i % len(depths)]. Same arguments, same samples; the
    distractors come from a stream of their own per sample, so n_distractors changes no
    key, value or haystack. `books`: load_books(background, "test") where the caller has them."""
    task = parse_task(task)
    total = parse_length(length) if not isinstance(length, int) else length
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    depths = [float(d) for d in depths]
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be in [0, 1], got {depths}")
    spec = TASKS[task]
    gpt2 = gpt2 or length_tokenizer(data_dir)
    books = (books or load_books(background, "test", data_dir)) if spec["haystack"] == "essay" else None
    rng = _sample_rng(task, total, background, seed)
    samples = []
    for i in range(n_samples):
        key, value = _random_key(rng), _random_value(spec["value"], rng)
        needle, answer_prefix, budget = _needle_and_budget(spec["value"], key, value, length, total, gpt2)
        haystack = _haystack_sentences(spec["haystack"], books, rng, gpt2, budget)
        # the needle goes at the sentence boundary where the token fraction first reaches the depth
        depth = depths[i % len(depths)]
        haystack_tokens = sum(n for _, n in haystack)
        target, cumulative, gap = depth * haystack_tokens, 0, len(haystack)
        for j, (_, n) in enumerate(haystack):
            if cumulative >= target:
                gap = j
                break
            cumulative += n
        sentences = [s for s, _ in haystack]
        context = " ".join(sentences[:gap] + [needle] + sentences[gap:])
        distractors, distractor_rng = [], random.Random(f"niah-distractors-{task}-{total}-{seed}-{i}")
        while len(distractors) < n_distractors:
            candidate = _random_value(spec["value"], distractor_rng)
            if candidate != value and candidate not in distractors:
                distractors.append(candidate)
        samples.append({
            "task": task, "length": total, "depth": depth,
            "depth_actual": cumulative / max(1, haystack_tokens),
            "input": NIAH_TEMPLATE.format(type_needle_v=spec["value"], context=context, query=key),
            "answer_prefix": answer_prefix, "needle": needle, "key": key, "value": value,
            "distractors": distractors, "haystack": spec["haystack"] if books is None else background,
        })
    return samples


def string_match(value: str, output: str) -> bool:
    """RULER string_match_all with one reference."""
    return value.lower() in output.lower()


@torch.no_grad()
def evaluate_niah(model, tokenizer, samples, max_len: int | None = None, segment_len: int = 2048, device=None,
                  max_new_tokens: int = RULER_TOKENS_TO_GENERATE, overflow: str = "truncate",
                  streaming: bool | None = None, dtype: str = "auto") -> dict:
    """Greedy accuracy and ranking accuracy of `samples`; long inputs as in eval.babilong.evaluate."""
    streaming = check_long_inputs(model, overflow, streaming, max_len)
    device = device or model_device(model)
    records, started = [], time.time()
    with eval_mode(model):
        for sample in samples:
            ids = tokenizer.encode(sample["input"] + sample["answer_prefix"])
            record = {k: sample[k] for k in ("task", "length", "depth", "key", "value")}
            record["n_input_tokens"] = len(ids)
            value = sample["value"]
            candidates = [tokenizer.encode(" " + c) for c in [value] + list(sample.get("distractors", []))]
            ids, record["truncated"] = fit_prompt(ids, streaming, max_len, max_new_tokens, overflow, candidates)
            if ids is None:
                records.append({**record, "skipped": True})
                continue
            with bf16_autocast(device, dtype):
                last_logits, state = prefill(model, ids, segment_len, device)
                scores = continuation_logprobs(model, last_logits, state, candidates, device)
                # once the value is out, more tokens cannot change string_match: stop there
                output = greedy_generate(model, tokenizer, last_logits, state, max_new_tokens, device,
                                         stop=lambda text: string_match(value, text))
            # the value must beat every distractor: a tie (a model that cannot tell them apart,
            # e.g. uniform logits) is not a correct ranking
            record.update(output=output, correct=string_match(value, output),
                          ranking_correct=all(scores[0] > s for s in scores[1:]))
            records.append(record)
    scored = [r for r in records if not r.get("skipped")]
    return {"accuracy": mean_over_scored(scored, "correct"),
            "ranking_accuracy": mean_over_scored(scored, "ranking_correct"), "n": len(records),
            "n_scored": len(scored), "n_truncated": sum(r["truncated"] for r in records),
            "n_skipped": len(records) - len(scored), "seconds": time.time() - started, "records": records,
            "note": longest_input_note(model, scored)}


def _by_depth(records) -> dict:
    groups: dict = {}
    for r in records:
        if not r.get("skipped"):
            groups.setdefault(str(r["depth"]), []).append(r["correct"])
    return {depth: sum(v) / len(v) for depth, v in sorted(groups.items(), key=lambda kv: float(kv[0]))}


def tabulate_cell(tables: dict, task: str, length: str, r: dict) -> None:
    """Put one evaluate_niah result `r` in a results file's accuracy, ranking_accuracy and
    counts tables, under its task and length label (eval.niah's niah.json, eval.run's section)."""
    tables["accuracy"].setdefault(task, {})[length] = r["accuracy"]
    tables["ranking_accuracy"].setdefault(task, {})[length] = r["ranking_accuracy"]
    tables["counts"].setdefault(task, {})[length] = {k: r[k] for k in ("n", "n_scored", "n_truncated", "n_skipped",
                                                                       "seconds")}


def score_descriptions(n_distractors: int) -> dict:
    """What each score of a results file means (eval.niah's niah.json, eval.run's section)."""
    return {"accuracy": "greedy output contains the value (RULER string_match_all)",
            "ranking_accuracy": f"value beats each of {n_distractors} random values by log-likelihood "
                                "(a tie is wrong)"}


def run(args) -> dict:
    tasks = check_unique("--tasks", [parse_task(t) for t in args.tasks.split(",") if t.strip()])
    # label -> tokens; results are keyed by the labels, as in eval.run and eval.babilong
    labels = [x.strip() for x in args.lengths.split(",") if x.strip()]
    lengths = dict(zip(labels, check_unique("--lengths", [parse_length(x) for x in labels])))
    if not tasks or not lengths:
        raise ValueError("--tasks and --lengths must name at least one task and one length")
    check_data_dir(args.data_dir)
    model, cfg, tokenizer, device, max_len = load_for_generation(args)
    gpt2 = length_tokenizer(args.data_dir)
    # a length too short for the template fails here, not after the cells before it were
    # evaluated; each cell's samples are built just before it is scored (at 1M tokens one
    # cell's samples hold hundreds of MB)
    for task in tasks:
        for tokens in lengths.values():
            check_niah_length(task, tokens, args.background, args.seed, gpt2)
    # the essay books once (pg19 streams from the Hub), and missing ones before anything is scored
    books = (load_books(args.background, "test", args.data_dir)
             if any(TASKS[t]["haystack"] == "essay" for t in tasks) else None)
    results = {"benchmark": "s-niah (RULER niah_single_1/2/3)", "checkpoint": os.path.abspath(args.checkpoint),
               "arch": cfg.model.arch, "lengths_are": "GPT-2 tokens, prompt + 128 reserved for the answer",
               "background": args.background, "depths": args.depths,
               # nltk's Punkt or the regex splitter cut the essay haystacks: the samples differ with it
               "sentence_splitter": (sentence_splitter() if any(TASKS[t]["haystack"] == "essay" for t in tasks)
                                     else None),
               "scores": score_descriptions(args.distractors),
               "context_handling": context_handling(is_recurrent(model), max_len, args.segment_len, args.overflow,
                                                    args.max_new_tokens),
               "accuracy": {}, "ranking_accuracy": {}, "by_depth": {}, "counts": {}}
    per_cell = []
    for task, (length, tokens) in itertools.product(tasks, lengths.items()):
        samples = build_niah(task, tokens, args.samples, depths=args.depths, background=args.background,
                             seed=args.seed, n_distractors=args.distractors, data_dir=args.data_dir, gpt2=gpt2,
                             books=books)
        r = evaluate_niah(model, tokenizer, samples, max_len=max_len, segment_len=args.segment_len, device=device,
                          max_new_tokens=args.max_new_tokens, overflow=args.overflow, dtype=cfg.train.dtype)
        per_cell.append(r)
        tabulate_cell(results, task, length, r)
        results["by_depth"].setdefault(task, {})[length] = _by_depth(r["records"])
        print(f"{task} {length:>6}  accuracy {format_accuracy(r['accuracy'])}  "
              f"ranking {format_accuracy(r['ranking_accuracy'])}  "
              f"(n={r['n_scored']}, truncated {r['n_truncated']}, skipped {r['n_skipped']})")
    results["notes"] = notes_of(per_cell)
    for note in results["notes"]:
        print(f"note: {note}")
    path = write_json(os.path.join(args.out, "niah.json"), results)
    print(f"wrote {path}")
    return results


def main(argv=None):
    parser = OneLineArgumentParser(prog="python -m eval.niah", description="RULER S-NIAH-1/2/3 accuracy.")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tasks", default="1,2,3", help="niah_single_1,niah_single_2,niah_single_3 or 1,2,3")
    parser.add_argument("--lengths", default="1k,2k,4k", help="GPT-2 tokens: 4k = 4096, or a number")
    parser.add_argument("--samples", type=positive_int, default=50, help="samples per task and length")
    parser.add_argument("--depths", type=fraction_list, default=",".join(map(str, DEFAULT_DEPTHS)),
                        help="comma list of needle depths in [0, 1] (default %(default)s)")
    parser.add_argument("--background", default="austen", choices=BACKGROUNDS, help="essay haystack books")
    parser.add_argument("--distractors", type=positive_int, default=DEFAULT_DISTRACTORS,
                        help="random values ranked against the needle's (>= 1: with none, every ranking is right)")
    parser.add_argument("--segment-len", type=positive_int, default=2048)
    parser.add_argument("--max-len", type=positive_int, help="attention models: context (default cfg.train.seq_len)")
    parser.add_argument("--overflow", default="truncate", choices=("truncate", "skip"))
    parser.add_argument("--max-new-tokens", type=positive_int, default=RULER_TOKENS_TO_GENERATE)
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--data-dir", help=DATA_DIR_HELP)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, help="output folder (niah.json)")
    args = parser.parse_args(argv)
    with exit_on_error():
        return run(args)


if __name__ == "__main__":
    main()
