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

The same steps serve every seed; each step is skipped when its output exists, so an
interrupted run continues where it stopped. Those outputs are named by run and seed only, so
the first run writes the settings that shape them (--steps, --ft-steps, --samples,
--domain-steps) to <out>/manifest.json, and a later run into that --out with other settings
is an error (--report-only takes them from there). `--jobs N` runs N steps at a time (each with
cores / N torch threads). At the end <out>/mini_repro.json holds every number and
<out>/MINI_REPRO.md the tables (mean over seeds with the min-max spread), headed by the
command, date, settings, machine and wall time.
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
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from itertools import islice

from cli import (SEED_RANGE, OneLineArgumentParser, check_output_dir, non_negative_int, positive_int, seed_int,
                 write_atomic, write_json)
from eval.reproduce import ABLATIONS, ReproduceError, Run, Step, babilong_steps, execute, run_dir

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
    made = _load(path)
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
    The first failure is re-raised as soon as it happens; the groups not yet started never start."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = dict(os.environ, OMP_NUM_THREADS=threads, WANDB_MODE="disabled")

    def runner(argv):
        started = time.time()
        done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = "\n".join(done.stdout.strip().splitlines()[-3:])
        log(f"  [{time.time() - started:6.0f} s] {shlex.join(argv[1:4])} ...\n    " + tail.replace("\n", "\n    "))
        return done

    # Submit a group only when a worker is free, so a failure leaves nothing queued to cancel
    # (with all groups submitted up front, a free worker could start the next before we see it).
    queued = iter(groups)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running = {pool.submit(execute, group, runner, log) for group in islice(queued, jobs)}
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()                    # re-raise the first failure (the running groups finish)
                running |= {pool.submit(execute, group, runner, log) for group in islice(queued, 1)}


# -----------------------------------------------------------------------------
# the report

def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def collect(root: str, seeds, steps: int) -> dict:
    """{table: {row: {seed: {metric: value}}}} from the runs' JSON files."""
    results: dict = {"models": {}, "ablations": {}}
    for table, label, seed, run in runs(seeds, steps):
        d = run_dir(root, run)
        final = _load(os.path.join(d, "final_eval.json")) or {}
        cell = {"loss": final.get("val_loss"), "perplexity": final.get("val_ppl"),
                "bits_per_byte": final.get("val_bpb"), "params": final.get("params")}
        if table == "models":
            babilong = _load(os.path.join(d, "babilong", "babilong.json")) or {}
            for score in ("label_ranking", "official"):
                for length, acc in (babilong.get(score, {}).get("qa1") or {}).items():
                    cell[f"qa1_{score}_{length}"] = acc
            domains = _load(os.path.join(d, "continual", "continual_domains.json")) or {}
            cell["forgetting"] = domains.get("mean_forgetting")
            cell["relative_forgetting"] = domains.get("mean_relative_forgetting")
            cell["final_mean_ppl"] = domains.get("final_mean_perplexity")
        results[table].setdefault(label, {})[seed] = cell
    return results


