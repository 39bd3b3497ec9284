"""
The whole evaluation suite in one command (DESIGN §7):

    python -m eval.run --suite quick|paper --checkpoint DIR --out DIR [--device auto] [--data-dir DIR]
        [--sections perplexity,babilong,niah,continual]

writes <out>/results.json (sections `perplexity`, `babilong`, `niah`, `continual`, plus the
suite's settings), <out>/results.md (the tables) and the plots (BABILong heatmap, continual
R matrices, accuracy over tasks, domain perplexity matrix). A section whose offline data
is missing is recorded as {"skipped": reason} and the command still finishes. Run again
into the same <out> for the same checkpoint and suite, --sections replaces those sections
and keeps the others in results.json / results.md; an <out> holding another checkpoint's or
suite's results is refused (choose another --out). results.json records the checkpoint's step
(checkpoint_step); for an exported .safetensors, that step and its config's hash, read from
the file, are what is compared, since a later export to the same path is another checkpoint.

Suites (every setting is in SUITES below and copied into results.json):
  quick  minutes on a CPU for a tiny model: a few val batches, 1 WikiText article, 20
         LAMBADA passages; BABILong qa1-qa2 at 0k/1k, 3 samples; S-NIAH pass-key at 1k,
         2 samples; CLINC 2 tasks x 3 intents with every arm and 3 fine-tuning steps;
         3 domains (Austen -> Shakespeare -> bAbI) with 5 steps each.
  paper  the papers' settings: the full val split, WikiText-2 test (62 articles, rolling
         windows of the training context) and LAMBADA (5,153 passages) as lm-eval
         (Titans Table 1, NL Table 2); BABILong qa1-qa5, 100 samples per cell (the size of
         RMT-team/babilong), 0k..128k locally (longer lengths: python -m eval.babilong);
         S-NIAH 1-3 at 4k/8k/16k (NL Table 1) with 100 samples, attention models reading
         the whole input (max_len 16384, the longest length, not their training context);
         CLINC150 10 x 15 and Banking77 7 x 11 with every arm (all train/test examples, 200 steps per task, 1 shot per label,
         10 streamed examples per label); domains KJV -> Austen -> Shakespeare -> bAbI,
         1000 steps each. BABILong results are only meaningful after fine-tuning
         (python -m eval.babilong finetune; evals.md §1.6).

During training, `run_during_training(model, tokenizer, names, device, ...)` returns flat
metrics (names from config.DURING_TRAINING_EVALS) for metrics.jsonl / wandb.
"""
from __future__ import annotations

import json
import os
import time

from cli import OneLineArgumentParser, check_output_dir, one_line, write_atomic, write_json
from config import DURING_TRAINING_EVALS
from eval.common import (DATA_DIR_HELP, check_data_dir, checkpoint_identity, context_handling, context_limit,
                         exit_on_error, load_checkpoint, model_device, notes_of, resolve_checkpoint_arg)

SECTIONS = ("perplexity", "babilong", "niah", "continual")

SUITES = {
    "quick": {
        "perplexity": {"val_batches": 4, "wikitext_docs": 1, "lambada_passages": 20, "batch_size": 8},
        "babilong": {"tasks": ["qa1", "qa2"], "lengths": ["0k", "1k"], "samples": 3, "max_new_tokens": 20,
                     "segment_len": 2048},
        "niah": {"tasks": ["niah_single_1"], "lengths": ["1k"], "samples": 2, "depths": [0.0, 1.0],
                 "max_new_tokens": 16, "segment_len": 2048},
        "continual": {
            "intents": [{"dataset": "clinc", "tasks": 2, "labels_per_task": 3, "train_per_label": 4,
                         "test_per_label": 2}],
            "arms": ["sequential", "icl", "in_context_memory", "joint"],
            "intent_settings": {"steps_per_task": 3, "batch_size": 4, "lr": 1e-4, "icl_shots": 1,
                                "stream_per_label": 2},
            "domains": ["austen", "shakespeare", "babi"],
            "domain_settings": {"steps_per_domain": 5, "batch_size": 4, "lr": 3e-4, "train_chars": 200_000,
                                "eval_tokens": 1024},
        },
    },
    "paper": {
        "perplexity": {"val_batches": None, "wikitext_docs": None, "lambada_passages": None, "batch_size": 8},
        "babilong": {"tasks": ["qa1", "qa2", "qa3", "qa4", "qa5"],
                     "lengths": ["0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k"], "samples": 100,
                     "max_new_tokens": 20, "segment_len": 2048},
        "niah": {"tasks": ["niah_single_1", "niah_single_2", "niah_single_3"], "lengths": ["4k", "8k", "16k"],
                 "samples": 100, "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "max_new_tokens": 128,
                 "segment_len": 2048, "max_len": 16384},
        "continual": {
            "intents": [{"dataset": "clinc"}, {"dataset": "banking"}],
            "arms": ["sequential", "icl", "in_context_memory", "joint"],
            "intent_settings": {"steps_per_task": 200, "batch_size": 16, "lr": 1e-4, "icl_shots": 1,
                                "stream_per_label": 10},
            "domains": ["builtin", "austen", "shakespeare", "babi"],
            "domain_settings": {"steps_per_domain": 1000, "batch_size": 8, "lr": 3e-4,
                                "train_chars": 2_000_000, "eval_tokens": 16_384},
        },
    },
}


