"""
BABILong (Kuratov et al., arXiv 2406.10149): bAbI facts hidden in long public-domain text,
built locally or loaded from the Hugging Face Hub, scored two ways, fine-tuned with a length
curriculum. Protocol: reference/evals.md §1.2-1.9.

    samples = build_babilong("qa1", "4k", n_samples=100)            # local construction (§1.2)
    samples = load_babilong_hf("qa1", "4k", limit=100)              # RMT-team/babilong (§1.4)
    result  = evaluate(model, tokenizer, samples, max_len=None)     # official + label-ranking scores

Construction (§1.2). Facts of one bAbI question (its story's statements before it) are
hidden at random sentence boundaries of background text, in their original order. The
background comes from public-domain books with disjoint train/test books: Austen's novels
(offline, shared/data/austen), the built-in KJV corpus (`data.builtin`: Old Testament =
train, New Testament = test) or PG19 (HF streaming; its own train/test split). Lengths are
GPT-2 tokens as in BABILong ("1k" = 1000 tokens, "1M" = 10^6), of which 300 are reserved
for the prompt; "0k" is the facts alone. Sentences come from NLTK's untrained Punkt
splitter when nltk is installed, else from the regex splitter below (the samples differ, so
each records its `splitter`); each background sentence has >= 10 GPT-2 tokens and the last
one is cut to hit the budget exactly. A question is kept when it has at most
(length - 300) // 8 - 1 facts: get_dataset_df's max_n_facts counts the question's row too.

Scores (§1.3), both reported and labelled:
  official       greedy generation, then BABILong's `compare_answers`: the target must be
                 the only task label in the first sentence of the output (labels named in
                 the question do not count);
  label_ranking  argmax of log p(" " + label | prompt) over the task's labels that the
                 question does not name (the same rule: they are never the answer).
The prompt is the official template (instruction / examples / post_prompt switchable) with
ANSWER_PREFIX ("\\nAnswer:") appended, for both scores and for fine-tuning.

Long inputs (eval.common, shared with eval.niah). The model interface
`logits, loss, state = model(idx, state=state)` is exact when a sequence is fed in segments
with the state carried. Recurrent models (Titans, HOPE) read any length that way, in
segments of `segment_len` tokens with constant memory. Attention models (Transformer,
HOPE-attention) keep a growing KV cache and read at most `max_len` tokens, prompt and answer
together: longer prompts are truncated to their last tokens or skipped (`overflow`), and the
result says which and how many.

CLI (docs/BABILONG.md):
    python -m eval.babilong eval --checkpoint DIR --tasks qa1,qa2 --lengths 0k,1k --samples N --out DIR
    python -m eval.babilong finetune --checkpoint DIR --tasks qa1 --lengths 0k,1k,2k --steps N --out DIR
    python -m eval.babilong build --tasks qa1 --lengths 4k --samples N --out FILE.jsonl
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import os
import random
import re
import time

import torch
import torch.nn.functional as F

from cli import (OneLineArgumentParser, check_hub, check_output_file, check_unique, non_negative_float,
                 non_negative_int, positive_float, positive_int, read_text, seed_int, write_atomic, write_json)
from eval.babi import TASK_LABELS, babi_path, babi_samples, generate_babi, read_babi, task_number
from eval.common import (DATA_DIR_HELP, MAX_CONTEXT_TOKENS, bf16_autocast, check_checkpoint_out, check_data_dir,
                         check_long_inputs, clipped_step, context_handling, context_limit, continuation_logprobs,
                         default_data_dir, eval_mode, exit_on_error, first_line, fit_prompt, format_accuracy,
                         greedy_generate, load_checkpoint, load_for_generation, longest_input_note,
                         mean_over_scored, model_device, notes_of, prefill, require_data_dir)

TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
PROMPT_RESERVE = 300            # create_tasks.py: every length minus 300 tokens for the prompt
MIN_SENTENCE_TOKENS = 10        # SentenceSampler(min_sentence_len=10)
MAX_BARREN_WINDOWS = 100        # background windows in a row without a usable sentence before giving up
ANSWER_PREFIX = "\nAnswer:"
OFFICIAL_MAX_NEW_TOKENS = 20    # run_model_on_babilong.py: greedy, max_new_tokens=20

HF_DATASETS = {"hf": "RMT-team/babilong", "hf-1k": "RMT-team/babilong-1k-samples"}
# The Hub's config names, exactly: length_tokens also reads "1K" or "01k" (as 1000 tokens),
# which the Hub does not have. 10M exists for qa1-qa5 only.
_HUB_LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k")
HF_LENGTHS = {"RMT-team/babilong": _HUB_LENGTHS + ("256k", "512k", "1M", "10M"),
              "RMT-team/babilong-1k-samples": _HUB_LENGTHS}
# The Hub repos changed layout once (an early revision had config = task, split = length), so
# a revision is passed explicitly and the loaded schema is checked. The commit hashes could
# not be looked up offline: "main" is used until they are filled in, and every result
# records the revision it asked for.
HF_REVISIONS = {"RMT-team/babilong": "main", "RMT-team/babilong-1k-samples": "main"}
PG19_HF = "emozilla/pg19"       # parquet copy of deepmind/pg19 (the original needs a loading script)

AUSTEN_BOOKS = {
    "train": ("emma", "mansfieldpark", "northangerabbey", "persuasion"),
    "test": ("prideprejudice", "sensesensibility"),
}
BACKGROUNDS = ("austen", "builtin", "pg19")

# Official prompt texts of qa1-qa5 (booydar/babilong `babilong/prompts.py`, Apache-2.0):
# reproduced character for character, because the official score depends on them.
PROMPT_TEMPLATE = ("{instruction}\n\n{examples}\n\n{post_prompt}\n\n"
                   "<context>\n{context}\n</context>\n\nQuestion: {question}")
# qa2 and qa3 share their rules about carried items (qa2's instruction has no space before them, as upstream)
_ITEM_RULES = ("You need to answer the question based only on the information from the facts.\n"
               "If a person got an item in the first location and travelled to the second location "
               "the item is also in the second location. "
               "If a person dropped an item in the first location and moved to the second location "
               "the item remains in the first location.")
TASK_PROMPTS = {
    "qa1": {
        "instruction":
            "I will give you context with the facts about positions of different persons hidden in some random text "
            "and a question. You need to answer the question based only on the information from the facts. "
            "If a person was in different locations, use the latest location to answer the question.",
        "examples":
            "<example>\n"
            "Charlie went to the hallway. Judith come back to the kitchen. Charlie travelled to balcony. "
            "Where is Charlie?\n"
            "Answer: The most recent location of Charlie is balcony.\n"
            "</example>\n\n"
            "<example>\n"
            "Alan moved to the garage. Charlie went to the beach. Alan went to the shop. Rouse "
            "travelled to balcony. Where is Alan?\n"
            "Answer: The most recent location of Alan is shop.\n"
            "</example>",
        "post_prompt":
            "Always return your answer in the following format: "
            "The most recent location of \u2019person\u2019 is \u2019location\u2019. "
            "Do not write anything else after that.",
    },
    "qa2": {
        "instruction":
            "I give you context with the facts about locations and actions of different persons "
            "hidden in some random text and a question." + _ITEM_RULES,
        "examples":
            "<example>\n"
            "Charlie went to the kitchen. Charlie got a bottle. Charlie moved to the balcony. "
            "Where is the bottle?\n"
            "Answer: The bottle is in the balcony.\n"
            "</example>\n"
            "<example>\n"
            "Alan moved to the garage. Alan got a screw driver. Alan moved to the kitchen. Where "
            "is the screw driver?\n"
            "Answer: The screw driver is in the kitchen.\n"
            "</example>",
        "post_prompt":
            "Always return your answer in the following format: The \u2019item\u2019 is in \u2019location\u2019. "
            "Do not write anything else after that.",
    },
    "qa3": {
        "instruction":
            "I give you context with the facts about locations and actions of different persons "
            "hidden in some random text and a question. " + _ITEM_RULES,
        "examples":
            "<example>\n"
            "John journeyed to the bedroom. Mary grabbed the apple. Mary went back to the bathroom. "
            "Daniel journeyed to the bedroom. Daniel moved to the garden. Mary travelled to the kitchen. "
            "Where was the apple before the kitchen?\n"
            "Answer: Before the kitchen the apple was in the bathroom.\n"
            "</example>\n"
            "<example>\n"
            "John went back to the bedroom. John went back to the garden. John went back to the kitchen. "
            "Sandra took the football. Sandra travelled to the garden. Sandra journeyed to the bedroom. "
            "Where was the football before the bedroom?\n"
            "Answer: Before the bedroom the football was in the garden.\n"
            "</example>",
        "post_prompt":
            "Always return your answer in the following format: "
            "Before the $location_1$ the $item$ was in the $location_2$. Do not write anything else after that.",
    },
    "qa4": {
        "instruction":
            "I will give you context with the facts about different people, their location and actions, hidden in "
            "some random text and a question. "
            "You need to answer the question based only on the information from the facts.",
        "examples":
            "<example>\n"
            "The hallway is south of the kitchen. The bedroom is north of the kitchen. "
            "What is the kitchen south of?\n"
            "Answer: bedroom\n"
            "</example>\n"
            "<example>\n"
            "The garden is west of the bedroom. The bedroom is west of the kitchen. What is west of the bedroom?\n"
            "Answer: garden\n"
            "</example>",
        "post_prompt":
            "Your answer should contain only one word - location. Do not write anything else after that.",
    },
    "qa5": {
        "instruction":
            "I will give you context with the facts about locations and their relations hidden in some random text "
            "and a question. You need to answer the question based only on the information from the facts.",
        "examples":
            "<example>\n"
            "Mary picked up the apple there. Mary gave the apple to Fred. Mary moved to the bedroom. "
            "Bill took the milk there. Who did Mary give the apple to?\n"
            "Answer: Fred\n"
            "</example>\n"
            "<example>\n"
            "Jeff took the football there. Jeff passed the football to Fred. Jeff got the milk there. "
            "Bill travelled to the bedroom. Who gave the football?\n"
            "Answer: Jeff\n"
            "</example>\n"
            "<example>\n"
            "Fred picked up the apple there. Fred handed the apple to Bill. Bill journeyed to the bedroom. "
            "Jeff went back to the garden. What did Fred give to Bill?\n"
            "Answer: apple\n"
            "</example>",
        "post_prompt":
            "Your answer should contain only one word. Do not write anything else after that. "
            "Do not explain your answer.",
    },
}


# -----------------------------------------------------------------------------
# names, lengths, paths

def parse_task(task) -> str:
    """'qa3' | 3 | '3' -> 'qa3'."""
    return f"qa{task_number(task)}"


def length_tokens(label: str) -> int:
    """'0k' -> 0, '4k' -> 4000, '1M' -> 1_000_000 (BABILong's decimal lengths)."""
    match = re.fullmatch(r"(\d+)([kKM])", str(label).strip())
    if not match:
        raise ValueError(f"bad BABILong length {label!r}; use e.g. 0k, 1k, 4k, 128k, 1M")
    tokens = int(match.group(1)) * (1_000_000 if match.group(2) == "M" else 1000)
    if tokens > MAX_CONTEXT_TOKENS:
        raise ValueError(f"BABILong length {label!r} is past the {MAX_CONTEXT_TOKENS // 1_000_000}M tokens allowed")
    return tokens


def parse_list(text: str, kind: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise ValueError(f"--{kind} is empty")
    if kind == "tasks":
        return check_unique("--tasks", [parse_task(x) for x in items])
    return check_unique("--lengths", items, [length_tokens(x) for x in items])


def check_hf_lengths(lengths, name: str):
    """Lengths that are configs of the Hub dataset `name` (HF_LENGTHS; another repo: any)."""
    accepted = HF_LENGTHS.get(name)
    for length in lengths:
        if accepted and length not in accepted:
            raise ValueError(f"{name} has no length {length!r}; its lengths are {', '.join(accepted)}")


def length_tokenizer(data_dir: str | None = None):
    """GPT-2 BPE, the unit of BABILong lengths, whatever the model's own tokenizer is."""
    from data.tokenizer import get_tokenizer
    try:
        return get_tokenizer("gpt2")
    except FileNotFoundError:
        data_dir = data_dir or default_data_dir()
        bpe_dir = os.path.join(data_dir, "tokenizers", "gpt2") if data_dir else None
        if bpe_dir and os.path.isdir(bpe_dir):
            return get_tokenizer("gpt2", bpe_dir=bpe_dir)
        raise


# -----------------------------------------------------------------------------
# background text

def _nltk_punkt() -> tuple:
    """(NLTK's Punkt splitter, its name), or (None, "regex") where nltk is not installed."""
    try:
        import nltk
    except ImportError:
        return None, "regex"
    # untrained, as BABILong: needs no nltk_data
    return nltk.PunktSentenceTokenizer(), f"nltk-punkt {nltk.__version__}"


def sentence_splitter() -> str:
    """The name of the splitter split_sentences uses here ("nltk-punkt 3.9.1" or "regex"). The
    two cut the background differently, so built samples and results record it."""
    return _nltk_punkt()[1]


# Fallback splitter: a sentence ends at . ! or ? (plus closing quotes/brackets) followed by
# whitespace and an upper-case letter or an opening quote, unless the word before the
# period is a title abbreviation ("Mr. Darcy").
_SENTENCE_END = re.compile(r"[.!?][\"'\u2019\u201d)\]]*\s+(?=[\"'\u2018\u201c(\[]?[A-Z])")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "col", "capt", "gen", "rev", "messrs", "esq", "sr", "jr", "lt"}


def split_sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text).strip()
    punkt, _ = _nltk_punkt()
    if punkt is not None:
        return [s for s in punkt.tokenize(text) if s]
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        words = text[start:match.start()].rsplit(" ", 1)
        if text[match.start()] == "." and words[-1].lower().strip("\"'(") in _ABBREVIATIONS:
            continue
        sentences.append(text[start:match.end()].strip())
        start = match.end()
    if start < len(text):
        sentences.append(text[start:].strip())
    return [s for s in sentences if s]


