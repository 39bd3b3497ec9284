"""
Reproduce the papers' tables (docs/REPRODUCE.md): the training and evaluation commands for
every row, and a markdown table with our numbers next to the paper's.

    python -m eval.reproduce TABLE [--run] [--nproc N] [--results-root DIR] [--out DIR]
                             [--train-args "--train.compile=true ..."] [--ablation-base CONFIG]
    python -m eval.reproduce zeroshot --checkpoint DIR --out DIR [--device auto] [--limit N]

TABLE is one of
    nl_table2      NL Table 2: Transformer++ / Titans (LMM) / Hope at 760M-30B and 1.3B-100B
    nl_table6      NL Table 6: Hope ablations (the paper's scale is inferred as 1.3B-100B)
    titans_table1  Titans Table 1: Transformer++ and Titans LMM / MAC / MAG / MAL at 340M and 760M
    nl_niah        NL Table 1 (S-NIAH, 50B tokens) and Titans Table 2 (S-NIAH pass-key / number)
    babilong       BABILong after the fine-tuning curriculum (figure only in the papers)
    continual      class-incremental CLINC / Banking77 and sequential domains (figure only)

Without --run the commands are printed as a shell script (each step marked done or todo);
with --run they are executed one after the other, skipping every step whose output already
exists, so an interrupted reproduction continues where it stopped (training itself resumes
from its last checkpoint: train.resume=auto). Either way the eval JSONs found under the
results root are then collected into <out>/<TABLE>.md (and printed). Each cell reads
"ours / paper"; "—" marks a number we do not have (not run yet, or not run by this repo).

Layout under the results root (default out/reproduce): runs/<run>/ is a training out_dir
(checkpoints, metrics.jsonl); runs/<run>/eval/<kind>/ holds one evaluation. Runs have names
(config name plus the ablation or token-count suffix) and are shared between tables: the
Hope-1.3B run serves NL Table 2 and Table 6, the 760M runs serve BABILong and continual.

`zeroshot` runs lm-evaluation-harness (pip install -r requirements-eval.txt) on the seven
zero-shot tasks of the tables that eval.run does not compute (PIQA, HellaSwag, WinoGrande,
ARC-e, ARC-c, SIQA, BoolQ; WikiText and LAMBADA come from eval.run's perplexity section,
which follows lm-eval's definitions) and writes <out>/zeroshot.json.
"""
from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

from cli import (OneLineArgumentParser, check_output_dir, keep_aside, one_line, positive_int, read_text, write_atomic,
                 write_json)
from eval.common import exit_on_error
from eval.paper_numbers import (FIGURE_ONLY, NL_TABLE1_SNIAH, NL_TABLE2, NL_TABLE6, TITANS_TABLE1,
                                TITANS_TABLE2, average_accuracy)

TABLES = ("nl_table2", "nl_table6", "titans_table1", "nl_niah", "babilong", "continual")
DEFAULT_RESULTS_ROOT = os.path.join("out", "reproduce")
BATCH_TOKENS = 524_288                 # 128 x 4096, the papers' 0.5M-token batch
NIAH_STEPS = round(50e9 / BATCH_TOKENS)   # NL §9.2: long-context models trained on 50B tokens

# lm-eval task -> (metric the papers report, our column). HellaSwag and ARC-c are acc_norm
# (NL Table 2 / Titans Table 1 headers).
ZERO_SHOT_TASKS = {
    "piqa": ("acc", "piqa"),
    "hellaswag": ("acc_norm", "hellaswag"),
    "winogrande": ("acc", "winogrande"),
    "arc_easy": ("acc", "arc_easy"),
    "arc_challenge": ("acc_norm", "arc_challenge"),
    "social_iqa": ("acc", "siqa"),
    "boolq": ("acc", "boolq"),
}

# BABILong (Kuratov et al. 2024, evals.md §1.6): fine-tune small models with a length
# curriculum up to 16K on qa1-qa5, then evaluate far beyond it (NL Fig. 9 goes to 10M).
BABILONG_TASKS = "qa1,qa2,qa3,qa4,qa5"
BABILONG_FINETUNE_LENGTHS = "0k,1k,2k,4k,8k,16k"
BABILONG_EVAL_LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "512k", "1M")

EVAL_FILES = {                         # eval kind -> its output under runs/<run>/
    "perplexity": "eval/perplexity/results.json",
    "zeroshot": "eval/zeroshot/zeroshot.json",
    "niah": "eval/niah/results.json",
    "niah_titans": "eval/niah_titans/niah.json",
    "babilong": "eval/babilong/babilong.json",
    "continual": "eval/continual/results.json",
}


class ReproduceError(ValueError):
    """A bad table name or option; the message is one line for `error: ...`."""


# -----------------------------------------------------------------------------
# what each table needs: runs (training jobs), rows (a run or nothing, plus the paper's row)

@dataclass(frozen=True)
class Run:
    """One training job: a config file plus overrides, trained into runs/<name>/."""
    name: str
    config: str
    overrides: tuple = ()


@dataclass(frozen=True)
class Row:
    label: str                         # the row label in our table
    group: str                         # the table group (e.g. "760M / 30B")
    run: Run | None = None             # None: the paper's row only (a model this repo lacks)
    paper: str | None = None           # the paper's row name in that group (None: our extra row)
    note: str = ""
    paper_group: str | None = None     # the paper's group, where it is not `group` (nl_table6 at 760M / 340M)


