"""
Continual learning (reference/evals.md §2): does a model keep what it learned earlier?

Two protocols, one result shape: a matrix R with R[i][j] = score on task j after training
(or adapting) through task i, plus the standard summaries of evals.md §2.2:

    ACC         (1/T) sum_j R[T, j]                                   (GEM, arXiv 1706.08840)
    BWT         (1/(T-1)) sum_{j<T} (R[T, j] - R[j, j])  negative = forgetting
    forgetting  (1/(T-1)) sum_{j<T} max_{j<=l<T} (R[l, j] - R[T, j]) (Chaudhry et al., 1801.10112; docs/CONTINUAL.md: from stage j on)

1. Class-incremental intent classification (`intents`): CLINC150 as 10 tasks x 15 intents
   (one task per domain, domains.json order) or Banking77 as 7 tasks x 11 intents (a fixed
   seeded order of the 77 categories). Generative classification with no task id: the
   prompt "Query: <utterance>\\nIntent:" is scored against " <label name>" for the names of
   ALL labels seen so far; the prediction is the argmax total log-likelihood. Arms:
     sequential         fine-tune on each task's examples in turn (the lower bound);
     joint              fine-tune once on every task's examples (the upper bound); its
                        row i is scored over the labels of tasks 1..i like the others;
     icl                frozen weights; k demonstrations per seen label in the context;
     in_context_memory  frozen outer weights; the examples of each task are streamed through
                        the model with the state carried across tasks, and queries are
                        classified from that state. HOPE / CMS / Titans adapt fast weights
                        in context (NL §7-8); for a Transformer the state is the KV cache,
                        so this arm is ICL over the stream. Attention models read at most
                        max_len tokens (context, query and label): the icl demonstrations
                        and the stream are cut to their last tokens that leave room for the
                        longest query and label.
   R[i][j] for j > i is undefined (classes not yet seen) and stored as None.

2. Sequential-domain language modelling (`domains`): train A -> B -> C ... and evaluate the
   held-out loss of every domain after every stage (continual domain-adaptive pretraining,
   Yildiz et al., arXiv 2402.17400). L[i][j] = mean token NLL, P = exp(L); reported:
   final mean perplexity, per-domain forgetting P[T, j] - P[j, j] (absolute and relative),
   BWT in loss mean_{j<T} (L[T, j] - L[j, j]) (positive = forgetting), and the row of the
   starting model (b_j) for forward transfer.

CLI (docs/CONTINUAL.md):
    python -m eval.continual intents --checkpoint DIR --dataset clinc --arms sequential,icl,in_context_memory,joint --out DIR
    python -m eval.continual domains --checkpoint DIR --domains builtin,austen,shakespeare,babi --out DIR
"""
from __future__ import annotations

import copy
import csv
import glob
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from cli import (OneLineArgumentParser, check_output_dir, check_unique, non_negative_int, positive_float,
                 positive_int, read_text, seed_int, write_json)
from eval.common import (DATA_DIR_HELP, check_data_dir, clipped_step, context_limit, continuation_logprobs,
                         eval_mode, exit_on_error, exp_or_inf, is_recurrent, load_checkpoint, model_device, prefill,
                         require_data_dir)
from eval.perplexity import encode_pair, loglikelihood_tokens

ARMS = ("sequential", "icl", "in_context_memory", "joint")
CONTEXT_ARMS = ("icl", "in_context_memory")     # the arms that read a context (max_len limits them)
INTENT_DATASETS = ("clinc", "banking")
DOMAINS = ("builtin", "austen", "shakespeare", "babi")
BANKING_INTENTS_PER_TASK = 11  # Banking77's 77 categories as 7 tasks
BANKING_ORDER_SEED = 0  # the fixed class order of Banking77's 7 x 11 split


# -----------------------------------------------------------------------------
# metrics (evals.md §2.2)

def _check_square(R, what="R"):
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError(f"{what} must be a non-empty T x T matrix, got row lengths {[len(r) for r in R]}")
    for i in range(T):
        if R[i][i] is None:
            raise ValueError(f"{what}[{i}][{i}] is missing: every task is scored right after it is learned")
    return T