@functools.lru_cache(maxsize=8)
def _austen_books(data_dir: str, split: str) -> tuple:
    books = []
    for name in AUSTEN_BOOKS[split]:
        path = os.path.join(data_dir, "austen", f"{name}.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Austen novel {path} not found (expected shared/data/austen/)")
        text = read_text(path)
        if not text.strip():            # window_sentences would fail on it with "empty range for randrange()"
            raise ValueError(f"Austen novel {path} is empty")
        books.append((name, text))
    return tuple(books)


@functools.lru_cache(maxsize=4)
def _kjv_books(split: str) -> tuple:
    """The built-in KJV corpus by biblical book: Old Testament = train, New Testament = test."""
    from data.builtin import old_and_new_testaments
    old, new = old_and_new_testaments()
    books: dict[str, list[str]] = {}
    for chapter in old if split == "train" else new:
        title, _, verses = chapter.partition("\n\n")          # title "Book N"
        books.setdefault(title.rsplit(" ", 1)[0], []).append(verses)
    return tuple((name, "\n".join(verses)) for name, verses in books.items())


def _pg19_books(split: str, n_books: int) -> tuple:
    """The first `n_books` books of a PG19 split, streamed from the Hub."""
    try:
        import datasets
    except ImportError:
        raise ImportError("the pg19 background needs the package 'datasets' (pip install datasets)") from None
    hf_split = {"train": "train", "test": "test"}[split]
    try:
        check_hub(streaming=True)
        stream = datasets.load_dataset(PG19_HF, split=hf_split, streaming=True)
        books = []
        for row in stream:
            books.append((row.get("short_book_title") or f"pg19-{len(books)}", row["text"]))
            if len(books) >= n_books:
                break
    except Exception as e:  # offline, hub errors: one clear line
        raise ConnectionError(f"cannot stream {PG19_HF} ({hf_split}) from the Hugging Face Hub: {first_line(e)}; "
                              "offline, use --background austen or builtin") from None
    return tuple(books)