def _run(config: str, suffix: str = "", *overrides: str) -> Run:
    return Run(config + (f"-{suffix}" if suffix else ""), os.path.join("configs", f"{config}.yaml"), overrides)


def _paper_rows(table, group, ours: dict, notes: dict | None = None) -> list[Row]:
    """Every row of a paper group, in the paper's order, with our run where we have one."""
    notes = notes or {}
    return [Row(model, group, ours.get(model), model, notes.get(model, "" if model in ours else "paper only"))
            for model in table.groups[group]]


# NL Table 6: each ablation is one switch of model.hope (DESIGN §3.5 mirrors the table).
ABLATIONS = (
    ("w/o DGD (plain GD)", "gd", ("--model.hope.inner_opt=gd",), ""),
    ("w/o weight decay (α)", "noretention", ("--model.hope.retention=false",), ""),
    ("w/o CMS", "nocms", ("--model.hope.cms=false",), ""),
    ("w/o inner-projection k", "statick", ("--model.hope.adaptive_k=false",), ""),
    ("w/o inner-projection v", "staticv", ("--model.hope.adaptive_v=false",), ""),
)
ABLATION_BASES = ("hope_1.3b", "hope_760m", "hope_340m")


def table_rows(table: str, ablation_base: str = "hope_1.3b") -> list[Row]:
    if table not in TABLES:
        raise ReproduceError(f"unknown table {table!r}; choose from {', '.join(TABLES)}")
    if table == "nl_table2":
        return (_paper_rows(NL_TABLE2, "760M / 30B", {"Transformer++": _run("transformer_760m"),
                                                       "Titans": _run("titans_lmm_760m"), "Hope": _run("hope_760m")})
                + _paper_rows(NL_TABLE2, "1.3B / 100B", {"Transformer++": _run("transformer_1.3b"),
                                                          "Titans": _run("titans_lmm_1.3b"), "Hope": _run("hope_1.3b")}))
    if table == "nl_table6":
        if ablation_base not in ABLATION_BASES:
            raise ReproduceError(f"unknown --ablation-base {ablation_base!r}; choose from {', '.join(ABLATION_BASES)}")
        paper_group = next(iter(NL_TABLE6.groups))
        base = _run(ablation_base)
        group, scale_note = paper_group, ""
        if ablation_base != "hope_1.3b":    # our runs are at the base's scale, the paper's numbers at 1.3B
            tokens = run_config(base).train.max_steps * BATCH_TOKENS / 1e9
            group = f"{ablation_base.split('_', 1)[1].upper()} / {tokens:.0f}B"
            scale_note = f"paper's numbers: {paper_group}, not {group}"

        def row(label, run, paper, note=""):
            note = "; ".join(n for n in (note, scale_note if paper else "") if n)
            return Row(label, group, run, paper, note, paper_group if group != paper_group else None)
        rows = []
        by_label = {label: (suffix, overrides, note) for label, suffix, overrides, note in ABLATIONS}
        for label in NL_TABLE6.groups[paper_group]:
            if label == "Hope":
                rows.append(row(label, base, label))
            elif label == "w/o Momentum":
                rows.append(row(label, None, label, "our Hope has no inner momentum to remove (DESIGN §3.5)"))
            elif label == "w/o inner-projection q":
                rows.append(row(label, base, label, "= our Hope: q is static by default (NL §8.1)"))
            else:
                suffix, overrides, note = by_label[label]
                rows.append(row(label, _run(ablation_base, suffix, *overrides), label, note))
        rows.append(row("Hope + adaptive q (ours)", _run(ablation_base, "adaptiveq", "--model.hope.adaptive_q=true"),
                        None, "q made a memory too: the inverse of the q row"))
        return rows
    if table == "titans_table1":
        rows = []
        for size, group in (("340m", "340M / 15B"), ("400m", "400M / 15B"), ("760m", "760M / 30B")):
            if size == "400m":        # no 400M configs: how the Titans paper's 400M models differ is not stated
                rows += _paper_rows(TITANS_TABLE1, group, {})
                continue
            star = "*" if size == "340m" else ""
            ours = {"Transformer++": _run(f"transformer_{size}")}
            ours.update({f"{v.upper()}{star if v != 'lmm' else ''}": _run(f"titans_{v}_{size}")
                         for v in ("lmm", "mac", "mag", "mal")})
            rows += _paper_rows(TITANS_TABLE1, group, ours)
        return rows
    if table == "nl_niah":
        tokens50 = f"--train.max_steps={NIAH_STEPS}"
        rows = _paper_rows(NL_TABLE1_SNIAH, "50B tokens", {
            "Transformer": _run("transformer_760m", "50b", tokens50),
            "Hope-Attention": _run("hope_attention_760m", "50b", tokens50),
            "Titans": _run("titans_lmm_760m", "50b", tokens50),
            "Hope": _run("hope_760m", "50b", tokens50)})
        rows += _paper_rows(TITANS_TABLE2, "Titans S-NIAH",
                            {v.upper(): _run(f"titans_{v}_760m") for v in ("lmm", "mac", "mag", "mal")},
                            {v.upper(): "760M / 30B run (the paper's size is not stated)"
                             for v in ("lmm", "mac", "mag", "mal")})
        return rows
    group = "760M / 30B (ours)"
    if table == "babilong":
        return [Row("Titans (MAC)", group, _run("titans_mac_760m")), Row("Hope", group, _run("hope_760m")),
                Row("Transformer++", group, _run("transformer_760m"), note="attention: reads its last 4K tokens")]
    return [Row("Hope", group, _run("hope_760m")), Row("Hope-Attention", group, _run("hope_attention_760m")),
            Row("Titans (LMM)", group, _run("titans_lmm_760m")), Row("Transformer++", group, _run("transformer_760m"))]


