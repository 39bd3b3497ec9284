"""
CPU-scale mini-reproduction of the papers' comparisons (issue 8; results in docs/MINI_REPRO.md).

    python -m eval.mini_repro [--out out/mini_repro] [--seeds 0,1] [--steps 150] [--jobs 2]
                              [--plan] [--report-only]

Every run trains a tiny model (2 layers, d_model 64, 2 heads, byte tokenizer) on the same
tokens of the built-in corpus -- same data order per seed, same steps, batch and learning
rate -- then the evaluations of the paper's tables run on it at a scale two CPU cores finish
in under an hour:

  language modelling   Transformer++, Titans (LMM), HOPE, HOPE-attention: validation bits per
                       byte and per-byte perplexity (NL Table 2 / Titans Table 1 columns)
  NL Table 6           HOPE with one switch flipped per row (eval/reproduce.py's ABLATIONS)
  BABILong qa1         a short fine-tune on qa1 at "0k" (the facts alone), then qa1 accuracy
                       at growing lengths of background text (NL Fig. 9 protocol in miniature)
  forgetting           the sequential-domain protocol of eval/continual.py (train on each
                       domain in turn; forgetting = perplexity on earlier domains going up)

The same steps serve every seed; each step is skipped when its output counts as done
(eval.reproduce.step_status, which --plan shows too), so an interrupted run (Ctrl-C: one line,
exit 130) continues where it stopped; a damaged result file, which would count as done for
ever, is a one-line error naming it. Those outputs are named by run and seed only, so
the first run writes the settings that shape them (--steps, --ft-steps, --samples,
--domain-steps) to <out>/manifest.json, and a later run into that --out with other settings
is an error (--report-only takes them from there). `--jobs N` runs N steps at a time (each with
cores / N torch threads). At the end <out>/mini_repro.json holds every number and
<out>/MINI_REPRO.md the tables (mean over the seeds that have results, with the min-max
spread), headed by the command, date, settings, machine and wall time (of that invocation).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from itertools import islice

from cli import (SEED_RANGE, OneLineArgumentParser, check_output_dir, non_negative_int, positive_int, seed_int,
                 write_atomic, write_json)
from eval.reproduce import (ABLATIONS, ReproduceError, Run, Step, babilong_steps, execute, load_result, result_at,
                            run_dir, step_status)

# One recipe for every run (overrides on top of each tiny config): the model size, the data
# and the token budget are the same; each architecture keeps its own chunk sizes.
BATCH_SIZE, SEQ_LEN = 8, 128     # sequences per step and bytes per sequence, for every training run
MINI_MODEL = ("--model.n_layer=2", "--model.d_model=64", "--model.n_head=2")
MINI_TRAIN = ("--data.dataset=builtin", "--data.tokenizer=bytes", f"--train.batch_size={BATCH_SIZE}",
              "--train.grad_accum=1", f"--train.seq_len={SEQ_LEN}", "--train.lr=3e-3", "--optim.warmup_steps=15",
              "--train.eval_every=0", "--train.eval_batches=20", "--train.sample_tokens=0",
              "--train.log_every=25", "--train.resume=auto")   # a run killed in its final eval resumes there
MODELS = (                     # (row label, run name, config)
    ("Transformer++", "transformer", "configs/transformer_tiny.yaml"),
    ("Titans (LMM)", "titans_lmm", "configs/titans_lmm_tiny.yaml"),
    ("HOPE", "hope", "configs/hope_tiny.yaml"),
    ("HOPE-attention", "hope_attention", "configs/hope_attention_tiny.yaml"),
)
BABILONG_LENGTHS = "0k,1k,2k"
# Attention models' context in BABILong, for the fine-tune as for the eval: without it the
# fine-tune cuts its examples to train.seq_len (128 bytes, shorter than most qa1 0k examples).
BABILONG_MAX_LEN = 16384
CONTINUAL_DOMAINS = "builtin,austen,shakespeare"


def runs(seeds, steps: int) -> list[tuple[str, str, int, Run]]:
    """(table, row label, seed, Run) for every training job: the four models, then the ablations."""
    out = []
    for seed in seeds:
        common = MINI_MODEL + MINI_TRAIN + (f"--train.max_steps={steps}", f"--train.ckpt_every={steps}",
                                            f"--train.seed={seed}")
        for label, name, config in MODELS:
            out.append(("models", label, seed, Run(f"{name}-s{seed}", config, common)))
        for label, suffix, overrides, _ in ABLATIONS:
            out.append(("ablations", label, seed, Run(f"hope-{suffix}-s{seed}", "configs/hope_tiny.yaml",
                                                       common + tuple(overrides))))
    return out


def train_step(root: str, run: Run) -> Step:
    out = run_dir(root, run)
    return Step(f"train {run.name}", ["python", "train.py", run.config, f"--train.out_dir={out}", *run.overrides],
                os.path.join(out, "final_eval.json"), run)


def eval_chain(root: str, run: Run, seed: int, ft_steps: int, samples: int, domain_steps: int) -> list[Step]:
    """BABILong qa1 (fine-tune, then eval at growing lengths) and the forgetting protocol."""
    ckpt = run_dir(root, run)
    return babilong_steps(run, ckpt, os.path.join(ckpt, "babilong"), "qa1", "0k", BABILONG_LENGTHS,
                          finetune=("--steps", str(ft_steps), "--batch-size", "8", "--lr", "1e-3", "--seed", str(seed),
                                    "--max-len", str(BABILONG_MAX_LEN), "--log-every", "25"),
                          evaluate=("--samples", str(samples), "--seed", str(seed), "--max-len", str(BABILONG_MAX_LEN),
                                    "--segment-len", "1024")) + [
        Step(f"forgetting {run.name}",
             ["python", "-m", "eval.continual", "domains", "--checkpoint", ckpt, "--domains", CONTINUAL_DOMAINS,
              "--steps", str(domain_steps), "--batch-size", "8", "--seq-len", "128", "--lr", "1e-3",
              "--train-chars", "400000", "--eval-tokens", "4096", "--seed", str(seed),
              "--out", os.path.join(ckpt, "continual")],
             os.path.join(ckpt, "continual", "continual_domains.json"), run),
    ]


# -----------------------------------------------------------------------------
# the manifest: the settings the results in --out were made with

SETTINGS = {"steps": 150, "ft_steps": 60, "samples": 25, "domain_steps": 30}   # name -> default
MANIFEST = "manifest.json"


def settings(args) -> dict:
    return {key: getattr(args, key) for key in SETTINGS}


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def flags(values: dict) -> str:
    return " ".join(f"{flag(key)} {value}" for key, value in values.items())


def check_manifest(args, given=()) -> None:
    """ValueError when --out holds results made with other settings: their steps would count
    as done under the new ones. --report-only takes the manifest's settings (those not `given`
    on the command line), so that the report states what ran."""
    path = os.path.join(args.out, MANIFEST)
    args.settings_known = os.path.exists(path) or not os.path.isdir(os.path.join(args.out, "runs"))
    if not os.path.exists(path):
        if not args.settings_known and not args.report_only:
            raise ValueError(f"--out {args.out} holds results but no {MANIFEST} (their settings are unknown): "
                             "use another --out")
        return
    try:
        made = load_result(path)
    except ReproduceError:          # damaged: load_result's "delete it to run its step again" fits no manifest
        made = None
    if not isinstance(made, dict) or set(made) != set(SETTINGS):
        raise ValueError(f"{path} is not a mini_repro manifest of {', '.join(SETTINGS)}: use another --out")
    for key, value in made.items():
        if getattr(args, key) != value and (key in given or not args.report_only):
            raise ValueError(f"{flag(key)} {getattr(args, key)} differs from the {flag(key)} {value} that the "
                             f"results in {args.out} were made with ({MANIFEST}): "
                             + (f"leave {flag(key)} out" if args.report_only else "use another --out"))
        setattr(args, key, value)


def write_manifest(args) -> None:
    """The first run into --out records its settings; later runs have been checked against them."""
    path = os.path.join(args.out, MANIFEST)
    if not os.path.exists(path):
        write_atomic(path, json.dumps(settings(args), indent=1) + "\n")


def plan(args) -> list[list[Step]]:
    """Groups of steps: each group runs in order; groups run `--jobs` at a time. First every
    training (HOPE-type runs first: they are the slowest), then the evaluation chains."""
    root = args.out
    trains = [[train_step(root, run)] for _, _, _, run in runs(args.seeds, args.steps)]
    trains.sort(key=lambda group: "hope" not in group[0].run.name or "attention" in group[0].run.name)
    evals = [eval_chain(root, run, seed, args.ft_steps, args.samples, args.domain_steps)
             for table, _, seed, run in runs(args.seeds, args.steps) if table == "models"]
    return [trains, evals]


def run_groups(groups: list[list[Step]], jobs: int, log=print) -> None:
    """Run groups of steps, `jobs` groups at a time, each process with cores / jobs threads.
    The first failure is re-raised as soon as it happens; the groups not yet started never start.
    Ctrl-C (KeyboardInterrupt) is re-raised once the running steps end: they got the same Ctrl-C."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = dict(os.environ, OMP_NUM_THREADS=threads, WANDB_MODE="disabled")
    interrupted = threading.Event()

    def runner(argv):
        if interrupted.is_set():           # a group between two steps at Ctrl-C starts no more of them
            raise RuntimeError("interrupted")
        started = time.time()
        done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = "\n".join(done.stdout.strip().splitlines()[-3:])
        log(f"  [{time.time() - started:6.0f} s] {shlex.join(argv[1:4])} ...\n    " + tail.replace("\n", "\n    "))
        return done

    # Submit a group only when a worker is free, so a failure leaves nothing queued to cancel
    # (with all groups submitted up front, a free worker could start the next before we see it).
    queued = iter(groups)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            running = {pool.submit(execute, group, runner, log) for group in islice(queued, jobs)}
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()                # re-raise the first failure (the running groups finish)
                    running |= {pool.submit(execute, group, runner, log) for group in islice(queued, 1)}
        except KeyboardInterrupt:
            interrupted.set()                      # the pool's exit waits for the running steps alone
            raise