def continual_metrics(R, baseline=None) -> dict:
    """ACC, BWT, forgetting (and FWT when `baseline` b_j is given) of an accuracy matrix
    R[i][j] (score on task j after task i; None where task j is not seen yet). Scores are
    higher-is-better. With T = 1, BWT and forgetting are None (nothing to forget).
    Forgetting of task j is max_{j <= l < T-1} R[l][j] - R[T-1][j]: only stages from j on,
    where the task has been learned (docs/CONTINUAL.md; the same as the max over all
    earlier stages when R is class-incremental, i.e. None above the diagonal)."""
    T = _check_square(R)
    last = R[T - 1]
    if any(v is None for v in last):
        raise ValueError("the last row of R must score every task")
    result = {"ACC": sum(last) / T, "BWT": None, "forgetting": None, "FWT": None,
              # mean over t of the accuracy on the tasks seen up to t (CIL "average incremental")
              "average_incremental_accuracy": sum(sum(R[t][:t + 1]) / (t + 1) for t in range(T)) / T}
    if T > 1:
        result["BWT"] = sum(last[j] - R[j][j] for j in range(T - 1)) / (T - 1)
        # max over earlier stages l (from j on: before j the task was not learned) of the drop
        result["forgetting"] = sum(max(R[l][j] - last[j] for l in range(j, T - 1) if R[l][j] is not None)
                                   for j in range(T - 1)) / (T - 1)
        if baseline is not None:
            if len(baseline) != T:
                raise ValueError(f"baseline has {len(baseline)} entries, R has {T} tasks")
            if all(R[j - 1][j] is not None for j in range(1, T)):
                result["FWT"] = sum(R[j - 1][j] - baseline[j] for j in range(1, T)) / (T - 1)
    return result


def domain_metrics(L) -> dict:
    """Sequential-domain LM summaries from a loss matrix L[i][j] (mean NLL on domain j after
    stage i): final mean perplexity, forgetting_j = P[T, j] - P[j, j] and its relative form
    P[T, j] / P[j, j] - 1, and BWT in loss (positive = forgetting: loss went up)."""
    T = _check_square(L, "L")
    P = [[exp_or_inf(v) for v in row] for row in L]
    last = P[T - 1]
    result = {"final_mean_perplexity": sum(last) / T, "final_mean_loss": sum(L[T - 1]) / T,
              "forgetting": {}, "relative_forgetting": {}, "BWT_loss": None, "mean_forgetting": None,
              "mean_relative_forgetting": None}
    if T > 1:
        result["forgetting"] = [last[j] - P[j][j] for j in range(T - 1)]
        result["relative_forgetting"] = [last[j] / P[j][j] - 1 for j in range(T - 1)]
        result["BWT_loss"] = sum(L[T - 1][j] - L[j][j] for j in range(T - 1)) / (T - 1)
        result["mean_forgetting"] = sum(result["forgetting"]) / (T - 1)
        result["mean_relative_forgetting"] = sum(result["relative_forgetting"]) / (T - 1)
    return result


# -----------------------------------------------------------------------------
# intent tasks: CLINC150 10 x 15 by domain, Banking77 7 x 11 seeded

def label_name(intent: str) -> str:
    """'card_arrival' -> 'card arrival': the text the model scores after 'Intent:'."""
    return intent.replace("_", " ")


def _read_json(path: str, expected: str, valid) -> object:
    """A JSON data file, or a one-line ValueError naming it when it is not JSON or when
    valid(data) is false (a damaged or foreign file: not a traceback from deep in a loader)."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    if not valid(data):
        raise ValueError(f"{path} does not hold {expected}")
    return data


def _is_str_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def clinc_tasks(data_dir: str | None = None) -> list[dict]:
    """CLINC150 (data_full.json, in-scope only) as 10 tasks, one per domain of domains.json,
    in that file's order; each task has its 15 intents with their train and test examples."""
    root = require_data_dir(data_dir, "CLINC150", "clinc150")
    domains = _read_json(os.path.join(root, "domains.json"), "{domain: [intent, ...]}",
                         lambda d: isinstance(d, dict) and all(map(_is_str_list, d.values())))
    data = _read_json(os.path.join(root, "data_full.json"), "{'train': [[text, intent], ...], 'test': [...]}",
                      lambda d: isinstance(d, dict) and all(isinstance(d.get(split), list) and all(
                          _is_str_list(row) and len(row) == 2 for row in d[split]) for split in ("train", "test")))
    by_intent = {}
    for split in ("train", "test"):
        for text, intent in data[split]:
            by_intent.setdefault(intent, {"train": [], "test": []})[split].append(text)
    tasks = []
    for domain, intents in domains.items():
        missing = [i for i in intents if i not in by_intent]
        if missing:
            raise ValueError(f"clinc150: intents {missing} of domain {domain} have no examples")
        tasks.append(_make_task(domain, intents, by_intent))
    return tasks