def eval_kinds(table: str, row: Row) -> tuple:
    """The evaluations a row of a table needs."""
    if table in ("nl_table2", "nl_table6", "titans_table1"):
        return ("perplexity", "zeroshot")
    if table == "nl_niah":
        return ("niah_titans",) if row.group == "Titans S-NIAH" else ("niah",)
    return (table,)                     # babilong, continual


# -----------------------------------------------------------------------------
# commands

@dataclass
class Step:
    """One command and the file whose existence means it is done (step_status). For an
    evaluation, that JSON must also record `source` as its checkpoint (not one of an earlier,
    shorter training into the same folder) and hold no skipped section among `needs` (key
    paths, e.g. ("perplexity", "wikitext"): eval.run records missing data as {"skipped": why})."""
    title: str
    argv: list
    marker: str
    run: Run | None = field(default=None, compare=False)
    source: str | None = field(default=None, compare=False)
    needs: tuple = field(default=(), compare=False)
    settings: dict = field(default_factory=dict, compare=False)     # "a/b" key path -> the value it must hold
    cfg: object = field(default=None, compare=False)                # a training step: the run's config (resume_note)


def _same_checkpoint(recorded, expected) -> bool:
    """Whether a recorded checkpoint path is the expected one: their last three parts
    (<run>/checkpoints/step_N, <run>/babilong_ft/step_N) agree, so a results root moved or
    copied elsewhere keeps its finished evals."""
    def tail(path):
        return os.path.normpath(os.path.abspath(path)).split(os.sep)[-3:]
    return tail(recorded) == tail(expected)


def step_status(s: Step) -> tuple[bool, str | None]:
    """(done?, why not, where its output exists but does not count)."""
    if not os.path.exists(s.marker):
        return False, None
    if s.source is None and not s.needs:
        return True, None
    data = load_result(s.marker)
    if not isinstance(data, dict):
        return False, f"{s.marker} is not a results object"
    if s.source is not None:
        # eval.run records the step folder it resolved as checkpoint_dir; the other evals the path given
        recorded = data.get("checkpoint_dir") or data.get("checkpoint")
        if not isinstance(recorded, str) or not _same_checkpoint(recorded, s.source):
            return False, f"{s.marker} scored the checkpoint {recorded}, not the run's final {s.source}"
    for key, wanted in s.settings.items():      # e.g. eval.run's suite settings, zeroshot's limit
        made = list(_levels(data, key.split("/")))[-1]
        if made != wanted:
            return False, f"{s.marker} was made with other settings ({key}: {one_line(repr(made))[:80]})"
    for keys in s.needs:
        for depth, section in enumerate(_levels(data, keys)):
            if isinstance(section, dict) and "skipped" in section:
                return False, (f"{s.marker}: section {'/'.join(keys[:depth + 1])} was skipped: "
                               f"{one_line(section['skipped'])}")
    return True, None


def resume_note(s: Step) -> str | None:
    """For a training step not yet done, what train.py (train.resume=auto) will do with the
    checkpoints a shorter run left in its folder, e.g. a smoke run with --train.max_steps=2
    into the same results root: resume from them, or refuse them as another model's
    (check_resume_config). One line, None where the folder holds none."""
    if s.cfg is None or os.path.exists(s.marker):
        return None
    from checkpoint import find_checkpoint, step_number
    from config import check_vocab
    from train import check_resume_config
    ckpt_root = os.path.dirname(os.path.dirname(s.marker))
    out_dir = os.path.dirname(ckpt_root)
    cfg = copy.deepcopy(s.cfg)
    check_vocab(cfg)                               # vocab_size 0 = the tokenizer's, as train.py checks it
    try:
        ckpt = find_checkpoint(ckpt_root) if os.path.isdir(ckpt_root) else None
        if ckpt is None:
            return None
        check_resume_config(cfg, ckpt)
    except (OSError, ValueError) as e:             # ValueError: ConfigError, an unreadable `latest`
        return (f"{out_dir} holds checkpoints that train.py will refuse to resume ({one_line(e)}): move it aside "
                "first; smoke runs belong under another --results-root")
    return (f"{out_dir} holds checkpoints up to step {step_number(os.path.basename(ckpt))} of "
            f"{s.cfg.train.max_steps}: training resumes from them; move it aside first to train from scratch")


def _levels(data, keys):
    """data[k1], data[k1][k2], ...: each level along a key path ("(none)" from a missing one on)."""
    for key in keys:
        data = data.get(key, "(none)") if isinstance(data, dict) else "(none)"
        yield data


def run_dir(root: str, run: Run) -> str:
    return os.path.join(root, "runs", run.name)


def run_config(run: Run, train_args: tuple = ()):
    """The run's config with its overrides and `train_args`, checked as train.py would."""
    from config import ConfigError, load_config
    if not os.path.isfile(run.config):
        raise ReproduceError(f"config {run.config} not found (run from the repository root)")
    try:
        return load_config(run.config, list(run.overrides) + list(train_args))
    except ConfigError as e:
        raise ReproduceError(f"{run.name}: {e}") from None