def load_books(background: str, split: str, data_dir: str | None = None, n_pg19_books: int = 20) -> tuple:
    """((name, text), ...) of one background source and split ('train' | 'test')."""
    if split not in ("train", "test"):
        raise ValueError(f"background split must be 'train' or 'test', got {split!r}")
    if background == "austen":
        return _austen_books(require_data_dir(data_dir, "the Austen background"), split)
    if background == "builtin":
        return _kjv_books(split)
    if background == "pg19":
        return _pg19_books(split, n_pg19_books)
    raise ValueError(f"unknown background {background!r}; choose from {', '.join(BACKGROUNDS)}")


def window_sentences(books, rng: random.Random, n_tokens: int) -> tuple[str, list[str]]:
    """(book name, sentences) of a window of a random book from a random place, of about 6
    characters per token wanted (at least 4000: the caller drops short sentences); the window's
    cut first and last sentences are left out, so the list may be empty. Shared with eval.niah."""
    name, text = books[rng.randrange(len(books))]
    start = rng.randrange(len(text))
    return name, split_sentences(text[start:start + max(4000, 6 * n_tokens)])[1:-1]


class BackgroundSampler:
    """BABILong's SentenceSampler: random book, random start, whole sentences of at least
    MIN_SENTENCE_TOKENS GPT-2 tokens, the last one cut so the total is exact."""

    def __init__(self, books, gpt2, rng: random.Random):
        if not books:
            raise ValueError("no background books")
        self.books, self.gpt2, self.rng = books, gpt2, rng
        self.used_books: set[str] = set()

    def sample(self, n_tokens: int) -> list[list[int]]:
        """Token lists of ' ' + sentence, n_tokens in total."""
        pieces, total, barren = [], 0, 0
        while total < n_tokens:
            # books with no sentence of MIN_SENTENCE_TOKENS (a damaged file) would loop forever;
            # real prose gives dozens per window, so this many empty windows in a row means none
            if barren == MAX_BARREN_WINDOWS:
                raise ValueError(f"no background sentence of at least {MIN_SENTENCE_TOKENS} GPT-2 tokens in "
                                 f"{barren} random windows of the books {', '.join(n for n, _ in self.books)}")
            name, sentences = window_sentences(self.books, self.rng, n_tokens - total)
            barren += 1
            for ids in self.gpt2.encode_batch([" " + s for s in sentences]):
                if len(ids) < MIN_SENTENCE_TOKENS:
                    continue
                take = min(len(ids), n_tokens - total)
                pieces.append(ids[:take])
                self.used_books.add(name)
                total += take
                barren = 0
                if total == n_tokens:
                    break
        return pieces


def hide_facts(fact_ids: list[list[int]], background: list[list[int]], rng: random.Random) -> tuple:
    """Insert the facts at random sentence boundaries, order kept (NoiseInjectionDataset):
    one uniform draw per fact among len(background)+1 gaps, sorted. -> (token ids, gaps)."""
    gaps = sorted(rng.randrange(len(background) + 1) for _ in fact_ids)
    ids, next_fact = [], 0
    for gap in range(len(background) + 1):
        while next_fact < len(fact_ids) and gaps[next_fact] == gap:
            ids += fact_ids[next_fact]
            next_fact += 1
        if gap < len(background):
            ids += background[gap]
    return ids, gaps


# -----------------------------------------------------------------------------
# samples: local construction and the Hub