# -----------------------------------------------------------------------------
# sections: each takes a model and returns a JSON-able dict (and writes its plots)

def perplexity_section(model, tokenizer, settings, seq_len, device, data_dir=None, dataset=None,
                       why_no_dataset="no training data given", progress=False) -> dict:
    """dataset: the checkpoint's training data (a TokenDataset) for its val split, or None
    (the val row then records why_no_dataset). progress: a bar on stderr for WikiText and
    LAMBADA (the paper suite's take minutes)."""
    from eval import perplexity as ppl
    out = {"window": seq_len}
    if dataset is not None:
        out["val"] = ppl.evaluate_split(model, dataset, "val", settings["batch_size"], seq_len,
                                        max_batches=settings["val_batches"], device=device)
    else:
        out["val"] = {"skipped": why_no_dataset}
    root = data_dir or _data_dir()
    wikitext_path = os.path.join(root, ppl.WIKITEXT_FILE) if root else None
    lambada_path = os.path.join(root, ppl.LAMBADA_FILE) if root else None
    if wikitext_path and os.path.isfile(wikitext_path):
        out["wikitext"] = ppl.wikitext_word_perplexity(model, tokenizer, wikitext_path, seq_len, device=device,
                                                       limit_docs=settings["wikitext_docs"],
                                                       batch_size=settings["batch_size"], progress=progress)
    else:
        out["wikitext"] = {"skipped": f"{ppl.WIKITEXT_FILE} not found in the data folder"}
    if lambada_path and os.path.isfile(lambada_path):
        out["lambada"] = ppl.lambada(model, tokenizer, lambada_path, device=device,
                                     limit=settings["lambada_passages"], max_len=seq_len,
                                     batch_size=settings["batch_size"], progress=progress)
    else:
        out["lambada"] = {"skipped": f"{ppl.LAMBADA_FILE} not found in the data folder"}
    return out


def babilong_section(model, tokenizer, settings, seq_len, device, data_dir=None, out_dir=None, gpt2=None,
                     dtype="auto") -> dict:
    from eval import babilong as bl
    gpt2 = gpt2 or bl.length_tokenizer(data_dir)
    per_cell = {}
    for task in settings["tasks"]:
        for length in settings["lengths"]:
            samples = bl.build_babilong(task, length, settings["samples"], split="test", background="austen",
                                        babi="file", data_dir=data_dir, gpt2=gpt2)
            per_cell[(task, length)] = bl.evaluate(model, tokenizer, samples, max_len=context_limit(model, seq_len),
                                                   segment_len=settings["segment_len"], device=device,
                                                   max_new_tokens=settings["max_new_tokens"], dtype=dtype)
    result = {"source": "local: bAbI en test files + Austen test books",
              "scores": {"official": "greedy generation, BABILong compare_answers",
                         "label_ranking": bl.LABEL_RANKING},
              "context_handling": next(iter(per_cell.values()))["context_handling"], **bl._summarise(per_cell)}
    if out_dir:
        result["plot"] = os.path.basename(bl.plot_heatmap(result, os.path.join(out_dir, "babilong_heatmap.png")))
    return result