def _without_override(args, key) -> list:
    """`args` (config overrides) without those setting `key`, in either form: --key=VALUE or
    --key VALUE (config.parse_overrides)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        name = a[2:].split("=", 1)[0].replace("-", "_") if a.startswith("--") else None
        if name == key:
            skip = "=" not in a            # the value is the next argument
            continue
        out.append(a)
    return out


def train_step(run: Run, root: str, nproc: int = 1, train_args: tuple = (), cfg=None) -> Step:
    """torchrun command (python -m torch.distributed.run) for a run. The global batch stays 128 x 4096; with N ranks the
    micro-batch per rank stays the config's (batch_size / grad_accum sequences, sized for
    one GPU) and grad_accum shrinks by N (docs/DISTRIBUTED.md). `cfg`: the run's
    `run_config`, when the caller has it."""
    cfg = cfg or run_config(run, train_args)
    t = cfg.train
    micro = t.batch_size // t.grad_accum
    if t.batch_size % nproc:
        raise ReproduceError(f"--nproc {nproc} does not divide {run.name}'s train.batch_size={t.batch_size}")
    per_rank = t.batch_size // nproc
    accum = max(1, per_rank // micro)
    while per_rank % accum:
        accum -= 1
    out = run_dir(root, run)
    # torchrun through this interpreter (execute swaps "python" for sys.executable): no torchrun on PATH needed
    argv = ["python", "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
            run.config, f"--train.out_dir={out}", *run.overrides]
    if accum != t.grad_accum:           # replaces a --train.grad_accum of train_args (the one per rank)
        argv.append(f"--train.grad_accum={accum}")
        train_args = _without_override(train_args, "train.grad_accum")
    argv += list(train_args)
    from checkpoint import TRAINER_STATE
    marker = os.path.join(out, "checkpoints", f"step_{t.max_steps:06d}", TRAINER_STATE)
    return Step(f"train {run.name}", argv, marker, run, cfg=cfg)


# eval.run section -> the parts of it the tables read: a skipped one leaves its step to do
NEEDED_SECTIONS = {"perplexity": (("perplexity", "wikitext"), ("perplexity", "lambada")),
                   "niah": (("niah",),), "continual": (("continual", "intents"), ("continual", "domains"))}


def eval_steps(kind: str, run: Run, root: str, final: str) -> list[Step]:
    """The steps of one evaluation `kind` of a run: runs/<run>/eval/<kind>/, marked done by
    its EVAL_FILES entry once that records the checkpoint `final` (the folder of the run's last
    step, which each eval is given) and skipped none of the NEEDED_SECTIONS."""
    rundir = run_dir(root, run)
    out = os.path.join(rundir, os.path.dirname(EVAL_FILES[kind]))
    marker = os.path.join(rundir, EVAL_FILES[kind])
    title = f"{kind} {run.name}"
    if kind in ("perplexity", "niah", "continual"):
        from eval.run import SUITES            # results of other settings (an earlier 4K-cut NIAH) do not count
        return [Step(title, ["python", "-m", "eval.run", "--suite", "paper", "--sections", kind,
                             "--checkpoint", final, "--out", out], marker, run, final, NEEDED_SECTIONS[kind],
                     {f"settings/{kind}": SUITES["paper"][kind]})]
    if kind == "zeroshot":
        return [Step(title, ["python", "-m", "eval.reproduce", "zeroshot", "--checkpoint", final, "--out", out],
                     marker, run, final, settings={"limit": None})]
    if kind == "niah_titans":          # Titans Table 2: pass-key and number at 2K-16K (no word-needle task here)
        return [Step(title, ["python", "-m", "eval.niah", "--checkpoint", final, "--tasks", "1,2",
                             "--lengths", "2k,4k,8k,16k", "--samples", "100", "--out", out], marker, run, final)]
    # one fine-tuned folder per source step: a shorter run's fine-tune is never taken for the final one's
    return babilong_steps(run, final, out, BABILONG_TASKS, BABILONG_FINETUNE_LENGTHS, ",".join(BABILONG_EVAL_LENGTHS),
                          finetune=("--steps", "2000", "--batch-size", "8", "--lr", "1e-4"),
                          evaluate=("--samples", "100"),
                          finetuned=os.path.join(rundir, "babilong_ft", os.path.basename(final)))


def babilong_steps(run: Run, ckpt: str, out: str, tasks: str, finetune_lengths: str, eval_lengths: str,
                   finetune: tuple = (), evaluate: tuple = (), finetuned: str | None = None) -> list[Step]:
    """BABILong's protocol (evals.md §1.6) as two steps: fine-tune the checkpoint `ckpt` on
    `tasks` over `finetune_lengths` into `finetuned` (default ckpt/babilong_ft), then evaluate
    that at `eval_lengths` into out/babilong.json, which must record it. `finetune` and
    `evaluate` are each command's further options."""
    finetuned = finetuned or os.path.join(ckpt, "babilong_ft")
    return [Step(f"babilong fine-tune {run.name}",
                 ["python", "-m", "eval.babilong", "finetune", "--checkpoint", ckpt, "--tasks", tasks,
                  "--lengths", finetune_lengths, *finetune, "--out", finetuned],
                 os.path.join(finetuned, "checkpoints", "latest"), run),
            Step(f"babilong {run.name}",
                 ["python", "-m", "eval.babilong", "eval", "--checkpoint", finetuned, "--tasks", tasks,
                  "--lengths", eval_lengths, *evaluate, "--out", out], os.path.join(out, "babilong.json"), run,
                 finetuned)]