def _fact_ids(item: dict, length: str, gpt2) -> list | None:
    """The GPT-2 ids of a question's facts when they fit in `length` with room for background
    (create_tasks.py: max_n_facts = budget // 8), else None; [] at "0k" (facts alone)."""
    budget = length_tokens(length) - PROMPT_RESERVE if length_tokens(length) > 0 else 0
    if budget == 0:
        return []
    # get_dataset_df counts the question's row with its facts (slc.shape[0] <= max_n_facts),
    # so at most budget // 8 - 1 facts are kept
    if len(item["facts"]) + 1 > budget // 8:
        return None
    fact_ids = gpt2.encode_batch([" " + fact for fact in item["facts"]])
    return fact_ids if sum(map(len, fact_ids)) < budget else None


def make_sample(item: dict, task: str, length: str, gpt2, sampler, rng: random.Random, split: str) -> dict | None:
    """One bAbI question (facts, question, answer) -> a BABILong sample of `length`, or None
    when its facts do not fit. Keys: task, length, input (the context), question, target,
    facts, n_tokens (GPT-2 tokens of the context), books (background used), splitter (the
    sentence splitter that cut the background, None at 0k), split."""
    sample = {"task": task, "length": length, "question": item["question"], "target": item["answer"],
              "facts": item["facts"], "split": split}
    if length_tokens(length) == 0:                   # "0k": the facts alone
        context = " ".join(item["facts"])
        return {**sample, "input": context, "n_tokens": len(gpt2.encode(context)), "books": [], "splitter": None}
    fact_ids = _fact_ids(item, length, gpt2)
    if fact_ids is None:
        return None
    sampler.used_books = set()
    background = length_tokens(length) - PROMPT_RESERVE - sum(map(len, fact_ids))
    ids, _ = hide_facts(fact_ids, sampler.sample(background), rng)
    return {**sample, "input": gpt2.decode(ids).strip(), "n_tokens": len(ids), "books": sorted(sampler.used_books),
            "splitter": sentence_splitter()}


def _check_length(length: str):
    if 0 < length_tokens(length) <= PROMPT_RESERVE:
        raise ValueError(f"length {length} leaves no room after the {PROMPT_RESERVE} prompt tokens")


def build_babilong(task, length: str, n_samples: int, split: str = "test", background: str = "austen",
                   babi: str = "file", seed: int = 0, data_dir: str | None = None, gpt2=None) -> list[dict]:
    """BABILong samples built locally (evals.md §1.2): the first `n_samples` questions of the
    bAbI `split` (released file or generator) whose facts fit, each hidden in background
    text from the books of the same split. Same arguments, same samples."""
    task = parse_task(task)
    _check_length(length)
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    gpt2 = gpt2 or length_tokenizer(data_dir)
    questions = _babi_questions(task, n_samples, split, babi, seed, data_dir)
    rng = random.Random(f"babilong-{task}-{length}-{split}-{background}-{seed}")
    sampler = BackgroundSampler(load_books(background, split, data_dir), gpt2, rng) if length_tokens(length) else None
    out = []
    for item in questions:
        if len(out) == n_samples:
            break
        sample = make_sample(item, task, length, gpt2, sampler, rng, split)
        if sample is not None:
            out.append(sample)
    _check_enough(len(out), n_samples, task, split, length)
    return out


def check_enough_questions(task, length: str, n_samples: int, split: str = "test", babi: str = "file",
                           seed: int = 0, data_dir: str | None = None, gpt2=None) -> None:
    """build_babilong's shortfall error, from the facts alone (no background is sampled): a
    CLI checks every cell with it before the first is scored."""
    task = parse_task(task)
    _check_length(length)
    gpt2 = gpt2 or length_tokenizer(data_dir)
    fitting = 0
    for item in _babi_questions(task, n_samples, split, babi, seed, data_dir):
        if fitting == n_samples:
            break
        fitting += _fact_ids(item, length, gpt2) is not None
    _check_enough(fitting, n_samples, task, split, length)


def _check_enough(fitting: int, n_samples: int, task: str, split: str, length: str):
    if fitting < n_samples:
        raise ValueError(f"only {fitting} {task} questions of the bAbI {split} data fit in {length}; "
                         f"asked for {n_samples}")


def _babi_questions(task: str, n_samples: int, split: str, babi: str, seed: int, data_dir) -> list[dict]:
    """The bAbI questions samples are drawn from, in order: the released file's, or generated."""
    if babi == "file":
        return babi_samples(read_babi(babi_path(task, split, require_data_dir(data_dir, "the bAbI files"))))
    if babi == "generated":
        # qa4 has one question per story, the others five; a few spare for those that do not fit
        n_stories = n_samples if task == "qa4" else math.ceil(n_samples / 5)
        return babi_samples(generate_babi(task, n_stories + 8, seed=seed, split=split))
    raise ValueError(f"unknown bAbI source {babi!r}; choose 'file' or 'generated'")


def training_questions(task: str, babi: str, data_dir: str | None, seed: int):
    """Endless bAbI training questions of a task: the en train file reshuffled every pass,
    or fresh generated stories (never the test split). The file is read now, not at the
    first question, so a missing or question-less one fails before fine-tuning starts."""
    if babi == "file":
        path = babi_path(task, "train", require_data_dir(data_dir, "the bAbI files"))
        pool = babi_samples(read_babi(path))
        if not pool:                      # its passes would spin forever without a question
            raise ValueError(f"bAbI file {path} holds no questions")
        pools = itertools.repeat(pool)
    elif babi == "generated":
        pools = (babi_samples(generate_babi(task, 50, seed=seed * 100_003 + round_index))
                 for round_index in itertools.count())
    else:
        raise ValueError(f"unknown bAbI source {babi!r}; choose 'file' or 'generated'")
    return _shuffled_passes(pools, random.Random(f"babilong-train-{task}-{seed}"))


def _shuffled_passes(pools, rng: random.Random):
    """The questions of each pool in turn, each pool in a shuffled order."""
    for pool in pools:
        order = list(range(len(pool)))
        rng.shuffle(order)
        for i in order:
            yield pool[i]