# -----------------------------------------------------------------------------
# the report

class ResultsFile:
    """One step's JSON, read as eval.reproduce reads it: None-valued before the step has run; a
    damaged file (an empty one, a run killed while writing it, an edit) is a ReproduceError
    naming it, because its step counts as done while it exists (step_status) and would never
    be redone: the report would show "—" forever."""

    def __init__(self, path: str):
        self.path, self.data = path, load_result(path)
        if self.data is not None and not isinstance(self.data, dict):
            raise ReproduceError(f"{path} is not a results object; delete it to run its step again")

    def get(self, *keys):
        """The number at a key path (None where missing); text where a number belongs is named."""
        try:
            return result_at(self.data or {}, *keys)
        except ReproduceError as e:
            raise ReproduceError(f"{self.path}: {e}; fix it, or delete it to run its step again") from None


def collect(root: str, seeds, steps: int) -> dict:
    """{table: {row: {seed: {metric: value}}}} from the runs' JSON files."""
    results: dict = {"models": {}, "ablations": {}}
    for table, label, seed, run in runs(seeds, steps):
        d = run_dir(root, run)
        final = ResultsFile(os.path.join(d, "final_eval.json"))
        cell = {"loss": final.get("val_loss"), "perplexity": final.get("val_ppl"),
                "bits_per_byte": final.get("val_bpb"), "params": final.get("params")}
        if table == "models":
            babilong = ResultsFile(os.path.join(d, "babilong", "babilong.json"))
            for score in ("label_ranking", "official"):
                for length in BABILONG_LENGTHS.split(","):
                    cell[f"qa1_{score}_{length}"] = babilong.get(score, "qa1", length)
            domains = ResultsFile(os.path.join(d, "continual", "continual_domains.json"))
            cell["forgetting"] = domains.get("mean_forgetting")
            cell["relative_forgetting"] = domains.get("mean_relative_forgetting")
            cell["final_mean_ppl"] = domains.get("final_mean_perplexity")
        results[table].setdefault(label, {})[seed] = cell
    return results