def prepare_step(cfg) -> Step | None:
    """data.prepare for a run's corpus (into the folder train.py reads), before any torchrun
    launch: train.py would prepare it on rank 0 while the other ranks wait at a collective
    bounded by distributed.timeout_s, far shorter than tokenizing sample-100BT. None when the
    config (a run's `run_config`) names an already prepared folder."""
    from train import resolve_data_dir, source_settings
    d, out = cfg.data, resolve_data_dir(cfg)
    if out == d.dataset:
        return None
    # the data.prepare flags of the settings train.py passes for this source (train.prepare_data)
    argv = ["python", "-m", "data.prepare", "--source", d.dataset, "--tokenizer", d.tokenizer, "--out", out,
            "--workers", str(d.num_workers)]
    for key in source_settings(d).values():
        value = getattr(d, key)
        if key == "hf_streaming":
            argv += ["--streaming"] if value else []
        elif value not in (None, ""):
            flag = {"hf_split": "--split", "hf_data_files": "--data-files"}.get(key, "--" + key.replace("_", "-"))
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return Step(f"prepare {d.dataset} ({d.tokenizer})", argv, os.path.join(out, "meta.json"))


def plan(table: str, root: str = DEFAULT_RESULTS_ROOT, nproc: int = 1, train_args: tuple = (),
         ablation_base: str = "hope_1.3b") -> list[Step]:
    """Data preparation first (each corpus once), then training (each run once), then the
    evaluations, in row order, the zero-shot ones last."""
    if nproc < 1:
        raise ReproduceError(f"--nproc must be >= 1, got {nproc}")
    rows = [r for r in table_rows(table, ablation_base) if r.run is not None]
    prepares, trains, evals, seen, final = {}, [], [], set(), {}
    for row in rows:
        if row.run.name not in seen:
            cfg = run_config(row.run, train_args)
            trains.append(train_step(row.run, root, nproc, train_args, cfg))
            final[row.run.name] = os.path.dirname(trains[-1].marker)
            prepare = prepare_step(cfg)
            if prepare is not None:
                prepares.setdefault(prepare.marker, prepare)
        for kind in eval_kinds(table, row):
            if (row.run.name, kind) not in seen:
                evals += eval_steps(kind, row.run, root, final[row.run.name])
                seen.add((row.run.name, kind))
        seen.add(row.run.name)
    # the zero-shot steps last: they need lm-eval and the Hub, so where those are missing --run
    # stops at the first of them after every local evaluation has run, not after one run's
    evals.sort(key=lambda s: s.title.startswith("zeroshot "))
    return list(prepares.values()) + trains + evals


def script(table: str, steps: list[Step], root: str) -> str:
    """The plan as a shell script; `python` stands for the interpreter running this."""
    runs = sum(s.title.startswith("train ") for s in steps)
    prepares = sum(s.title.startswith("prepare ") for s in steps)
    lines = [f"# {table}: {prepares} data preparation(s), {runs} training runs, {len(steps) - runs - prepares} "
             f"evaluation steps; results under {root}"]
    for s in steps:
        done, why = step_status(s)
        note = f"{why}; --run keeps it aside" if why else resume_note(s)
        lines.append(f"# [{'done' if done else 'todo'}] {s.title}" + (f" ({note})" if note else ""))
        lines.append(shlex.join(s.argv))
    return "\n".join(lines) + "\n"


def execute(steps: list[Step], runner=subprocess.run, log=print) -> int:
    """Run every step that is not done (step_status), in order; stop at the first failure. An
    output that does not count (another checkpoint's numbers, a skipped section) is kept aside
    as <stem>.previous<ext> first, with the <stem>.md written beside it (eval.run's results.md:
    an interrupted redo would leave the old one describing no results.json, or the new one).
    Returns the number of steps run."""
    ran = 0
    for s in steps:
        done, why = step_status(s)
        if done:
            log(f"skip (done): {s.title}")
            continue
        if why:
            kept = [keep_aside(path) for path in (s.marker, os.path.splitext(s.marker)[0] + ".md")]
            log(f"redo {s.title}: {why}; kept aside as {' and '.join(k for k in kept if k)}")
        elif note := resume_note(s):
            log(f"note: {note}")
        argv = [sys.executable if a == "python" and i == 0 else a for i, a in enumerate(s.argv)]
        log(f"run: {shlex.join(s.argv)}")
        code = runner(argv).returncode
        if code != 0:
            raise RuntimeError(f"step '{s.title}' failed with exit code {code}: {shlex.join(s.argv)}")
        done, why = step_status(s)
        if not done:
            raise RuntimeError(f"step '{s.title}' finished but " + (f"did not write {s.marker}" if why is None
                                                                     else f"does not count as done: {why}"))
        ran += 1
    return ran


# -----------------------------------------------------------------------------
# collecting our numbers

def load_result(path: str):
    """A step's JSON, None before the step has run; a damaged one (an eval killed while writing
    it, an edit) is a ReproduceError naming it, as its step counts as done while it exists."""
    if not os.path.isfile(path):
        return None
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ReproduceError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); "
                             "delete it to run its step again") from None
    except ValueError as e:                              # not UTF-8: read_text names the file
        raise ReproduceError(f"{e}; delete it to run its step again") from None