def load_babilong_hf(task, length: str, limit: int | None = None, dataset: str = "hf",
                     revision: str | None = None) -> list[dict]:
    """RMT-team/babilong[-1k-samples] from the Hub: config = length, split = task (§1.4)."""
    task = parse_task(task)
    length_tokens(length)
    name = HF_DATASETS.get(dataset, dataset)
    check_hf_lengths([length], name)
    revision = revision or HF_REVISIONS.get(name, "main")
    try:
        import datasets
    except ImportError:
        raise ImportError("loading BABILong from the Hub needs the package 'datasets' (pip install datasets)") from None
    try:
        check_hub(streaming=True)
        # streaming: the 1M configs hold ~4 MB per sample, so read only what is asked for (not
        # one row more: a loop that stops when it sees row limit + 1 has already fetched it)
        stream = datasets.load_dataset(name, length, split=task, revision=revision, streaming=True)
        rows = list(itertools.islice(stream, limit))
    except Exception as e:
        raise ConnectionError(f"cannot load {name} (config {length}, split {task}, revision {revision}) from the "
                              f"Hugging Face Hub: {first_line(e)}; offline, use --source local") from None
    if rows and not {"input", "question", "target"} <= set(rows[0]):
        raise ValueError(f"{name}@{revision} rows have fields {sorted(rows[0])}, expected input/question/target "
                         "(an old revision with config = task and split = length?)")
    return [{"task": task, "length": length, "input": row["input"], "question": row["question"],
             "target": row["target"], "source": f"{name}@{revision}"} for row in rows]


# -----------------------------------------------------------------------------
# prompt and scoring

def format_prompt(context: str, question: str, task, instruction: bool = False, examples: bool = False,
                  post_prompt: bool = False) -> str:
    """The official template, each part switchable as in run_model_on_babilong.py."""
    parts = TASK_PROMPTS[parse_task(task)]
    text = PROMPT_TEMPLATE.format(instruction=parts["instruction"] if instruction else "",
                                  examples=parts["examples"] if examples else "",
                                  post_prompt=parts["post_prompt"] if post_prompt else "",
                                  context=context.strip(), question=question)
    return text.strip()


def prompt_setting_name(instruction: bool, examples: bool, post_prompt: bool) -> str:
    """The official result-file naming, e.g. 'instruction_no_examples_no_post_prompt_no'."""
    yes = {True: "yes", False: "no"}
    return f"instruction_{yes[instruction]}_examples_{yes[examples]}_post_prompt_{yes[post_prompt]}"


def _preprocess_output(output: str) -> str:
    output = output.lower()
    output = output.split(".")[0]                        # the first sentence only
    # cut where the model starts a new example. The official code also splits on 'Question'
    # after lower-casing, which never matches: kept as is, so the score stays the official one.
    for marker in ("<context>", "<example>", "Question"):
        output = output.split(marker)[0]
    return output


def first_sentence_done(text: str) -> bool:
    """compare_answers reads only the text before the first '.': nothing after it can matter,
    so greedy generation stops there."""
    return "." in text


LABEL_RANKING = "argmax over the TASK_LABELS not named in the question of log p(' ' + label | prompt)"


def labels_in_question(question: str, task_labels) -> set:
    """The task labels (lower-cased) that occur in the question: metrics.py's "mentions in
    questions are never targets", shared by compare_answers and label ranking."""
    return {label.lower() for label in task_labels if label.lower() in question.lower()}


def compare_answers(target: str, output: str, question: str, task_labels) -> bool:
    """BABILong's official rule (metrics.py): correct iff the target is the only task label
    in the output's first sentence, ignoring labels that occur in the question. A target
    'a,b' (qa8) needs every part found and nothing else."""
    output = _preprocess_output(output)
    labels = {label.lower() for label in task_labels}
    found = {label for label in labels if label in output} - labels_in_question(question, labels)
    targets = {t.strip() for t in target.lower().split(",")}
    return found == targets


def same_answer(label: str | None, target: str) -> bool:
    """label_ranking's rule: the ranked label is the target, ignoring case and surrounding
    spaces as compare_answers does (None: no candidate was ranked)."""
    return label is not None and label.strip().lower() == target.strip().lower()


# -----------------------------------------------------------------------------
# evaluating a model (long inputs: eval.common)

@torch.no_grad()
def evaluate(model, tokenizer, samples, max_len: int | None = None, segment_len: int = 2048, device=None,
             max_new_tokens: int = OFFICIAL_MAX_NEW_TOKENS, overflow: str = "truncate", instruction: bool = False,
             examples: bool = False, post_prompt: bool = False, answer_prefix: str = ANSWER_PREFIX,
             streaming: bool | None = None, dtype: str = "auto") -> dict:
    """Both scores on `samples` (dicts with task, input, question, target).

    Recurrent models (or streaming=True) read the whole input in segments of `segment_len`.
    Attention models read at most `max_len` tokens, prompt and answer together: prompts over
    max_len - max_new_tokens tokens are cut to their last that many (overflow='truncate') or
    left out (overflow='skip').
    Returns accuracies, counts, how long inputs were handled, and one record per sample.
    """
    streaming = check_long_inputs(model, overflow, streaming, max_len)
    if segment_len < 1 or max_new_tokens < 1:
        raise ValueError("segment_len and max_new_tokens must be >= 1")
    device = device or model_device(model)
    label_ids_cache: dict = {}
    records = []
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.time()
    with eval_mode(model):
        for sample in samples:
            task = parse_task(sample["task"])
            prompt = format_prompt(sample["input"], sample["question"], task, instruction, examples, post_prompt)
            ids = tokenizer.encode(prompt + answer_prefix)
            record = {"task": task, "length": sample.get("length"), "question": sample["question"],
                      "target": sample["target"], "n_input_tokens": len(ids)}
            labels = TASK_LABELS[task]
            # ranked as compare_answers scores: a label the question names is never the answer
            named = labels_in_question(sample["question"], labels)
            candidates = [label for label in labels if label.lower() not in named]
            for label in candidates:
                if label not in label_ids_cache:
                    label_ids_cache[label] = tokenizer.encode(" " + label)
            # the prompt keeps room for the longest label too: " bathroom" is 9 byte tokens, so
            # after --max-new-tokens 4 its score read past max_len
            ids, record["truncated"] = fit_prompt(ids, streaming, max_len, max_new_tokens, overflow,
                                                  [label_ids_cache[label] for label in candidates])
            if ids is None:
                records.append({**record, "skipped": True})
                continue
            with bf16_autocast(device, dtype):
                last_logits, state = prefill(model, ids, segment_len, device)
                scores = dict(zip(candidates, continuation_logprobs(
                    model, last_logits, state, [label_ids_cache[label] for label in candidates], device)))
                output = greedy_generate(model, tokenizer, last_logits, state, max_new_tokens, device,
                                         stop=first_sentence_done)
            ranked = max(candidates, key=scores.__getitem__, default=None)
            record.update({"output": output, "official_correct": compare_answers(sample["target"], output,
                                                                                 sample["question"], labels),
                           "label_ranking_prediction": ranked, "label_ranking_correct": same_answer(ranked, sample["target"]),
                           "label_logprobs": scores})
            records.append(record)
    scored = [r for r in records if not r.get("skipped")]
    return {
        "official": mean_over_scored(scored, "official_correct"),
        "label_ranking": mean_over_scored(scored, "label_ranking_correct"),
        "n": len(records), "n_scored": len(scored), "n_truncated": sum(r["truncated"] for r in records),
        "n_skipped": len(records) - len(scored),
        "context_handling": context_handling(streaming, max_len, segment_len, overflow, max_new_tokens),
        "mean_input_tokens": sum(r["n_input_tokens"] for r in records) / len(records) if records else 0,
        "peak_memory_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                           if torch.device(device).type == "cuda" else None),
        "seconds": time.time() - started, "records": records,
        "note": longest_input_note(model, scored),
    }