def niah_section(model, tokenizer, settings, seq_len, device, data_dir=None, gpt2=None, dtype="auto") -> dict:
    """S-NIAH cells. An attention model reads up to settings["max_len"] tokens where that is
    longer than its training context seq_len (the paper suite: 16384, its longest length, so
    that no needle is cut off, as the papers report full-length results)."""
    from eval import babilong as bl
    from eval import niah
    gpt2 = gpt2 or bl.length_tokenizer(data_dir)
    max_len = context_limit(model, max(seq_len, settings.get("max_len") or seq_len))
    out = {"scores": niah.score_descriptions(niah.DEFAULT_DISTRACTORS),
           "context_handling": context_handling(max_len is None, max_len, settings["segment_len"], "truncate",
                                                settings["max_new_tokens"]),
           "accuracy": {}, "ranking_accuracy": {}, "counts": {}}
    per_cell = []
    for task in settings["tasks"]:
        for length in settings["lengths"]:
            samples = niah.build_niah(task, length, settings["samples"], depths=settings["depths"],
                                      background="austen", data_dir=data_dir, gpt2=gpt2)
            r = niah.evaluate_niah(model, tokenizer, samples, max_len=max_len,
                                   segment_len=settings["segment_len"], device=device,
                                   max_new_tokens=settings["max_new_tokens"], dtype=dtype)
            per_cell.append(r)
            niah.tabulate_cell(out, niah.parse_task(task), length, r)
    out["notes"] = notes_of(per_cell)
    return out


def continual_section(model, tokenizer, settings, seq_len, device, data_dir=None, out_dir=None, arms=None,
                      domains=True, cfg=None) -> dict:
    """The continual-learning protocols of eval.continual; `cfg` (the checkpoint's config)
    lets the domains protocol note held-out text the checkpoint may have trained on."""
    from eval import continual as cl
    out = {"intents": {}, "notes": []}
    intent_settings = cl.IntentSettings(**settings["intent_settings"], max_len=context_limit(model, seq_len))
    for spec in settings["intents"]:
        tasks = cl.shrink_tasks(cl.intent_tasks(spec["dataset"], data_dir), spec.get("tasks"),
                                spec.get("labels_per_task"), spec.get("train_per_label"), spec.get("test_per_label"))
        r = cl.run_intents(model, tokenizer, tasks, arms or settings["arms"], intent_settings, device, log=None)
        if out_dir:
            r["plots"] = [os.path.basename(p) for p in cl.plot_intents(r, out_dir, f"continual_{spec['dataset']}")]
        out["intents"][spec["dataset"]] = r
    if domains and settings.get("domains"):
        ds = cl.DomainSettings(seq_len=seq_len, **settings["domain_settings"])
        r = cl.run_domains(model, tokenizer, cl.load_domains(settings["domains"], data_dir), ds, device, log=None,
                           cfg=cfg)
        out["notes"] = r["notes"]                # printed by run_suite, like the other sections' notes
        if out_dir:
            r["plots"] = [os.path.basename(p) for p in cl.plot_domains(r, out_dir)]
        out["domains"] = r
    return out


def _data_dir():
    """eval.common.default_data_dir(), looked up at each call so that a test can replace it."""
    from eval.common import default_data_dir
    return default_data_dir()


def read_section_data(sections, settings, data_dir=None, missing_ok=True) -> None:
    """Read the data files the sections will use, before the checkpoint loads: a damaged one
    (not UTF-8, malformed) is a ValueError naming it up front, not after the sections before
    it have run. A missing file or package is left to the section, which records it as
    skipped (missing_ok), or raised (FileNotFoundError / ImportError)."""
    from eval import babilong as bl
    from eval import continual as cl
    from eval import niah
    from eval import perplexity as ppl
    from eval.babi import babi_path, read_babi
    root = data_dir or _data_dir()
    reads = []
    if "perplexity" in sections and root:
        reads += [lambda: ppl.load_wikitext_documents(os.path.join(root, ppl.WIKITEXT_FILE)),
                  lambda: ppl.load_lambada_texts(os.path.join(root, ppl.LAMBADA_FILE))]
    if "babilong" in sections and root:
        reads += [lambda t=task: read_babi(babi_path(t, "test", root)) for task in settings["babilong"]["tasks"]]
    if "babilong" in sections or ("niah" in sections and any(
            niah.TASKS[niah.parse_task(t)]["haystack"] == "essay" for t in settings["niah"]["tasks"])):
        reads.append(lambda: bl.load_books("austen", "test", data_dir))
    if "continual" in sections:
        reads += [lambda d=spec["dataset"]: cl.intent_tasks(d, data_dir) for spec in settings["continual"]["intents"]]
        reads.append(lambda: cl.load_domains(settings["continual"].get("domains") or [], data_dir))
    for read in reads:
        try:
            read()
        except (FileNotFoundError, ImportError):
            if not missing_ok:
                raise