def result_at(data, *keys):
    """data[k1][k2]...; None when any level is missing or was skipped. A leaf is a number (every
    metric the tables read is one); anything else is a ReproduceError naming the keys."""
    for k in keys:
        if not isinstance(data, dict) or k not in data or (isinstance(data[k], dict) and "skipped" in data[k]):
            return None
        data = data[k]
    return data if isinstance(data, dict) else _number(data, "/".join(map(str, keys)))


class _NotANumber(ReproduceError):
    """A metric that is not a number; markdown() adds the run folder."""


def _number(value, where: str):
    """VALUE when it is None or a number: a results file edited by hand may hold text."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise _NotANumber(f"'{where}' is {value!r}, not a number")


def _table(value, where: str) -> dict:
    """VALUE when it is a dict ({} for None): per-length or per-task cells."""
    if value is None or isinstance(value, dict):
        return value or {}
    raise _NotANumber(f"'{where}' is {value!r}, not a table")


def _percent(v):
    return None if v is None else 100.0 * v


def lm_metrics(run_path: str) -> dict:
    """NL Table 2 / Titans Table 1 columns from eval.run (WikiText, LAMBADA) and zeroshot.json."""
    res = load_result(os.path.join(run_path, EVAL_FILES["perplexity"]))
    zs = load_result(os.path.join(run_path, EVAL_FILES["zeroshot"]))
    row = {"wiki_ppl": result_at(res, "perplexity", "wikitext", "word_perplexity"),
           "lmb_ppl": result_at(res, "perplexity", "lambada", "perplexity"),
           "lmb_acc": _percent(result_at(res, "perplexity", "lambada", "accuracy"))}
    for task, (_, column) in ZERO_SHOT_TASKS.items():
        row[column] = _percent(result_at(zs, "accuracy", task))
    row["avg"] = average_accuracy(row)
    # NL Table 6: ppl = mean(Wiki, LMB) and acc = Avg (paper-digest §5.7)
    row["ppl"] = None if None in (row["wiki_ppl"], row["lmb_ppl"]) else (row["wiki_ppl"] + row["lmb_ppl"]) / 2
    row["acc"] = row["avg"]
    return row


def _niah_cell(accuracy: dict, task: int, length: str):
    """Lengths are labelled '4k' (eval.run, and eval.niah since 2026-11-27); niah.json files
    written before then keyed them by token count ('4096'), which is still read."""
    cells = _table(_table(accuracy, "accuracy").get(f"niah_single_{task}"), f"niah_single_{task}")
    tokens = str(int(length[:-1]) * 1024)
    value = cells.get(length, cells.get(tokens))
    return _percent(_number(value, f"niah_single_{task}/{length}"))


def niah_metrics(run_path: str, titans: bool) -> dict:
    if titans:
        acc = result_at(load_result(os.path.join(run_path, EVAL_FILES["niah_titans"])), "accuracy")
        row = {f"{name}_{length}": _niah_cell(acc, task, length)
               for task, name in ((1, "pk"), (2, "n")) for length in ("2k", "4k", "8k", "16k")}
        row.update({f"w_{length}": None for length in ("2k", "4k", "8k", "16k")})   # no word-needle task
        return row
    acc = result_at(load_result(os.path.join(run_path, EVAL_FILES["niah"])), "niah", "accuracy")
    return {f"s_niah_{task}_{length}": _niah_cell(acc, task, length)
            for task in (1, 2, 3) for length in ("4k", "8k", "16k")}


def babilong_metrics(run_path: str) -> dict:
    """Official accuracy, mean over qa1-qa5, per length."""
    means = _table(result_at(load_result(os.path.join(run_path, EVAL_FILES["babilong"])), "mean_over_tasks", "official"),
                   "mean_over_tasks/official")
    return {length: _percent(_number(means.get(length), f"mean_over_tasks/official/{length}"))
            for length in BABILONG_EVAL_LENGTHS}


CONTINUAL_ARMS = ("sequential", "in_context_memory")


def continual_metrics(run_path: str) -> dict:
    res = result_at(load_result(os.path.join(run_path, EVAL_FILES["continual"])), "continual")
    row = {}
    for dataset in ("clinc", "banking"):
        for arm in CONTINUAL_ARMS:
            arm_result = result_at(res, "intents", dataset, "arms", arm)
            row[f"{dataset}_{arm}_acc"] = _percent(result_at(arm_result, "ACC"))
            row[f"{dataset}_{arm}_bwt"] = _percent(result_at(arm_result, "BWT"))
    row["domains_forgetting"] = result_at(res, "domains", "mean_forgetting")
    return row


# -----------------------------------------------------------------------------
# markdown

@dataclass(frozen=True)
class Layout:
    title: str
    columns: tuple                     # (key, header, decimals)
    paper: object = None               # PaperTable, or None for figure-only results
    metrics: object = None             # run_path -> {key: value}


_LM_HEADERS = {"wiki_ppl": "Wiki ppl↓", "lmb_ppl": "LMB ppl↓", "lmb_acc": "LMB acc", "piqa": "PIQA",
               "hellaswag": "Hella acc_n", "winogrande": "Wino", "arc_easy": "ARC-e", "arc_challenge": "ARC-c acc_n",
               "siqa": "SIQA", "boolq": "BoolQ", "avg": "Avg", "ppl": "ppl↓ (mean Wiki, LMB)", "acc": "acc (Avg)"}


def _lm_columns(keys):
    return tuple((k, _LM_HEADERS[k], 2 if k in ("wiki_ppl", "lmb_ppl", "ppl", "avg") else 1) for k in keys)


def layouts(table: str, ablation_base: str = "hope_1.3b") -> list[tuple[Layout, list[Row]]]:
    """The markdown tables of TABLE: (layout, rows) pairs."""
    rows = table_rows(table, ablation_base)
    if table in ("nl_table2", "titans_table1", "nl_table6"):
        paper = {"nl_table2": NL_TABLE2, "titans_table1": TITANS_TABLE1, "nl_table6": NL_TABLE6}[table]
        layout = Layout(paper.source, _lm_columns(paper.columns), paper, lm_metrics)
        return [(layout, rows)]
    if table == "nl_niah":
        nl = Layout(NL_TABLE1_SNIAH.source, tuple((c, c.replace("s_niah_", "S-NIAH-").replace("_", " "), 1)
                                                   for c in NL_TABLE1_SNIAH.columns),
                    NL_TABLE1_SNIAH, lambda p: niah_metrics(p, titans=False))
        titans = Layout(TITANS_TABLE2.source + "; W (word needle) has no counterpart in eval/niah.py",
                        tuple((c, c.replace("_", " ").upper(), 1) for c in TITANS_TABLE2.columns),
                        TITANS_TABLE2, lambda p: niah_metrics(p, titans=True))
        return [(nl, [r for r in rows if r.group != "Titans S-NIAH"]),
                (titans, [r for r in rows if r.group == "Titans S-NIAH"])]
    if table == "babilong":
        layout = Layout("BABILong after fine-tuning: official accuracy %, mean over qa1-qa5 (paper: "
                        + FIGURE_ONLY["babilong"] + ")",
                        tuple((length, length, 1) for length in BABILONG_EVAL_LENGTHS), None, babilong_metrics)
        return [(layout, rows)]
    arms = {"sequential": "seq", "in_context_memory": "ICM"}
    columns = tuple((f"{d}_{arm}_{m}", f"{d.upper() if d == 'clinc' else 'Banking'} {m.upper()} {arms[arm]}", 1)
                    for d in ("clinc", "banking") for arm in CONTINUAL_ARMS for m in ("acc", "bwt"))
    columns += (("domains_forgetting", "domains forgetting (ppl)", 2),)
    layout = Layout("Continual learning, % (paper: " + FIGURE_ONLY["continual"] + "; seq = sequential "
                    "fine-tuning, ICM = in-context memory, eval/continual.py)", columns, None, continual_metrics)
    return [(layout, rows)]


def _metrics_of(layout: Layout, run_path: str) -> dict:
    try:
        return layout.metrics(run_path)
    except _NotANumber as e:
        raise ReproduceError(f"a results file under {run_path}: {e}; fix it, or delete it to run "
                             "its step again") from None


# what our perplexity columns are: the same definitions as the paper's (lm-eval's), not the same text or tokens
OUR_PERPLEXITY_NOTE = ("Our Wiki ppl is eval.run's WikiText-2 word perplexity on the offline copy in the data folder, "
                       "which has no blank lines: close to lm-eval's, not identical (docs/EVAL.md, \"Offline data "
                       "caveat\"); ours are GPT-2 BPE models, the paper's Llama-2 tokenizer ones (docs/REPRODUCE.md, "
                       "\"What differs from the papers\").")


def _fmt(value, decimals) -> str:
    return "—" if value is None else f"{value:.{decimals}f}"


def markdown(table: str, root: str = DEFAULT_RESULTS_ROOT, ablation_base: str = "hope_1.3b",
             steps: list | None = None) -> str:
    """Our numbers next to the paper's for every row; '—' where we have none. With the
    table's `steps` (plan), a run with an eval output that does not count (step_status: an
    earlier checkpoint's, other settings, a skipped section) shows '—' and says why."""
    stale = {}
    for s in steps or []:
        done, why = step_status(s)
        if why and s.run is not None:
            stale.setdefault(s.run.name, why)
    out = [f"# {table}: ours vs the paper\n",
           f"Results under `{root}`. Each cell: ours / paper; — = no number "
           "(not run yet, or a model this repository does not implement).\n"]
    for layout, rows in layouts(table, ablation_base):
        out.append(f"## {layout.title}\n")
        if layout.paper is not None and layout.paper.note:
            out.append(f"{layout.paper.note}\n")
        if any(key in ("wiki_ppl", "ppl") for key, _, _ in layout.columns):
            out.append(f"{OUR_PERPLEXITY_NOTE}\n")
        header = ["group", "model", "run"] + [h for _, h, _ in layout.columns] + ["note"]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for r in rows:
            ours = _metrics_of(layout, run_dir(root, r.run)) if r.run and r.run.name not in stale else {}
            note = "; ".join(n for n in (r.note, f"not counted: {stale[r.run.name]} (--run redoes it)"
                                          if r.run and r.run.name in stale else "") if n)
            paper = (layout.paper.row(r.paper_group or r.group, r.paper)
                     if (layout.paper is not None and r.paper) else {})
            cells = []
            for key, _, decimals in layout.columns:
                mine = _fmt(ours.get(key), decimals)
                cells.append(f"{mine} / {_fmt(paper.get(key), decimals)}" if layout.paper is not None else mine)
            run_name = f"`{r.run.name}`" if r.run else "—"
            out.append("| " + " | ".join([r.group, r.label, run_name] + cells + [note]) + " |")
        out.append("")
    return "\n".join(out)