def banking_tasks(data_dir: str | None = None, seed: int = BANKING_ORDER_SEED) -> list[dict]:
    """Banking77 as 7 tasks x 11 intents: the 77 categories (categories.json order) shuffled
    by random.Random(seed), then cut in consecutive groups of 11."""
    root = require_data_dir(data_dir, "Banking77", "banking77")
    categories = _read_json(os.path.join(root, "categories.json"), "a list of category names", _is_str_list)
    by_intent = {c: {"train": [], "test": []} for c in categories}
    for split in ("train", "test"):
        # quoted texts contain line breaks: csv module, newline="" (MANIFEST.md)
        path = os.path.join(root, f"{split}.csv")
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not {"text", "category"} <= set(reader.fieldnames or ()):
                    raise ValueError(f"{path} has the columns {reader.fieldnames}, expected text,category")
                for row in reader:
                    if row["category"] not in by_intent:
                        raise ValueError(f"banking77/{split}.csv: unknown category {row['category']!r}")
                    by_intent[row["category"]][split].append(row["text"].strip())
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason})") from None
    order = list(categories)
    random.Random(seed).shuffle(order)
    n = BANKING_INTENTS_PER_TASK
    return [_make_task(f"banking_{t + 1}", order[t * n:(t + 1) * n], by_intent) for t in range(len(order) // n)]


def _make_task(name, intents, by_intent) -> dict:
    return {"name": name, "labels": [label_name(i) for i in intents],
            "train": [(text, label_name(i)) for i in intents for text in by_intent[i]["train"]],
            "test": [(text, label_name(i)) for i in intents for text in by_intent[i]["test"]]}


def intent_tasks(dataset: str, data_dir: str | None = None) -> list[dict]:
    if dataset == "clinc":
        return clinc_tasks(data_dir)
    if dataset == "banking":
        return banking_tasks(data_dir)
    raise ValueError(f"unknown intent dataset {dataset!r}; choose from {', '.join(INTENT_DATASETS)}")


def shrink_tasks(tasks, n_tasks=None, labels_per_task=None, train_per_label=None, test_per_label=None,
                 seed: int = 0) -> list[dict]:
    """A smaller copy for quick runs: the first n_tasks tasks, their first labels_per_task
    labels, and a seeded sample of train_per_label / test_per_label examples per label."""
    for name, v in (("n_tasks", n_tasks), ("labels_per_task", labels_per_task),
                    ("train_per_label", train_per_label), ("test_per_label", test_per_label)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if n_tasks is not None and n_tasks > len(tasks):     # else the results would name tasks never run
        raise ValueError(f"n_tasks (--tasks) is {n_tasks}, but the dataset has {len(tasks)} tasks")
    rng = random.Random(f"continual-shrink-{seed}")
    out = []
    for task in tasks[:n_tasks]:
        labels = task["labels"][:labels_per_task]
        small = {"name": task["name"], "labels": labels}
        for split, limit in (("train", train_per_label), ("test", test_per_label)):
            examples = []
            for label in labels:
                of_label = [ex for ex in task[split] if ex[1] == label]
                if limit is not None and len(of_label) > limit:
                    of_label = rng.sample(of_label, limit)
                examples += of_label
            small[split] = examples
        out.append(small)
    return out


# -----------------------------------------------------------------------------
# generative classification

PROMPT = "Query: {text}\nIntent:"


def demonstration(text: str, label: str) -> str:
    """One labelled example as the model reads it in context and is fine-tuned on."""
    return PROMPT.format(text=text) + " " + label + "\n\n"


@torch.no_grad()
def classify(model, tokenizer, queries, label_names, state=None, batch_size: int = 16, segment_len: int = 2048,
             device=None) -> list[str]:
    """The label name with the highest log p(" " + name | "Query: <q>\\nIntent:") per query.

    Without a state every (query, label) pair is one request of eval.perplexity's batched
    loglikelihood_tokens (lm-eval semantics). With a state (the icl / in_context_memory
    arms), each query is read on top of that state (a forward leaves the state it is passed
    as it was) and the labels are scored from there, batch_size at a time
    (eval.common.continuation_logprobs), so the context is read once."""
    if not label_names:
        raise ValueError("classify needs at least one candidate label")
    device = device or model_device(model)
    with eval_mode(model):
        if state is None:
            requests = [encode_pair(tokenizer, PROMPT.format(text=q), " " + name)
                        for q in queries for name in label_names]
            lls = [ll for ll, _ in loglikelihood_tokens(model, requests, device=device, batch_size=batch_size)]
            n = len(label_names)
            return [label_names[max(range(n), key=lambda k: lls[i * n + k])] for i in range(len(queries))]
        label_ids = [tokenizer.encode(" " + name) for name in label_names]
        predictions = []
        for q in queries:
            last, query_state = prefill(model, tokenizer.encode(PROMPT.format(text=q)), segment_len, device,
                                        state=state)
            scores = continuation_logprobs(model, last, query_state, label_ids, device, batch_size=batch_size)
            predictions.append(label_names[max(range(len(scores)), key=scores.__getitem__)])
        return predictions


def accuracy(model, tokenizer, examples, label_names, state=None, **kw) -> float:
    if not examples:
        raise ValueError("no test examples to score")
    predicted = classify(model, tokenizer, [text for text, _ in examples], label_names, state=state, **kw)
    return sum(p == label for p, (_, label) in zip(predicted, examples)) / len(examples)


# -----------------------------------------------------------------------------
# the arms

@dataclass
class IntentSettings:
    steps_per_task: int = 50          # optimiser steps per task (sequential); joint: steps_per_task * T
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    icl_shots: int = 1                # icl: demonstrations per seen label
    stream_per_label: int | None = None  # in_context_memory: examples per label streamed (None = all train)
    max_len: int | None = None       # attention models: tokens read at once (None = all; the CLI and eval.run
                                     # pass the checkpoint's train.seq_len); recurrent models read everything
    segment_len: int = 2048
    eval_batch_size: int = 16
    seed: int = 0


def _adamw(model, settings):
    """The fine-tuning optimiser of both protocols: AdamW with settings.lr and weight_decay,
    betas (0.9, 0.95)."""
    return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95))


def _step(model, optimizer, loss) -> bool:
    """One optimiser step on `loss`, the gradient norm clipped to 1; a non-finite loss or
    gradient norm is not applied (eval.common.clipped_step). Returns whether it was applied."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return clipped_step(model, optimizer, loss.item(), 1.0)[1]


def _label_target_example(tokenizer, text, label):
    """(input ids, targets) for fine-tuning: the loss is on the label tokens only."""
    context_ids, label_ids = encode_pair(tokenizer, PROMPT.format(text=text), " " + label)
    ids = context_ids + label_ids + [tokenizer.eot_id]
    targets = [-1] * (len(context_ids) - 1) + label_ids + [tokenizer.eot_id]
    return ids[:-1], targets


def finetune_on(model, tokenizer, examples, steps: int, settings: IntentSettings, device, rng) -> tuple:
    """AdamW on `examples` (label-token loss), `steps` steps of batch_size sampled examples
    -> (the steps' losses, how many steps were skipped as non-finite)."""
    if steps < 1:
        return [], 0
    if not examples:
        raise ValueError("no training examples")
    optimizer = _adamw(model, settings)
    model.train()
    losses, skipped = [], 0
    for _ in range(steps):
        batch = [_label_target_example(tokenizer, *rng.choice(examples)) for _ in range(settings.batch_size)]
        width = max(len(ids) for ids, _ in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width), -1, dtype=torch.long)
        for b, (ids, targets) in enumerate(batch):       # right padding sits after every target
            x[b, :len(ids)] = torch.tensor(ids)
            y[b, :len(targets)] = torch.tensor(targets)
        _, loss, _ = model(x.to(device), targets=y.to(device), return_state=False)
        skipped += not _step(model, optimizer, loss)
        losses.append(loss.item())
    model.eval()
    return losses, skipped


def _seen_labels(tasks, i):
    return [label for task in tasks[:i + 1] for label in task["labels"]]


def run_arm(arm: str, model, tokenizer, tasks, settings: IntentSettings, device=None) -> dict:
    """One arm on a task sequence -> {"R": T x T (None above the diagonal), metrics..., seconds}.
    The model passed in is never modified (training arms work on a deep copy)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    if not tasks:
        raise ValueError("no tasks")
    device = device or model_device(model)
    rng = random.Random(f"continual-{arm}-{settings.seed}")
    torch.manual_seed(settings.seed)
    T = len(tasks)
    R = [[None] * T for _ in range(T)]
    kw = {"batch_size": settings.eval_batch_size, "segment_len": settings.segment_len, "device": device}
    started = time.time()
    train_losses, skipped = [], 0
    if arm in ("sequential", "joint"):
        model = copy.deepcopy(model)
    if arm == "joint":
        everything = [ex for task in tasks for ex in task["train"]]
        train_losses, skipped = finetune_on(model, tokenizer, everything, settings.steps_per_task * T, settings,
                                            device, rng)
    # only the context arms read a context; the others need not tokenize every test query
    room = context_room(model, tokenizer, tasks, settings.max_len) if arm in CONTEXT_ARMS else None
    state = None
    stream = [tokenizer.eot_id]             # in_context_memory: every token streamed so far
    with eval_mode(model):
        for i, task in enumerate(tasks):
            if arm == "sequential":
                losses, n_skipped = finetune_on(model, tokenizer, task["train"], settings.steps_per_task, settings,
                                                device, rng)
                train_losses, skipped = train_losses + losses, skipped + n_skipped
            elif arm == "icl":
                state = _icl_state(model, tokenizer, tasks[:i + 1], settings, rng, device, room)
            elif arm == "in_context_memory":
                new = _stream_ids(tokenizer, task, settings, rng)
                if room is None:             # the state carries the stream: read only the new tokens
                    ids = new if state is not None else stream + new
                    state = prefill(model, ids, settings.segment_len, device, state)[1]
                else:                        # a KV cache: read the stream's last `room` tokens afresh
                    stream = (stream + new)[-room:]
                    state = prefill(model, stream, settings.segment_len, device)[1]
            labels = _seen_labels(tasks, i)
            for j in range(i + 1):
                R[i][j] = accuracy(model, tokenizer, tasks[j]["test"], labels, state=state, **kw)
    result = {"arm": arm, "tasks": [t["name"] for t in tasks], "R": R, **continual_metrics(R),
              "seconds": time.time() - started}
    if train_losses:
        result["train_loss_first"], result["train_loss_last"] = train_losses[0], train_losses[-1]
        result["skipped_steps"] = skipped          # non-finite loss or gradient, not applied
    return result


def context_room(model, tokenizer, tasks, max_len: int | None) -> int | None:
    """The most context tokens (demonstrations, stream) an attention model may read so that
    the longest test query and label still fit in max_len; None where it reads everything
    (a recurrent model, or max_len None)."""
    max_len = context_limit(model, max_len)
    if max_len is None:
        return None
    query = max((len(tokenizer.encode(PROMPT.format(text=text))) for t in tasks for text, _ in t["test"]), default=0)
    label = max((len(tokenizer.encode(" " + name)) for t in tasks for name in t["labels"]), default=0)
    if max_len <= query + label:
        raise ValueError(f"max_len={max_len} leaves no context: the longest query and label take "
                         f"{query + label} tokens")
    return max_len - query - label


@torch.no_grad()
def _icl_state(model, tokenizer, seen_tasks, settings, rng, device, room=None):
    """The state after reading icl_shots demonstrations of every seen label, shuffled (an
    attention model: their last `room` tokens)."""
    demos = []
    for task in seen_tasks:
        for label in task["labels"]:
            pool = [ex for ex in task["train"] if ex[1] == label]
            demos += rng.sample(pool, min(settings.icl_shots, len(pool)))
    rng.shuffle(demos)
    if not demos:
        raise ValueError("icl: the seen tasks have no training examples to show")
    ids = [tokenizer.eot_id] + tokenizer.encode("".join(demonstration(*ex) for ex in demos))
    return prefill(model, ids if room is None else ids[-room:], settings.segment_len, device)[1]


def _stream_ids(tokenizer, task, settings, rng) -> list[int]:
    """This task's examples to stream (stream_per_label per label, shuffled), as tokens."""
    examples = []
    for label in task["labels"]:
        pool = [ex for ex in task["train"] if ex[1] == label]
        n = len(pool) if settings.stream_per_label is None else min(settings.stream_per_label, len(pool))
        examples += rng.sample(pool, n)
    rng.shuffle(examples)
    if not examples:
        raise ValueError(f"in_context_memory: task {task['name']} has no training examples to stream")
    return tokenizer.encode("".join(demonstration(*ex) for ex in examples))


def run_intents(model, tokenizer, tasks, arms=ARMS, settings: IntentSettings | None = None, device=None,
                log=print) -> dict:
    settings = settings or IntentSettings()
    if settings.icl_shots < 1 or (settings.stream_per_label is not None and settings.stream_per_label < 1):
        raise ValueError("icl_shots and stream_per_label must be >= 1")
    results = {"protocol": "class-incremental intent classification (generative, no task id)",
               "prompt": PROMPT, "tasks": [{"name": t["name"], "labels": t["labels"], "n_train": len(t["train"]),
                                            "n_test": len(t["test"])} for t in tasks],
               "settings": asdict(settings), "recurrent_state": is_recurrent(model), "arms": {}}
    if any(arm in CONTEXT_ARMS for arm in arms):   # the others read no context: max_len does not limit them
        # the icl / in_context_memory context an attention model reads (None = all of it)
        results["context_tokens"] = context_room(model, tokenizer, tasks, settings.max_len)
    for arm in arms:
        r = run_arm(arm, model, tokenizer, tasks, settings, device=device)
        results["arms"][arm] = r
        if log:
            log(f"{arm:>18}  ACC {r['ACC']:.3f}  BWT {_fmt(r['BWT'])}  forgetting {_fmt(r['forgetting'])}  "
                f"({r['seconds']:.0f}s)")
    return results


def _fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


# -----------------------------------------------------------------------------
# sequential-domain language modelling

@dataclass
class DomainSettings:
    steps_per_domain: int = 200
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.0
    train_chars: int = 2_000_000      # characters of each domain used for training
    eval_tokens: int = 16_384         # held-out tokens scored per domain
    seed: int = 0


def _read(paths) -> str:
    return "\n\n".join(read_text(path) for path in paths)


def domain_text(name: str, data_dir: str | None = None) -> tuple[str, str]:
    """(train text, held-out text) of a built-in domain. Held-out text is disjoint:
    builtin: the KJV chapters of the built-in corpus's train split / those of its validation
    split, as data.prepare makes them with the default recipe (data.val_fraction 0.01, seed 0;
    data.builtin.train_and_validation_chapters: 8 chapters, ~29.6K characters, ~7.3K GPT-2
    tokens), so a model trained on `dataset: builtin` is scored on text it never trained on;
    austen: five novels / Persuasion; shakespeare: the first 90% / the last 10% of
    tiny-shakespeare; babi: the qa1-qa5 train stories / test stories (statements only, one
    per line)."""
    if name == "builtin":
        from data.builtin import train_and_validation_chapters
        train, val = train_and_validation_chapters()
        return "\n".join(train), "\n".join(val)
    if name == "austen":
        paths = sorted(glob.glob(os.path.join(require_data_dir(data_dir, "the Austen domain", "austen"), "*.txt")))
        held = [p for p in paths if os.path.basename(p) == "persuasion.txt"]
        if not held:
            raise FileNotFoundError("austen/persuasion.txt not found (the held-out novel)")
        return _read([p for p in paths if p not in held]), _read(held)
    if name == "shakespeare":
        folder = require_data_dir(data_dir, "the Shakespeare domain", "shakespeare")
        text = _read([os.path.join(folder, "tinyshakespeare.txt")])
        cut = int(0.9 * len(text))
        return text[:cut], text[cut:]
    if name == "babi":
        root = os.path.join(require_data_dir(data_dir, "the bAbI domain", "babi"), "en")

        def stories(split):
            lines = []
            for path in sorted(glob.glob(os.path.join(root, f"qa[1-5]_*_{split}.txt"))):
                for line in read_text(path).splitlines():
                    number, _, sentence = line.strip().partition(" ")
                    if "\t" not in sentence:                # statements; questions carry tab fields
                        lines.append(("\n" if number == "1" else "") + sentence)
            return "\n".join(lines)
        return stories("train"), stories("test")
    raise ValueError(f"unknown domain {name!r}; choose from {', '.join(DOMAINS)}")


def builtin_overlap_note(cfg, names) -> str | None:
    """A line for a checkpoint whose config trained on the built-in corpus with another
    data.val_fraction than the default: the builtin domain's held-out chapters (the default
    recipe's validation split) may then be in its training split. None when the builtin
    domain is not run, the checkpoint trained on other data, or with the default fraction."""
    from data.builtin import train_and_validation_chapters
    from data.prepare import DEFAULT_VAL_FRACTION
    data = getattr(cfg, "data", None)
    if "builtin" not in names or data is None or data.dataset != "builtin" or \
            data.val_fraction == DEFAULT_VAL_FRACTION:
        return None
    held = train_and_validation_chapters()[1]
    trained = set(train_and_validation_chapters(data.val_fraction)[0])
    return (f"the checkpoint trained on the built-in corpus with data.val_fraction={data.val_fraction}, not "
            f"{DEFAULT_VAL_FRACTION}: {sum(c in trained for c in held)} of the builtin domain's {len(held)} "
            f"held-out chapters (the default recipe's validation split) are in its training split")


def load_domains(names, data_dir: str | None = None) -> list[dict]:
    out = []
    for name in names:
        train, held = domain_text(name, data_dir)
        out.append({"name": name, "train": train, "eval": held})
    return out


@torch.no_grad()
def held_out_loss(model, eval_ids, seq_len: int, batch_size: int, device) -> float:
    """Mean next-token NLL over consecutive windows of seq_len + 1 tokens (fresh state each),
    so every token but the first is a target exactly once: the tokens after the last full
    window are scored in one shorter window (a held-out text shorter than eval_tokens, e.g.
    builtin's ~7.3K GPT-2 tokens at seq_len 4096, would otherwise lose up to seq_len - 1)."""
    if len(eval_ids) < seq_len + 1:
        raise ValueError(f"held-out text has {len(eval_ids)} tokens: fewer than seq_len + 1 = {seq_len + 1}")
    n_full = (len(eval_ids) - 1) // seq_len
    windows = [eval_ids[s:s + seq_len + 1] for s in range(0, n_full * seq_len, seq_len)]
    batches = [windows[start:start + batch_size] for start in range(0, n_full, batch_size)]
    tail = eval_ids[n_full * seq_len:]       # the last window's last token and those after it
    if len(tail) > 1:
        batches.append([tail])
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            chunk = torch.tensor(batch, dtype=torch.long, device=device)
            logits = model(chunk[:, :-1])[0]
            total += F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            count += chunk[:, 1:].numel()
    return total / count


def run_domains(model, tokenizer, domains, settings: DomainSettings | None = None, device=None, log=print,
                cfg=None) -> dict:
    """Train a copy of `model` on each domain in turn; after each stage score every domain.
    Returns the loss and perplexity matrices (rows: stages, columns: domains), the starting
    model's row, domain_metrics and notes (with `cfg`, the checkpoint's config, the first
    is builtin_overlap_note's where it has one)."""
    settings = settings or DomainSettings()
    if len(domains) < 1:
        raise ValueError("no domains")
    if settings.seq_len < 1 or settings.batch_size < 1 or settings.steps_per_domain < 0:
        raise ValueError("seq_len and batch_size must be >= 1, steps_per_domain >= 0")
    device = device or model_device(model)
    model = copy.deepcopy(model)
    torch.manual_seed(settings.seed)
    rng = random.Random(f"continual-domains-{settings.seed}")
    train_ids, eval_ids = [], []
    for d in domains:
        ids = tokenizer.encode(d["train"][:settings.train_chars])
        if len(ids) < settings.seq_len + 1:
            raise ValueError(f"domain {d['name']}: {len(ids)} training tokens, fewer than seq_len + 1")
        train_ids.append(torch.tensor(ids, dtype=torch.long))
        # enough characters for eval_tokens of any tokenizer (>= 1 byte per token)
        eval_ids.append(tokenizer.encode(d["eval"][:8 * settings.eval_tokens])[:settings.eval_tokens + 1])
        if len(eval_ids[-1]) < settings.seq_len + 1:     # named here, before the first score
            raise ValueError(f"domain {d['name']}: {len(eval_ids[-1])} held-out tokens, fewer than seq_len + 1 = "
                             f"{settings.seq_len + 1} (eval_tokens={settings.eval_tokens})")
    # held_out_loss scores every token of a domain's ids but the first: eval_tokens, or fewer
    # when the held-out text is shorter (builtin with GPT-2 tokens: ~7.3K)
    held_out_tokens = [len(ids) - 1 for ids in eval_ids]
    overlap = builtin_overlap_note(cfg, [d["name"] for d in domains])
    notes = [overlap] if overlap else []
    notes += [f"domain {d['name']}: its held-out text has {n} tokens, fewer than eval_tokens={settings.eval_tokens}: "
              f"all of them are scored" for d, n in zip(domains, held_out_tokens) if n < settings.eval_tokens]
    score = (lambda: [held_out_loss(model, ids, settings.seq_len, settings.batch_size, device) for ids in eval_ids])
    started = time.time()
    initial = score()
    optimizer = _adamw(model, settings)
    L, train_loss, skipped = [], [], 0
    for i, d in enumerate(domains):
        model.train()
        ids = train_ids[i]
        for _ in range(settings.steps_per_domain):
            starts = [rng.randrange(len(ids) - settings.seq_len) for _ in range(settings.batch_size)]
            batch = torch.stack([ids[s:s + settings.seq_len + 1] for s in starts]).to(device)
            _, loss, _ = model(batch[:, :-1], targets=batch[:, 1:], return_state=False)
            skipped += not _step(model, optimizer, loss)
        train_loss.append(loss.item() if settings.steps_per_domain else None)
        L.append(score())
        if log:
            log(f"after {d['name']:>12}: " + "  ".join(f"{dd['name']} ppl {exp_or_inf(v):.2f}"
                                                       for dd, v in zip(domains, L[-1])))
    return {"protocol": "sequential-domain language modelling", "domains": [d["name"] for d in domains],
            "settings": asdict(settings), "held_out_tokens": held_out_tokens, "notes": notes, "loss": L,
            "perplexity": [[exp_or_inf(v) for v in row] for row in L],
            "initial_loss": initial, "initial_perplexity": [exp_or_inf(v) for v in initial],
            "final_train_loss": train_loss, "skipped_steps": skipped, **domain_metrics(L),
            "seconds": time.time() - started}


# -----------------------------------------------------------------------------
# plots (matplotlib, imported only here)

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_matrix(M, rows, cols, path: str, title: str, value_format="{:.0f}", scale=1.0, cmap="RdYlGn",
                xlabel="evaluated on", ylabel="after training on") -> str:
    """A heatmap of a matrix (None cells left blank), each cell annotated."""
    plt = _pyplot()
    values = [[float("nan") if v is None else scale * v for v in row] for row in M]
    fig, ax = plt.subplots(figsize=(0.7 * len(cols) + 2.5, 0.5 * len(rows) + 1.8))
    image = ax.imshow(values, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            if not math.isnan(v):
                ax.text(c, r, value_format.format(v), ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_accuracy_over_tasks(intents: dict, path: str, title: str = "accuracy on all seen classes") -> str:
    """Per arm: mean accuracy over the tasks seen so far, after each task."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, r in intents["arms"].items():
        R = r["R"]
        curve = [100 * sum(R[t][:t + 1]) / (t + 1) for t in range(len(R))]
        ax.plot(range(1, len(R) + 1), curve, marker="o", label=arm)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_intents(results: dict, out_dir: str, prefix: str = "continual_intents") -> list[str]:
    paths = [plot_accuracy_over_tasks(results, os.path.join(out_dir, f"{prefix}_accuracy.png"))]
    for arm, r in results["arms"].items():
        paths.append(plot_matrix(r["R"], r["tasks"], r["tasks"], os.path.join(out_dir, f"{prefix}_R_{arm}.png"),
                                 f"R matrix, {arm} (accuracy %)", scale=100))
    return paths


def plot_domains(results: dict, out_dir: str, prefix: str = "continual_domains") -> list[str]:
    names = results["domains"]
    return [plot_matrix(results["perplexity"], names, names, os.path.join(out_dir, f"{prefix}_perplexity.png"),
                        "held-out perplexity", value_format="{:.1f}", cmap="RdYlGn_r")]


# -----------------------------------------------------------------------------
# CLI

def _parse_arms(text: str) -> list[str]:
    """'icl,joint' -> ['icl', 'joint']; a ValueError "--arms names ..." otherwise (main puts it
    in argparse's form, "argument --arms: names ...")."""
    arms = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise ValueError(f"--arms names {f'unknown arm(s) {bad}' if bad else 'no arm'}; choose from {','.join(ARMS)}")
    return check_unique("--arms", arms)


def main(argv=None):
    parser = OneLineArgumentParser(prog="python -m eval.continual", description="Continual-learning evals.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("intents", help="class-incremental CLINC150 / Banking77")
    p.add_argument("--dataset", default="clinc", choices=INTENT_DATASETS)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {','.join(ARMS)}")
    p.add_argument("--tasks", type=positive_int, help="use the first N tasks (default all)")
    p.add_argument("--labels-per-task", type=positive_int, help="use the first N labels of each task (default all)")
    p.add_argument("--train-per-label", type=positive_int, help="training examples per label (default all)")
    p.add_argument("--test-per-label", type=positive_int, help="test examples per label (default all)")
    defaults = IntentSettings()
    p.add_argument("--steps", type=non_negative_int, default=defaults.steps_per_task, help="fine-tuning steps per task")
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    p.add_argument("--lr", type=positive_float, default=defaults.lr)
    p.add_argument("--icl-shots", type=positive_int, default=defaults.icl_shots, help="icl: demonstrations per label")
    p.add_argument("--stream-per-label", type=positive_int,
                   help="in_context_memory: examples per label streamed (default all)")
    p.add_argument("--max-len", type=positive_int,
                   help="attention models: tokens read at once, context + query + label (default the checkpoint's "
                        "train.seq_len)")
    q = sub.add_parser("domains", help="sequential-domain language modelling")
    q.add_argument("--domains", default=",".join(DOMAINS), help=f"comma list of {','.join(DOMAINS)}")
    dd = DomainSettings()
    q.add_argument("--steps", type=non_negative_int, default=dd.steps_per_domain, help="training steps per domain")
    q.add_argument("--batch-size", type=positive_int, default=dd.batch_size)
    q.add_argument("--seq-len", type=positive_int, help="training / scoring window (default the checkpoint's seq_len)")
    q.add_argument("--lr", type=positive_float, default=dd.lr)
    q.add_argument("--train-chars", type=positive_int, default=dd.train_chars)
    q.add_argument("--eval-tokens", type=positive_int, default=dd.eval_tokens)
    for sp in (p, q):
        sp.add_argument("--checkpoint", required=True)
        sp.add_argument("--out", required=True, help="output folder")
        sp.add_argument("--seed", type=seed_int, default=0)
        sp.add_argument("--data-dir", help=DATA_DIR_HELP)
        sp.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.command == "intents":
        try:
            arms = _parse_arms(args.arms)
        except ValueError as e:        # a flag's value: said as argparse says the others (docs/EVAL.md)
            p.error(f"argument --arms: {str(e).removeprefix('--arms ')}")
    with exit_on_error():
        check_output_dir(args.out)
        check_data_dir(args.data_dir)
        if args.command == "intents":
            tasks = shrink_tasks(intent_tasks(args.dataset, args.data_dir), args.tasks, args.labels_per_task,
                                 args.train_per_label, args.test_per_label, seed=args.seed)
            model, cfg, tokenizer, device = load_checkpoint(args.checkpoint, args.device)
            settings = IntentSettings(steps_per_task=args.steps, batch_size=args.batch_size, lr=args.lr,
                                      icl_shots=args.icl_shots, stream_per_label=args.stream_per_label,
                                      max_len=context_limit(model, args.max_len or cfg.train.seq_len), seed=args.seed)
            results = run_intents(model, tokenizer, tasks, arms, settings, device)
            results.update(dataset=args.dataset, arch=cfg.model.arch, checkpoint=os.path.abspath(args.checkpoint))
            plot = plot_intents
        else:
            names = check_unique("--domains", [n.strip() for n in args.domains.split(",") if n.strip()])
            if not names:
                raise ValueError(f"--domains {args.domains!r} names no domain; choose from {','.join(DOMAINS)}")
            domains = load_domains(names, args.data_dir)
            model, cfg, tokenizer, device = load_checkpoint(args.checkpoint, args.device)
            settings = DomainSettings(steps_per_domain=args.steps, batch_size=args.batch_size,
                                      seq_len=args.seq_len if args.seq_len is not None else cfg.train.seq_len,
                                      lr=args.lr, train_chars=args.train_chars, eval_tokens=args.eval_tokens,
                                      seed=args.seed)
            results = run_domains(model, tokenizer, domains, settings, device, cfg=cfg)
            results.update(arch=cfg.model.arch, checkpoint=os.path.abspath(args.checkpoint))
            for note in results["notes"]:
                print(f"note: {note}")
            plot = plot_domains
        name = f"continual_{args.dataset if args.command == 'intents' else 'domains'}"   # as eval.run names them
        path = write_json(os.path.join(args.out, f"{name}.json"), results)
        pngs = plot(results, args.out, name)
    print(f"wrote {path} and {len(pngs)} plot(s)")
    return results


if __name__ == "__main__":
    main()