def check_during_training(names, data_dir=None) -> None:
    """train.py's check before step 1: the data each during-training eval reads, read once, so
    that a missing or damaged file is a one-line error now, not at the first eval step after
    training (or, for perplexity, an eval line with no numbers)."""
    if not names:
        return
    try:
        root = data_dir or _data_dir()
    except ValueError as e:           # $NL_DATA_DIR names no folder: said now, not at the first eval step
        raise ValueError(f"eval.during_training {list(names)}: {e}") from None
    if root is None:
        raise FileNotFoundError(f"eval.during_training {list(names)} needs the offline eval data: set "
                                "$NL_DATA_DIR to a copy of shared/data, or leave them out")
    quick = SUITES["quick"]
    settings = {**quick, "continual": {**quick["continual"], "domains": []}}    # continual_quick: CLINC only
    try:
        read_section_data([n.removesuffix("_quick") for n in names], settings, data_dir, missing_ok=False)
        if "babilong_quick" in names or "niah_quick" in names:
            from eval.babilong import length_tokenizer
            length_tokenizer(data_dir)        # the GPT-2 BPE files: BABILong's unit of length
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise ValueError(f"eval.during_training {list(names)}: {e}") from None


# -----------------------------------------------------------------------------
# the suite

def run_suite(checkpoint: str, suite: str, out_dir: str, device: str = "auto", data_dir: str | None = None,
              sections=SECTIONS, log=print, progress=False) -> dict:
    """Run `sections` of `suite` on the checkpoint and write out_dir/results.json, results.md and
    the plots -> the results. An out_dir that already holds the results of this checkpoint and
    suite (an earlier run of other sections) keeps them: the sections run now replace theirs
    and the others stay (merge_results). One of another checkpoint or suite is refused."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        raise ValueError(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}" if bad else
                         f"no section given; choose from {', '.join(SECTIONS)}")
    check_data_dir(data_dir)
    check_output_dir(out_dir)
    # resolved once: an out_dir names its latest step, which training may move on, so the step
    # compared with the earlier results, loaded and recorded is one and the same
    resolved = resolve_checkpoint_arg(checkpoint)
    identity = checkpoint_identity(resolved)
    earlier = earlier_results(out_dir, checkpoint, suite, resolved, identity)   # refused now, before anything runs
    settings = SUITES[suite]
    read_section_data(sections, settings, data_dir)
    model, cfg, tokenizer, device = load_checkpoint(resolved, device)
    seq_len = cfg.train.seq_len
    os.makedirs(out_dir, exist_ok=True)
    results = {"suite": suite, "checkpoint": os.path.abspath(checkpoint),
               "checkpoint_dir": os.path.abspath(resolved), **identity, "arch": cfg.model.arch,
               "tokenizer": cfg.data.tokenizer, "context": seq_len, "device": str(device),
               "data_dir": os.path.abspath(root) if (root := data_dir or _data_dir()) else None,  # what was read
               "settings": {s: settings[s] for s in sections}, "seconds": {}}
    gpt2 = None         # GPT-2 BPE, the unit of BABILong and S-NIAH lengths: loaded once, by the first of them
    for section in sections:
        started = time.time()
        try:
            if section == "perplexity":
                results[section] = perplexity_section(model, tokenizer, settings[section], seq_len, device,
                                                      data_dir, *_training_data(cfg), progress=progress)
            elif section == "continual":
                results[section] = continual_section(model, tokenizer, settings[section], seq_len, device, data_dir,
                                                     out_dir, cfg=cfg)
            else:
                if gpt2 is None:
                    from eval.babilong import length_tokenizer
                    gpt2 = length_tokenizer(data_dir)
                if section == "babilong":
                    # at the precision the run trained in (bf16 autocast on CUDA unless float32)
                    results[section] = babilong_section(model, tokenizer, settings[section], seq_len, device,
                                                        data_dir, out_dir, gpt2, dtype=cfg.train.dtype)
                else:
                    results[section] = niah_section(model, tokenizer, settings[section], seq_len, device, data_dir,
                                                    gpt2, dtype=cfg.train.dtype)
        except (FileNotFoundError, ImportError) as e:     # offline data or optional package missing
            results[section] = {"skipped": str(e)}
        results["seconds"][section] = time.time() - started
        if log:
            outcome = "skipped: " + results[section]["skipped"] if "skipped" in results[section] else "done"
            log(f"{section}: {outcome} ({results['seconds'][section]:.0f}s)")
            for note in results[section].get("notes", []):
                log(f"note: {note}")
    if earlier is not None:
        results = merge_results(earlier, results, sections)
        kept = [s for s in SECTIONS if s in earlier and s not in sections]
        if log and kept:
            log(f"kept from the earlier run in {out_dir}: {', '.join(kept)}")
    write_json(os.path.join(out_dir, "results.json"), results)
    write_atomic(os.path.join(out_dir, "results.md"), results_markdown(results))
    return results


def earlier_results(out_dir: str, checkpoint: str, suite: str, resolved: str, identity: dict | None = None
                    ) -> dict | None:
    """The results.json that an earlier run_suite wrote in out_dir, for this run's sections to
    be added to (merge_results), or None when there is none. `resolved` is
    resolve_checkpoint_arg(checkpoint), `identity` its checkpoint_identity. One that cannot be
    read, or that holds another checkpoint's (for an exported file: another step's or
    config's) or suite's numbers, is a ValueError: the two cannot be merged, and overwriting
    it would lose them."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.lexists(path):
        return None
    another_out = "choose another --out"
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError) as e:        # ValueError: not JSON, not UTF-8
        raise ValueError(f"--out {out_dir} holds a results.json that cannot be read ({one_line(e)}): "
                         f"{another_out}") from None
    not_ours = ValueError(f"--out {out_dir} holds a results.json that eval.run did not write: {another_out}")
    if not isinstance(earlier, dict):
        raise not_ours
    this_run = {"checkpoint": os.path.abspath(checkpoint), "suite": suite}
    if "checkpoint_dir" in earlier:     # an out_dir names its latest step: training may have moved on
        this_run["checkpoint_dir"] = os.path.abspath(resolved)
    if os.path.isfile(resolved):        # an exported file: the same path may now hold another export
        this_run.update(identity or {})
    for key, value in this_run.items():
        if key not in earlier:          # results written before eval.run recorded it
            raise ValueError(f"--out {out_dir} holds results that record no {key}, so whether they are of "
                             f"this {checkpoint} ({key} {value}) cannot be told: {another_out}")
        if earlier.get(key) != value:
            raise ValueError(f"--out {out_dir} holds the results of {key} {earlier.get(key)}, not {value}: "
                             f"{another_out}")
    # what merge_results reads, and the kept sections' tables for results.md: checked now, since
    # failing on them after the sections have run would lose the new numbers
    try:
        if not (isinstance(earlier.get("settings"), dict) and isinstance(earlier.get("seconds"), dict)):
            raise TypeError("no settings / seconds")
        results_markdown(earlier)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        raise not_ours from None
    return earlier