# -----------------------------------------------------------------------------
# lm-eval zero-shot step

def zero_shot_scores(lm_eval_results: dict) -> dict:
    """simple_evaluate's output -> {task: accuracy in [0, 1]} with the papers' metric per task."""
    per_task = lm_eval_results.get("results", {})
    scores = {}
    for task, (metric, _) in ZERO_SHOT_TASKS.items():
        entry = per_task.get(task, {})
        key = next((k for k in (f"{metric},none", metric) if k in entry), None)
        if key is None:
            raise ValueError(f"lm-eval results have no {metric} for task {task}")
        scores[task] = float(entry[key])
    return scores


def run_zero_shot(checkpoint: str, out_dir: str, device: str = "auto", limit: int | None = None,
                  batch_size: int = 8) -> dict:
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    check_output_dir(out_dir)
    try:
        import lm_eval
    except ImportError:
        raise ImportError("lm-eval is not installed: pip install -r requirements-eval.txt") from None
    from eval.lm_eval_adapter import OurLM
    lm = OurLM.from_checkpoint(checkpoint, device=device, batch_size=batch_size)
    raw = lm_eval.simple_evaluate(model=lm, tasks=list(ZERO_SHOT_TASKS), num_fewshot=0, limit=limit)
    result = {"checkpoint": os.path.abspath(checkpoint), "num_fewshot": 0, "limit": limit,
              "metrics": {task: metric for task, (metric, _) in ZERO_SHOT_TASKS.items()},
              "lm_eval_version": getattr(lm_eval, "__version__", "unknown"), "accuracy": zero_shot_scores(raw)}
    path = write_json(os.path.join(out_dir, "zeroshot.json"), result)
    print(f"wrote {path}")
    return result