# -----------------------------------------------------------------------------
# results: JSON and heatmap

def _length_order(lengths):
    return sorted(lengths, key=length_tokens)


def plot_heatmap(results: dict, path: str, title: str = "BABILong accuracy (%)") -> str:
    """One panel per score: tasks x lengths, cells annotated with accuracy in %."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scores = [s for s in ("official", "label_ranking") if results.get(s)]
    if not scores:
        raise ValueError("no scores to plot")
    tasks = sorted(results[scores[0]], key=task_number)
    lengths = _length_order({length for s in scores for t in tasks for length in results[s][t]})
    fig, axes = plt.subplots(1, len(scores), figsize=(1.1 * len(lengths) * len(scores) + 2, 0.6 * len(tasks) + 1.6),
                             squeeze=False)
    for ax, score in zip(axes[0], scores):
        grid = [[results[score][t].get(length) for length in lengths] for t in tasks]
        values = [[float("nan") if v is None else 100 * v for v in row] for row in grid]
        image = ax.imshow(values, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_title(score.replace("_", " "))
        for r, row in enumerate(values):
            for c, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _summarise(per_cell: dict) -> dict:
    """{(task, length): evaluate() result} -> the JSON tables."""
    table = {"official": {}, "label_ranking": {}, "counts": {}}
    for (task, length), r in per_cell.items():
        for score in ("official", "label_ranking"):
            table[score].setdefault(task, {})[length] = r[score]
        table["counts"].setdefault(task, {})[length] = {
            k: r[k] for k in ("n", "n_scored", "n_truncated", "n_skipped", "mean_input_tokens", "peak_memory_mb",
                              "seconds")}
    lengths = _length_order({length for _, length in per_cell})
    # the leaderboard number: mean over tasks (qa1-qa5) per length, over the tasks with a score
    # there (a cell with nothing scored, every input skipped, is left out, not counted as 0);
    # n_tasks_in_mean says how many, and a note names a mean over fewer than all the tasks
    table["mean_over_tasks"], table["n_tasks_in_mean"] = {}, {}
    incomplete = []
    for score in ("official", "label_ranking"):
        means, counts = {}, {}
        for length in lengths:
            values = [cells[length] for cells in table[score].values() if cells.get(length) is not None]
            means[length] = sum(values) / len(values) if values else None
            counts[length] = len(values)
            if len(values) < len(table[score]):
                incomplete.append(f"{score} {length}: {len(values)} of {len(table[score])}")
        table["mean_over_tasks"][score] = means
        table["n_tasks_in_mean"][score] = counts
    table["notes"] = notes_of(per_cell.values())
    if incomplete:
        table["notes"].append("mean_over_tasks averages only the tasks with a scored sample (the others had every "
                              "input skipped): " + "; ".join(incomplete))
    return table


# -----------------------------------------------------------------------------
# fine-tuning with a length curriculum (BABILong protocol: small models are fine-tuned first)

def training_example(tokenizer, sample: dict, max_len: int | None = None) -> tuple[list[int], list[int]]:
    """(input ids, targets): the default prompt (format_prompt with no instruction, examples or
    post prompt) + ANSWER_PREFIX + ' ' + answer + end-of-text, loss only on the answer and
    end-of-text tokens (targets -1 elsewhere). Attention models keep the last max_len tokens."""
    prompt = format_prompt(sample["input"], sample["question"], sample["task"])
    prompt_ids = tokenizer.encode(prompt + ANSWER_PREFIX)
    answer_ids = tokenizer.encode(" " + sample["target"]) + [tokenizer.eot_id]
    ids = prompt_ids + answer_ids
    targets = [-1] * (len(prompt_ids) - 1) + answer_ids + [-1]    # position t predicts ids[t + 1]
    if max_len is not None and len(ids) > max_len:
        ids, targets = ids[-max_len:], targets[-max_len:]
    return ids, targets


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def curriculum_stage(step: int, total_steps: int, n_stages: int) -> int:
    """Equal shares of the steps per length, shortest first."""
    return min(n_stages - 1, step * n_stages // max(1, total_steps))


def finetune(model, cfg, tokenizer, tasks, lengths, steps: int, out_dir: str, lr: float = 1e-4,
             batch_size: int = 4, weight_decay: float = 0.01, grad_clip: float = 1.0, babi: str = "generated",
             background: str = "austen", seed: int = 0, data_dir: str | None = None, max_len: int | None = None,
             device=None, log_every: int = 1) -> str:
    """AdamW on bAbI-train facts in train-book background, lengths in increasing order;
    saves a checkpoint that checkpoint.load_model reads. Returns its directory. out_dir must
    hold no checkpoints (saving there would replace or prune them). A step whose loss or
    gradient norm is not finite is skipped (not applied) and logged as such, with null for
    the non-finite values."""
    from checkpoint import save_checkpoint
    if steps < 1 or batch_size < 1:
        raise ValueError("--steps and --batch-size must be >= 1")
    if steps < len(lengths):        # curriculum_stage would give some lengths no step at all
        raise ValueError(f"--steps {steps} is fewer than the {len(lengths)} --lengths: each length needs a step")
    if max_len is not None and max_len < 2:      # the kept tokens would hold no answer target: every loss 0/0
        raise ValueError(f"--max-len must be >= 2 to keep an answer token to train on, got {max_len}")
    check_checkpoint_out(out_dir)
    device = device or model_device(model)
    lengths = _length_order(lengths)
    for length in lengths:
        _check_length(length)
    gpt2 = length_tokenizer(data_dir)
    # the precision training ran at (train.setup_precision): bf16 autocast on CUDA unless the
    # config trained in float32; fp32 on CPU
    autocast = functools.partial(bf16_autocast, device, cfg.train.dtype)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    questions = {t: training_questions(t, babi, data_dir, seed) for t in tasks}
    books = load_books(background, "train", data_dir)
    rng = random.Random(f"babilong-finetune-{seed}")
    sampler = BackgroundSampler(books, gpt2, rng)
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "finetune_log.jsonl")
    skipped = 0
    with open(log_path, "w") as log:
        for step in range(steps):
            length = lengths[curriculum_stage(step, steps, len(lengths))]
            optimizer.zero_grad(set_to_none=True)
            total_loss = 0.0
            batch = []
            while len(batch) < batch_size:
                task = rng.choice(tasks)
                sample = make_sample(next(questions[task]), task, length, gpt2, sampler, rng, "train")
                if sample is not None:                   # None: too many facts for this length
                    batch.append(training_example(tokenizer, sample, max_len=max_len))
            batch_answer_tokens = sum(sum(t != -1 for t in targets) for _, targets in batch)
            for ids, targets in batch:
                idx = torch.tensor([ids], dtype=torch.long, device=device)
                tgt = torch.tensor(targets, dtype=torch.long, device=device)
                with autocast():
                    logits, _, _ = model(idx, return_state=False)
                # sum over this example's answer tokens, normalised by the whole batch's count; only
                # the answer rows go through the fp32 log-softmax (over every row it held two more
                # fp32 [T, vocab] tensors: 8K tokens x GPT-2's vocabulary are 1.6 GB each)
                answer = tgt != -1
                loss = F.cross_entropy(logits[0, answer].float(), tgt[answer], reduction="sum") / batch_answer_tokens
                loss.backward()
                total_loss += loss.item()
            grad_norm, applied = clipped_step(model, optimizer, total_loss, grad_clip)
            skip = not applied
            skipped += skip
            # null for a non-finite loss or norm, as train.py's metrics.jsonl: NaN and Infinity are not JSON
            entry = {"step": step + 1, "length": length, "loss": _finite_or_none(total_loss),
                     "answer_tokens": batch_answer_tokens, "grad_norm": _finite_or_none(grad_norm), "skipped": skip}
            log.write(json.dumps(entry, allow_nan=False) + "\n")
            log.flush()
            if log_every and ((step + 1) % log_every == 0 or step + 1 == steps or skip):
                print(f"step {step + 1}/{steps}  length {length}  answer loss {total_loss:.4f}"
                      + ("  skipped: non-finite loss or gradient" if skip else ""))
    if skipped:
        print(f"{skipped} of {steps} steps skipped (non-finite loss or gradient)")
    cfg.train.out_dir = out_dir
    trainer_state = {"step": steps, "finetune": {"tasks": list(tasks), "lengths": list(lengths), "lr": lr,
                                                 "batch_size": batch_size, "babi": babi, "background": background,
                                                 "skipped_steps": skipped, "sentence_splitter": sentence_splitter(),
                                                 "compute": "bf16" if isinstance(autocast(), torch.autocast)
                                                 else "fp32"}}
    model.eval()
    return save_checkpoint(os.path.join(out_dir, "checkpoints"), steps, model, optimizer, trainer_state, cfg)


# -----------------------------------------------------------------------------
# CLI

def _get_samples(args, task, length, gpt2):
    if args.source == "local":
        return build_babilong(task, length, args.samples, split=args.split, background=args.background,
                              babi=args.babi, seed=args.seed, data_dir=args.data_dir, gpt2=gpt2)
    return load_babilong_hf(task, length, limit=args.samples, dataset=args.source, revision=args.revision)


# eval's flags that shape only the local construction, with their defaults: they default to None
# in the parser, so --source hf can refuse the ones given
EVAL_LOCAL_DEFAULTS = {"split": "test", "background": "austen", "babi": "file", "seed": 0}


def _check_source_flags(args, lengths):
    """--source local builds the samples, hf / hf-1k reads the Hub's: a flag of the other
    source would change nothing, so one given is an error. Fills the local defaults."""
    if args.source == "local":
        if args.revision is not None:
            raise ValueError("--revision applies to --source hf and hf-1k only")
        for key, default in EVAL_LOCAL_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, default)
        return
    given = ["--" + key.replace("_", "-") for key in (*EVAL_LOCAL_DEFAULTS, "data_dir")
             if getattr(args, key) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --source local only")
    check_hf_lengths(lengths, HF_DATASETS[args.source])


def run_eval(args) -> dict:
    tasks, lengths = parse_list(args.tasks, "tasks"), parse_list(args.lengths, "lengths")
    _check_source_flags(args, lengths)
    gpt2 = length_tokenizer(args.data_dir) if args.source == "local" else None
    if args.source == "local":          # every cell has its samples, before the first is scored
        for task in tasks:
            for length in lengths:
                check_enough_questions(task, length, args.samples, split=args.split, babi=args.babi, seed=args.seed,
                                       data_dir=args.data_dir, gpt2=gpt2)
    model, cfg, tokenizer, device, max_len = load_for_generation(args)
    per_cell, samples_out = {}, []
    for task in tasks:
        for length in lengths:
            samples = _get_samples(args, task, length, gpt2)
            result = evaluate(model, tokenizer, samples, max_len=max_len, segment_len=args.segment_len, device=device,
                              max_new_tokens=args.max_new_tokens, overflow=args.overflow,
                              instruction=args.instruction, examples=args.examples, post_prompt=args.post_prompt,
                              answer_prefix=args.answer_prefix, dtype=cfg.train.dtype)
            per_cell[(task, length)] = result
            samples_out += result["records"]
            print(f"{task:>4} {length:>5}  official {format_accuracy(result['official'])}  "
                  f"label-ranking {format_accuracy(result['label_ranking'])}  "
                  f"(n={result['n_scored']}, truncated {result['n_truncated']}, skipped {result['n_skipped']})")
    source = ("local: bAbI " + ("en " + args.split + " files" if args.babi == "file" else "generator")
              + f" + {args.background} {args.split} books" if args.source == "local"
              else f"{HF_DATASETS[args.source]}@{args.revision or HF_REVISIONS[HF_DATASETS[args.source]]}")
    results = {
        "benchmark": "babilong", "checkpoint": os.path.abspath(args.checkpoint), "arch": cfg.model.arch,
        "tokenizer": cfg.data.tokenizer, "source": source,
        "sentence_splitter": sentence_splitter() if args.source == "local" else None,
        "lengths_are": "GPT-2 tokens of the context, 300 reserved for the prompt",
        "prompt": prompt_setting_name(args.instruction, args.examples, args.post_prompt),
        "answer_prefix": args.answer_prefix,
        "scores": {"official": f"greedy generation (max_new_tokens={args.max_new_tokens}), BABILong compare_answers",
                   "label_ranking": LABEL_RANKING},
        "context_handling": next(iter(per_cell.values()))["context_handling"],
        **_summarise(per_cell),
    }
    for note in results["notes"]:
        print(f"note: {note}")
    json_path = write_json(os.path.join(args.out, "babilong.json"), results)
    write_atomic(os.path.join(args.out, "babilong_samples.jsonl"),
                 "".join(json.dumps(record) + "\n" for record in samples_out))
    png = plot_heatmap(results, os.path.join(args.out, "babilong_heatmap.png"),
                       title=f"BABILong accuracy (%), {cfg.model.arch}")
    print(f"wrote {json_path} and {png}")
    return results


def run_finetune(args) -> str:
    tasks, lengths = parse_list(args.tasks, "tasks"), parse_list(args.lengths, "lengths")
    check_checkpoint_out(args.out, args.checkpoint)          # before loading: never into checkpoints
    model, cfg, tokenizer, device = load_checkpoint(args.checkpoint, args.device)
    max_len = context_limit(model, args.max_len if args.max_len is not None else cfg.train.seq_len)
    path = finetune(model, cfg, tokenizer, tasks, lengths, args.steps, args.out, lr=args.lr,
                    batch_size=args.batch_size, weight_decay=args.weight_decay, babi=args.babi,
                    background=args.background, seed=args.seed, data_dir=args.data_dir, max_len=max_len,
                    device=device, log_every=args.log_every)
    print(f"saved {path}")
    return path


def run_build(args) -> str:
    tasks, lengths = parse_list(args.tasks, "tasks"), parse_list(args.lengths, "lengths")
    check_output_file(args.out)
    gpt2 = length_tokenizer(args.data_dir)
    n = 0

    def write_samples(path):
        nonlocal n
        with open(path, "w") as f:
            for task in tasks:
                for length in lengths:
                    for sample in build_babilong(task, length, args.samples, split=args.split,
                                                 background=args.background, babi=args.babi, seed=args.seed,
                                                 data_dir=args.data_dir, gpt2=gpt2):
                        f.write(json.dumps(sample) + "\n")
                        n += 1
    write_atomic(args.out, write_samples)                # a failed build leaves an existing --out as it was
    print(f"wrote {n} samples to {args.out} (background sentences split by {sentence_splitter()})")
    return args.out


def _add_common(p, babi_default):
    p.add_argument("--tasks", default="qa1,qa2,qa3,qa4,qa5", help="comma list of qa1..qa5")
    p.add_argument("--lengths", default="0k,1k,2k,4k", help="comma list, e.g. 0k,1k,4k,128k,1M (GPT-2 tokens)")
    p.add_argument("--background", default="austen", choices=BACKGROUNDS, help="background books (default austen)")
    p.add_argument("--babi", default=babi_default, choices=("file", "generated"),
                   help=f"bAbI questions: the released en files or the generator (default {babi_default})")
    p.add_argument("--seed", type=seed_int, default=0, help="(default 0)")
    p.add_argument("--data-dir", help=DATA_DIR_HELP)


def main(argv=None):
    parser = OneLineArgumentParser(prog="python -m eval.babilong", description="BABILong: build, evaluate, fine-tune.")
    sub = parser.add_subparsers(dest="command", required=True)

    p_eval = sub.add_parser("eval", help="evaluate a checkpoint; writes babilong.json + babilong_heatmap.png")
    p_eval.add_argument("--checkpoint", required=True)
    _add_common(p_eval, babi_default=EVAL_LOCAL_DEFAULTS["babi"])
    p_eval.add_argument("--samples", type=positive_int, default=100, help="samples per task and length")
    p_eval.add_argument("--out", required=True, help="output folder")
    p_eval.add_argument("--source", default="local", choices=("local",) + tuple(HF_DATASETS),
                        help="local construction, or RMT-team/babilong (hf) / babilong-1k-samples (hf-1k)")
    p_eval.add_argument("--revision", help="Hub revision (default: HF_REVISIONS in eval/babilong.py)")
    p_eval.add_argument("--split", choices=("train", "test"), help="local: bAbI and book split (default test)")
    p_eval.add_argument("--segment-len", type=positive_int, default=2048, help="tokens per streamed segment")
    p_eval.add_argument("--max-len", type=positive_int, help="attention models: context (default cfg.train.seq_len)")
    p_eval.add_argument("--overflow", default="truncate", choices=("truncate", "skip"),
                        help="attention models: inputs over --max-len")
    p_eval.add_argument("--max-new-tokens", type=positive_int, default=OFFICIAL_MAX_NEW_TOKENS)
    p_eval.add_argument("--instruction", action="store_true", help="official prompt: include the instruction")
    p_eval.add_argument("--examples", action="store_true", help="official prompt: include the examples")
    p_eval.add_argument("--post-prompt", action="store_true", help="official prompt: include the post prompt")
    p_eval.add_argument("--answer-prefix", default=ANSWER_PREFIX, help="text after the prompt (default '\\nAnswer:')")
    p_eval.add_argument("--device", default="auto")
    # the construction flags default to None here: run_eval refuses them with --source hf
    p_eval.set_defaults(**dict.fromkeys(EVAL_LOCAL_DEFAULTS))

    p_ft = sub.add_parser("finetune", help="fine-tune with a length curriculum; saves a checkpoint")
    p_ft.add_argument("--checkpoint", required=True)
    _add_common(p_ft, babi_default="generated")
    p_ft.add_argument("--steps", type=positive_int, required=True)
    p_ft.add_argument("--out", required=True,
                      help="output folder (checkpoints/ inside); not one that already holds checkpoints")
    p_ft.add_argument("--lr", type=positive_float, default=1e-4)
    p_ft.add_argument("--batch-size", type=positive_int, default=4)
    p_ft.add_argument("--weight-decay", type=non_negative_float, default=0.01)
    p_ft.add_argument("--max-len", type=positive_int, help="attention models: context (default cfg.train.seq_len)")
    p_ft.add_argument("--log-every", type=non_negative_int, default=10, help="steps between log lines (0: none)")
    p_ft.add_argument("--device", default="auto")

    p_build = sub.add_parser("build", help="write locally built samples as JSON lines")
    _add_common(p_build, babi_default="file")
    p_build.add_argument("--samples", type=positive_int, default=100)
    p_build.add_argument("--split", default="test", choices=("train", "test"))
    p_build.add_argument("--out", required=True, help="output .jsonl file")

    args = parser.parse_args(argv)
    with exit_on_error():
        check_data_dir(args.data_dir)
        if args.command == "eval":
            return run_eval(args)
        if args.command == "finetune":
            return run_finetune(args)
        return run_build(args)


if __name__ == "__main__":
    main()