def merge_results(earlier: dict, new: dict, sections) -> dict:
    """new's sections (those run now) replace earlier's; earlier's other sections are kept with
    their settings and seconds. The rest (arch, device, ...) is new's."""
    merged = {key: value for key, value in new.items() if key not in SECTIONS}
    merged["settings"], merged["seconds"] = {}, {}
    for section in SECTIONS:          # in the suite's order, whichever run wrote them
        source = new if section in sections else earlier
        if section not in source:
            continue
        merged[section] = source[section]
        for key in ("settings", "seconds"):
            if section in source[key]:
                merged[key][section] = source[key][section]
    return merged


def _training_data(cfg):
    """(the prepared data the checkpoint trained on, None), or (None, why it cannot be read
    here: not prepared, damaged, or prepared with another tokenizer)."""
    from train import open_training_data, resolve_data_dir
    try:
        return open_training_data(cfg), None
    except FileNotFoundError:
        return None, f"the training data of this checkpoint is not prepared here ({resolve_data_dir(cfg)})"
    except ValueError as e:
        return None, str(e)


# -----------------------------------------------------------------------------
# results.md

def _cell(v, percent=False):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if percent:
            return f"{100 * v:.1f}"
        return f"{v:.4f}" if abs(v) < 1e6 else f"{v:.3e}"
    return str(v)


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _grid(title, table: dict, percent=True) -> str:
    """{row: {col: value}} -> a markdown table (values in % when percent)."""
    cols = list(dict.fromkeys(c for row in table.values() for c in row))
    rows = [[r] + [_cell(table[r].get(c), percent) for c in cols] for r in table]
    return f"{title}\n\n" + _table([""] + cols, rows)