# -----------------------------------------------------------------------------
# CLI

def _zero_shot_main(argv):
    parser = OneLineArgumentParser(prog="python -m eval.reproduce zeroshot",
                                   description="Zero-shot accuracies of the papers' tables with lm-eval.")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint dir, a training out_dir or an exported .safetensors")
    parser.add_argument("--out", required=True, help="output folder (zeroshot.json)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--limit", type=positive_int, help="examples per task (default all; for smoke tests)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    args = parser.parse_args(argv)
    with exit_on_error():
        return run_zero_shot(args.checkpoint, args.out, args.device, args.limit, args.batch_size)


def _join_train_args(argv: list[str]) -> list[str]:
    """`--train-args "--train.compile=true"` -> `--train-args=--train.compile=true`: argparse
    takes a lone value that starts with "--" for a flag ("expected one argument"); joined to
    its flag with "=" it is the value."""
    joined, rest = [], iter(argv)
    for arg in rest:
        value = next(rest, None) if arg == "--train-args" else None
        joined.append(arg if value is None else f"{arg}={value}")
    return joined


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["zeroshot"]:
        return _zero_shot_main(argv[1:])
    argv = _join_train_args(argv)
    parser = OneLineArgumentParser(prog="python -m eval.reproduce",
                                   description="Commands and side-by-side tables for the papers' results.")
    parser.add_argument("table", help=" | ".join(TABLES) + " (or: zeroshot --checkpoint DIR --out DIR)")
    parser.add_argument("--run", action="store_true", help="execute the missing steps (default: print them)")
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="GPUs per training run (torchrun --nproc_per_node)")
    parser.add_argument("--results-root", default=DEFAULT_RESULTS_ROOT, help="where runs/ and their evals live")
    parser.add_argument("--out", help="folder for TABLE.md (default: the results root)")
    parser.add_argument("--train-args", default="", help="extra overrides for every training command, one string")
    parser.add_argument("--ablation-base", default="hope_1.3b", help="nl_table6: " + " | ".join(ABLATION_BASES))
    args = parser.parse_args(argv)
    with exit_on_error(ReproduceError, RuntimeError, OSError):
        try:
            train_args = tuple(shlex.split(args.train_args))
        except ValueError as e:                          # an unclosed quote
            raise ReproduceError(f"--train-args {args.train_args!r}: {e}") from None
        bad = [a for a in train_args if not a.startswith("--")]
        if bad:
            raise ReproduceError(f"--train-args must be overrides like --train.compile=true, got {bad[0]!r}")
        own = [a for a in train_args if a.replace("-", "_").split("=")[0] in ("__train.out_dir", "__train.resume")]
        if own:          # every run trains into its own runs/<name> under --results-root, resuming it
            raise ReproduceError(f"--train-args may not set {own[0].split('=')[0]}: each run trains into, and "
                                 "resumes from, its own folder under --results-root")
        steps = plan(args.table, args.results_root, args.nproc, train_args, args.ablation_base)
        flag, folder = ("--out", args.out) if args.out else ("--results-root", args.results_root)
        try:                                             # before --run's steps, not after them
            check_output_dir(folder, flag)
        except ValueError as e:
            raise ReproduceError(str(e)) from None
        failed = None
        if args.run:
            try:
                execute(steps)
            except RuntimeError as e:        # the table still gets the numbers of the steps that finished
                failed = e
        else:
            print(script(args.table, steps, args.results_root))
        text = markdown(args.table, args.results_root, args.ablation_base, steps)
        path = write_atomic(os.path.join(args.out or args.results_root, f"{args.table}.md"), text)
        print(text)
        print(f"wrote {path}")
        if failed is not None:
            raise failed
    return path


if __name__ == "__main__":
    main()