def seeds_with_results(results: dict) -> list[int]:
    """The seeds that have any number in any table (the others were asked for but not run)."""
    return sorted({seed for table in results.values() for cells in table.values()
                   for seed, cell in cells.items() if any(v is not None for v in cell.values())})


def spread(values, fmt="{:.3f}", scale=1.0, seeds=0) -> str:
    """'mean (min-max)' over seeds; '—' when no seed has the number; n=K where only K of the
    `seeds` that have results have this number (a partial run), so no mean passes for all."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    mean = fmt.format(sum(values) / len(values))
    notes = ([] if len(values) == 1 else [f"{fmt.format(min(values))}–{fmt.format(max(values))}"]) + \
            ([f"n={len(values)}"] if len(values) < seeds else [])
    return f"{mean} ({', '.join(notes)})" if notes else mean


def paired_delta(cells: dict, base: dict, key="bits_per_byte") -> str:
    """Mean over the seeds both have of (cell - base), with n: after a partial run the seed
    sets differ, and a difference of means over different seeds would count seed noise as Δ."""
    pairs = [(cell.get(key), base.get(seed, {}).get(key)) for seed, cell in cells.items()]
    diffs = [a - b for a, b in pairs if a is not None and b is not None]
    return f"{sum(diffs) / len(diffs):+.3f} (n={len(diffs)})" if diffs else "—"


def markdown(results: dict, header: str = "") -> str:
    seeds = seeds_with_results(results)     # not the seeds asked for: those not run have no numbers

    def cell(cells: dict, key: str, fmt="{:.3f}", scale=1.0) -> str:
        return spread([c.get(key) for c in cells.values()], fmt, scale, len(seeds))

    lines = [header] if header else []
    lines += [f"Each cell: mean over the {len(seeds)} seed(s) with results ({', '.join(map(str, seeds)) or 'none'}), "
              "with the min–max range across seeds in brackets; n=K marks a cell that only K of them have.", "",
              "### Language modelling (validation, built-in corpus, bytes)", "",
              # val_ppl is exp(loss per token), the tokens being bytes plus end-of-text: not 2^bits/byte
              "| model | params | bits/byte ↓ | perplexity/token ↓ |", "|---|---:|---:|---:|"]
    for label, cells in results["models"].items():
        params = next((c["params"] for c in cells.values() if c.get("params")), None)
        lines.append(f"| {label} | {params / 1e6:.2f}M |" if params else f"| {label} | — |")
        lines[-1] += f" {cell(cells, 'bits_per_byte')} | {cell(cells, 'perplexity')} |"
    hope = results["models"].get("HOPE", {})
    lines += ["", "### NL Table 6 ablations (HOPE, validation bits/byte)", "",
              "| model | bits/byte ↓ | Δ vs HOPE (same seeds) |", "|---|---:|---:|",
              f"| HOPE | {cell(hope, 'bits_per_byte')} | — |"]
    for label, cells in results["ablations"].items():
        lines.append(f"| {label} | {cell(cells, 'bits_per_byte')} | {paired_delta(cells, hope)} |")
    lengths = BABILONG_LENGTHS.split(",")
    for score, title in (("label_ranking", "label ranking"), ("official", "official (greedy generation)")):
        lines += ["", f"### BABILong qa1 accuracy (%) vs context length, {title}", "",
                  "| model | " + " | ".join(lengths) + " |", "|---|" + "---:|" * len(lengths)]
        for label, cells in results["models"].items():
            lines.append(f"| {label} | " + " | ".join(cell(cells, f"qa1_{score}_{n}", "{:.0f}", 100)
                                                     for n in lengths) + " |")
    lines += ["", f"### Forgetting, sequential domains ({CONTINUAL_DOMAINS.replace(',', ' → ')})", "",
              "| model | mean forgetting (ppl ↑ on earlier domains) ↓ | relative ↓ | final mean ppl ↓ |",
              "|---|---:|---:|---:|"]
    for label, cells in results["models"].items():
        lines.append(f"| {label} | {cell(cells, 'forgetting')} | {cell(cells, 'relative_forgetting', '{:+.1f}%', 100)}"
                     f" | {cell(cells, 'final_mean_ppl', '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def parse_args(argv=None):
    p = OneLineArgumentParser(prog="python -m eval.mini_repro", description=__doc__.split("\n\n")[1])
    p.add_argument("--out", default=os.path.join("out", "mini_repro"), help="results root")
    p.add_argument("--seeds", default="0,1", help="comma list of training seeds (at least 2 for a spread)")
    # the settings default to None here, so that --report-only can tell them given from defaulted
    p.add_argument("--steps", type=positive_int,
                   help=f"training steps per run ({BATCH_SIZE} x {SEQ_LEN} bytes each; default {SETTINGS['steps']})")
    p.add_argument("--ft-steps", type=positive_int,
                   help=f"BABILong qa1 fine-tuning steps (default {SETTINGS['ft_steps']})")
    p.add_argument("--samples", type=positive_int, help=f"BABILong samples per length (default {SETTINGS['samples']})")
    p.add_argument("--domain-steps", type=non_negative_int,
                   help=f"forgetting protocol: steps per domain (default {SETTINGS['domain_steps']})")
    p.add_argument("--jobs", type=positive_int, default=2, help="steps run at a time")
    p.add_argument("--plan", action="store_true", help="print the commands and exit")
    p.add_argument("--report-only", action="store_true", help="only collect existing results into the report")
    args = p.parse_args(argv)
    given = {key for key in SETTINGS if getattr(args, key) is not None}
    for key, default in SETTINGS.items():
        if key not in given:
            setattr(args, key, default)
    try:
        args.seeds = [seed_int(s) for s in args.seeds.split(",") if s.strip()]
    except argparse.ArgumentTypeError:          # seed_int: not an integer, or out of range
        p.error(f"--seeds {args.seeds!r}: expected a comma list of integers in [0, {SEED_RANGE})")
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {','.join(map(str, args.seeds))}: each seed at most once")
    if args.report_only and not os.path.isdir(os.path.join(args.out, "runs")):   # an all-"—" report, exit 0
        p.error(f"--report-only: {args.out!r} holds no runs (no {os.path.join(args.out, 'runs')} folder)")
    try:
        check_output_dir(args.out)
        check_manifest(args, given)
        # up front, --plan too: a damaged result file is named now, not after an hour of runs
        have = seeds_with_results(collect(args.out, args.seeds, args.steps))
    except ValueError as e:                     # ReproduceError is one
        p.error(str(e))
    if args.report_only and not have:           # as without runs/: an all-"—" report, exit 0
        p.error(f"--report-only: no results for --seeds {','.join(map(str, args.seeds))} in "
                f"{os.path.join(args.out, 'runs')}")
    return args


def main(argv=None):
    args = parse_args(argv)
    groups = plan(args)
    if args.plan:
        for phase in groups:
            for group in phase:
                for s in group:                 # the run's own test (execute), not just "the file exists"
                    done, why = step_status(s)
                    print(f"# [{'done' if done else 'todo'}] {s.title}" + (f" ({why}; the run keeps it aside)"
                                                                           if why else "") + f"\n{shlex.join(s.argv)}")
        return 0
    steps = [s for phase in groups for group in phase for s in group]
    done_before = sum(step_status(s)[0] for s in steps)    # their time is not in this run's wall time
    started = time.time()
    if not args.report_only:
        os.makedirs(args.out, exist_ok=True)
        write_manifest(args)
        try:
            for phase in groups:
                run_groups(phase, args.jobs)
        except (RuntimeError, ReproduceError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:               # the steps print their own line; a traceback adds nothing
            print("error: interrupted; rerun the same command to continue", file=sys.stderr)
            return 130
    wall = time.time() - started
    command = "python -m eval.mini_repro " + shlex.join(argv if argv is not None else sys.argv[1:])
    where = machine()
    header = (f"Command: `{command.strip()}`  \nDate: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
              f"  \nSettings: `{flags(settings(args))}`"
              + ("" if args.settings_known else f" (assumed: the results predate {MANIFEST})")
              + f"  \nMachine: {where}  \nWall time: {wall / 60:.1f} min"
              + (" (report only: the runs were timed when they ran)" if args.report_only else
                 f" (this invocation only: {done_before} of the {len(steps)} steps were done before it)"
                 if done_before else "") + "\n")
    try:
        results = collect(args.out, args.seeds, args.steps)
    except ReproduceError as e:                 # a step that wrote a damaged file (parse_args checked the rest)
        print(f"error: {e}", file=sys.stderr)
        return 1
    results["meta"] = {"command": command, "wall_seconds": wall, "machine": where, **settings(args),
                       "seeds": args.seeds, "seeds_with_results": seeds_with_results(results),
                       "tokens_per_run": args.steps * BATCH_SIZE * SEQ_LEN}
    write_json(os.path.join(args.out, "mini_repro.json"), results, indent=1)
    table = markdown({k: results[k] for k in ("models", "ablations")}, header)
    write_atomic(os.path.join(args.out, "MINI_REPRO.md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