PERPLEXITY_UNITS = ("loss: mean next-token NLL in nats per token of the checkpoint's tokenizer, perplexity = "
                    "exp(loss); wikitext word_perplexity per whitespace word, bits_per_byte per UTF-8 byte; lambada "
                    "perplexity per passage (its last word), accuracy a fraction (1.0 = all)")


def _perplexity_md(p) -> list:
    rows = [[task, metric, value] for task in ("val", "wikitext", "lambada") for metric, value in p[task].items()]
    return [f"{PERPLEXITY_UNITS}\n", _table(["task", "metric", "value"], rows)]


def _setting(value) -> str:
    # None is the paper suite's "no limit" (val_batches, wikitext_docs, lambada_passages)
    if value is None:
        return "all"
    return json.dumps(value, separators=(", ", ": ")) if isinstance(value, (dict, list)) else str(value)


def _settings_md(settings) -> str:
    """One line naming what a section scored: the quick suite scores a small part of each
    data set, which the numbers alone do not show."""
    return "settings: " + "; ".join(f"{key} {_setting(value)}" for key, value in settings.items()) + "\n"


def _scores_md(r, scores) -> list:
    """One grid of accuracies (%) per score, titled with the score's definition."""
    return [_grid(f"**{score}**: {r['scores'][score]}", r[score]) for score in scores]


BABILONG_UNTUNED = ("The checkpoint as given: the BABILong protocol fine-tunes on bAbI first (python -m "
                    "eval.babilong finetune; eval.reproduce does both), so these are not the paper's kind of score.")


def _babilong_md(b) -> list:
    return [f"{b['source']}; {b['context_handling']}\n", f"{BABILONG_UNTUNED}\n"] + _scores_md(
        b, ("official", "label_ranking"))


def _niah_md(n) -> list:
    handling = [f"{n['context_handling']}\n"] if n.get("context_handling") else []    # not in older results
    return handling + _scores_md(n, ("accuracy", "ranking_accuracy"))


def _continual_md(c) -> list:
    md = []
    for dataset, r in c["intents"].items():
        md.append(f"### Class-incremental {dataset}: {len(r['tasks'])} tasks\n")
        metrics = ("ACC", "BWT", "forgetting", "average_incremental_accuracy")
        md.append(_table(["arm", "ACC %", "BWT %", "forgetting %", "avg incremental %"],
                         [[arm] + [_cell(a[k], True) for k in metrics] for arm, a in r["arms"].items()]))
        for arm, a in r["arms"].items():
            grid = {f"after {a['tasks'][i]}": {a["tasks"][j]: v for j, v in enumerate(row)}
                    for i, row in enumerate(a["R"])}
            md.append(_grid(f"R matrix, {arm} (accuracy %)", grid))
    d = c.get("domains")
    if d:
        md.append("### Sequential domains: held-out perplexity\n")
        grid = {"initial": dict(zip(d["domains"], d["initial_perplexity"]))}
        grid.update({f"after {name}": dict(zip(d["domains"], row))
                     for name, row in zip(d["domains"], d["perplexity"])})
        md.append(_grid("rows: training stage; columns: evaluated domain", grid, percent=False))
        md.append(_table(["final mean ppl", "BWT (loss)", "mean forgetting (ppl)", "mean relative forgetting"],
                         [[d["final_mean_perplexity"], d["BWT_loss"], d["mean_forgetting"],
                           d["mean_relative_forgetting"]]]))
    return md


# section -> (heading in results.md, its markdown lines when it was not skipped)
SECTION_MARKDOWN = {
    "perplexity": ("## Perplexity\n", _perplexity_md),
    "babilong": ("## BABILong (accuracy %)\n", _babilong_md),
    "niah": ("## S-NIAH (accuracy %)\n", _niah_md),
    "continual": ("## Continual learning\n", _continual_md),
}