def spread(values, fmt="{:.3f}", scale=1.0) -> str:
    """'mean (min-max)' over seeds; '—' when no seed has the number."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    mean = fmt.format(sum(values) / len(values))
    return mean if len(values) == 1 else f"{mean} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def _column(cells: dict, key):
    return [c.get(key) for c in cells.values()]


def paired_delta(cells: dict, base: dict, key="bits_per_byte") -> str:
    """Mean over the seeds both have of (cell - base), with n: after a partial run the seed
    sets differ, and a difference of means over different seeds would count seed noise as Δ."""
    pairs = [(cell.get(key), base.get(seed, {}).get(key)) for seed, cell in cells.items()]
    diffs = [a - b for a, b in pairs if a is not None and b is not None]
    return f"{sum(diffs) / len(diffs):+.3f} (n={len(diffs)})" if diffs else "—"


def markdown(results: dict, header: str = "") -> str:
    n_seeds = max((len(c) for t in results.values() for c in t.values()), default=0)
    lines = [header] if header else []
    lines += [f"Each cell: mean over {n_seeds} seed(s), with the min–max range across seeds in brackets.", "",
              "### Language modelling (validation, built-in corpus, bytes)", "",
              "| model | params | bits/byte ↓ | perplexity/byte ↓ |", "|---|---:|---:|---:|"]
    for label, cells in results["models"].items():
        params = next((c["params"] for c in cells.values() if c.get("params")), None)
        lines.append(f"| {label} | {params / 1e6:.2f}M |" if params else f"| {label} | — |")
        lines[-1] += f" {spread(_column(cells, 'bits_per_byte'))} | {spread(_column(cells, 'perplexity'))} |"
    hope = results["models"].get("HOPE", {})
    lines += ["", "### NL Table 6 ablations (HOPE, validation bits/byte)", "",
              "| model | bits/byte ↓ | Δ vs HOPE (same seeds) |", "|---|---:|---:|",
              f"| HOPE | {spread(_column(hope, 'bits_per_byte'))} | — |"]
    for label, cells in results["ablations"].items():
        lines.append(f"| {label} | {spread(_column(cells, 'bits_per_byte'))} | {paired_delta(cells, hope)} |")
    lengths = BABILONG_LENGTHS.split(",")
    for score, title in (("label_ranking", "label ranking"), ("official", "official (greedy generation)")):
        lines += ["", f"### BABILong qa1 accuracy (%) vs context length, {title}", "",
                  "| model | " + " | ".join(lengths) + " |", "|---|" + "---:|" * len(lengths)]
        for label, cells in results["models"].items():
            lines.append(f"| {label} | " + " | ".join(spread(_column(cells, f"qa1_{score}_{n}"), "{:.0f}", 100)
                                                     for n in lengths) + " |")
    lines += ["", f"### Forgetting, sequential domains ({CONTINUAL_DOMAINS.replace(',', ' → ')})", "",
              "| model | mean forgetting (ppl ↑ on earlier domains) ↓ | relative ↓ | final mean ppl ↓ |",
              "|---|---:|---:|---:|"]
    for label, cells in results["models"].items():
        lines.append(f"| {label} | {spread(_column(cells, 'forgetting'), '{:.3f}')} | "
                     f"{spread(_column(cells, 'relative_forgetting'), '{:+.1f}%', 100)} | "
                     f"{spread(_column(cells, 'final_mean_ppl'), '{:.2f}')} |")
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
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    groups = plan(args)
    if args.plan:
        for phase in groups:
            for group in phase:
                for s in group:
                    print(f"# [{'done' if os.path.exists(s.marker) else 'todo'}] {s.title}\n{shlex.join(s.argv)}")
        return 0
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
    wall = time.time() - started
    command = "python -m eval.mini_repro " + shlex.join(argv if argv is not None else sys.argv[1:])
    where = machine()
    header = (f"Command: `{command.strip()}`  \nDate: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
              f"  \nSettings: `{flags(settings(args))}`"
              + ("" if args.settings_known else f" (assumed: the results predate {MANIFEST})")
              + f"  \nMachine: {where}  \nWall time: {wall / 60:.1f} min"
              + (" (report only: the runs were timed when they ran)" if args.report_only else "") + "\n")
    results = collect(args.out, args.seeds, args.steps)
    results["meta"] = {"command": command, "wall_seconds": wall, "machine": where, **settings(args),
                       "seeds": args.seeds, "tokens_per_run": args.steps * BATCH_SIZE * SEQ_LEN}
    write_json(os.path.join(args.out, "mini_repro.json"), results, indent=1)
    table = markdown({k: results[k] for k in ("models", "ablations")}, header)
    write_atomic(os.path.join(args.out, "MINI_REPRO.md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