def results_markdown(results: dict) -> str:
    # the step scored: an out_dir as --checkpoint names its latest, which training moves on
    step = f" (step {results['checkpoint_step']})" if "checkpoint_step" in results else ""
    md = [f"# Evaluation: {results['arch']} ({results['suite']} suite)\n",
          f"checkpoint `{results['checkpoint']}`{step}, tokenizer {results['tokenizer']}, "
          f"context {results['context']}" + (f", offline data `{results['data_dir']}`" if results.get("data_dir") else "")
          + "\n"]
    for section, (heading, body) in SECTION_MARKDOWN.items():
        r = results.get(section)
        if r is not None:
            md.append(heading)
            if section in results.get("settings", {}):
                md.append(_settings_md(results["settings"][section]))
            md += [f"skipped: {r['skipped']}\n"] if "skipped" in r else body(r)
    return "\n".join(md)


# -----------------------------------------------------------------------------
# during training

def run_during_training(model, tokenizer, names, device=None, seq_len: int = 256, data_dir: str | None = None,
                        gpt2=None) -> dict:
    """Cheap evals for train.py's eval steps -> flat {metric name: float} for metrics.jsonl.

    names from config.DURING_TRAINING_EVALS (config.py checks eval.during_training against it;
    this check is for direct callers):
      perplexity       WikiText word ppl (1 article) and LAMBADA ppl/acc (50 passages)
      babilong_quick   BABILong qa1-qa2 at 0k/1k, 3 samples: mean official and label-ranking
                       accuracy per length
      niah_quick       S-NIAH pass-key at 1k, 2 samples: accuracy and ranking accuracy
      continual_quick  the icl and in_context_memory arms on CLINC 2 x 3 (no training): ACC, BWT
    The model's train/eval mode is restored; no parameter changes."""
    bad = [n for n in names if n not in DURING_TRAINING_EVALS]
    if bad:
        raise ValueError(f"unknown during-training eval(s) {bad}; choose from {', '.join(DURING_TRAINING_EVALS)}")
    device = device or model_device(model)
    quick = SUITES["quick"]
    metrics = {}
    if ("babilong_quick" in names or "niah_quick" in names) and gpt2 is None:
        from eval.babilong import length_tokenizer
        gpt2 = length_tokenizer(data_dir)
    if "perplexity" in names:
        p = perplexity_section(model, tokenizer, {**quick["perplexity"], "lambada_passages": 50}, seq_len, device,
                               data_dir)
        if "skipped" not in p["wikitext"]:
            metrics["wikitext_word_ppl"] = p["wikitext"]["word_perplexity"]
        if "skipped" not in p["lambada"]:
            metrics["lambada_ppl"], metrics["lambada_acc"] = p["lambada"]["perplexity"], p["lambada"]["accuracy"]
    if "babilong_quick" in names:
        b = babilong_section(model, tokenizer, quick["babilong"], seq_len, device, data_dir, gpt2=gpt2)
        for score in ("official", "label_ranking"):
            for length, v in b["mean_over_tasks"][score].items():
                metrics[f"babilong_{score}_{length}"] = v
    if "niah_quick" in names:
        n = niah_section(model, tokenizer, quick["niah"], seq_len, device, data_dir, gpt2=gpt2)
        for score in ("accuracy", "ranking_accuracy"):
            for task, per_length in n[score].items():
                for length, v in per_length.items():
                    metrics[f"niah_{score}_{task}_{length}"] = v
    if "continual_quick" in names:
        c = continual_section(model, tokenizer, quick["continual"], seq_len, device, data_dir,
                              arms=["icl", "in_context_memory"], domains=False)
        for arm, r in c["intents"]["clinc"]["arms"].items():
            metrics[f"continual_{arm}_ACC"], metrics[f"continual_{arm}_BWT"] = r["ACC"], r["BWT"]
    return metrics


# -----------------------------------------------------------------------------
# CLI

def main(argv=None):
    parser = OneLineArgumentParser(prog="python -m eval.run", description="Run the evaluation suite.")
    parser.add_argument("--suite", default="quick", help="quick | paper")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint dir, a training out_dir or an exported .safetensors")
    parser.add_argument("--out", required=True, help="output folder (results.json, results.md, plots)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    parser.add_argument("--data-dir", help=DATA_DIR_HELP)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    with exit_on_error():
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        if not sections:
            raise ValueError(f"--sections {args.sections!r} names no section; choose from {', '.join(SECTIONS)}")
        results = run_suite(args.checkpoint, args.suite, args.out, args.device, args.data_dir, sections,
                            progress=True)
    print(f"wrote {os.path.join(args.out, 'results.json')} and results.md")
    return results


if __name__ == "__main__":
    main()
