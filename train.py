"""Pretrain a language model.

    python train.py                                  # configs/quickstart.yaml on the built-in corpus
    python train.py configs/hope_tiny.yaml --train.max_steps=200 --model.d_model=256
    torchrun --standalone --nproc_per_node=8 train.py CONFIG   # FSDP2 over 8 GPUs (docs/DISTRIBUTED.md)

Reads a YAML config (config.py), prepares token shards if needed, trains with AdamW (or a
deep optimiser of optim.py) and a warmup + cosine/WSD/constant schedule, evaluates,
checkpoints atomically and resumes exactly (`train.resume=auto`). Writes in <out_dir>:
config.yaml, metrics.jsonl, checkpoints/, final_eval.json, .lock (held while it runs) and
wandb_run_id (logging.wandb on).
Under torchrun every rank runs this file; rank 0 alone prints and writes logs, and
`train.batch_size` stays the global batch, so N ranks reproduce the 1-process losses.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import secrets
import signal
import socket
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import yaml

import distributed
from checkpoint import (LATEST, RESUME_KEYS, CheckpointMismatch, find_checkpoint, first_non_finite, holds_checkpoints,
                        load_config_of, load_training_state, newest_complete_step, resolve_checkpoint, save_checkpoint,
                        saved_steps, set_aside_later_steps, step_number)
from cli import aside_name, check_output_dir, enclosing_checkpoint, keep_aside, one_line, write_atomic, write_json
from config import (LONG_CONTEXT, MODEL_SECTIONS, Config, ConfigError, DataConfig, check_vocab, config_data,
                    config_from_dict, dump_yaml, reads, to_dict, unread_by_choice,
                    unread_settings)
from distributed import DistEnv, all_reduce_max, all_reduce_mean, full_value, gradient_sync
from kernels.checks import triton_blocker

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "quickstart.yaml")
# dense bf16 peak FLOP/s for MFU (H100/H200 SXM; A100); other GPUs report MFU as n/a
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device) -> float | None:
    """The entry of PEAK_FLOPS of the GPU `device` names ("cuda", "cuda:1": that GPU's name, not
    the current one's); None off CUDA and on other GPUs (no MFU is logged)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in PEAK_FLOPS.items() if gpu in name), None)


# ----------------------------------------------------------------------------------------
# pieces a reader may want to reuse

def lr_at(step, cfg: Config):
    """Warmup, then cosine to min_lr_ratio * lr, or WSD (warmup-stable-decay), or constant."""
    base, o, total = cfg.train.lr, cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return base * (step + 1) / o.warmup_steps
    min_lr = base * o.min_lr_ratio
    if o.schedule == "constant":
        return base
    if o.schedule == "wsd":
        # the decay starts after the warmup at the latest: a warmup longer than the stable
        # phase would otherwise drop from the full lr to the decay's middle in one step
        decay_start = max(o.warmup_steps, int(total * (1 - o.decay_fraction)))
        if step < decay_start:
            return base
        frac = (step - decay_start) / max(1, total - decay_start)
        return base + (min_lr - base) * min(frac, 1.0)
    frac = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * frac))


def setup_precision(t, device_type: str) -> bool:
    """Whether training computes in bf16 (autocast): train.dtype bfloat16, or auto on CUDA.
    Computing in bf16 on CUDA also lets fp32 matmuls use TF32 tensor cores
    (torch.set_float32_matmul_precision("high"), as nanoGPT and torchtitan do): the memory
    layers keep fast weights and their inputs in fp32, and their Triton kernels follow this
    setting (kernels.triton_delta.dot_precision; "highest", PyTorch's default, is exact fp32)."""
    use_bf16 = t.computes_in_bf16(device_type)
    if use_bf16 and device_type == "cuda":
        torch.set_float32_matmul_precision("high")
    return use_bf16


def make_optimizer(model, cfg: Config, device_type):
    """`optim.name`: AdamW or a deep optimiser (optim.py). Weight decay on matrices only;
    embeddings, the LM head and vectors use AdamW whatever the rule (optim.split_param_groups)."""
    from optim import build_optimizer, optimizer_options, split_param_groups
    o = cfg.optim
    options = optimizer_options(o.name, o)
    if o.name == "adamw" and device_type == "cuda":
        options["fused"] = True
    return build_optimizer(o.name, split_param_groups(model, o.weight_decay), lr=cfg.train.lr,
                           weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps, **options)


# data.prepare's keyword -> the data.* setting: a corpus's recipe
DATA_RECIPE = {"val_fraction": "val_fraction", "max_docs": "max_docs", "text_field": "text_field",
               "split": "hf_split", "streaming": "hf_streaming", "data_files": "hf_data_files"}


def source_settings(d: DataConfig) -> dict:
    """The part of DATA_RECIPE that data.dataset's kind of source reads: the text field not for
    builtin, the split, streaming and data files for hf: only. The other settings change
    nothing (a start-up note names them); an already prepared folder reads none."""
    if os.path.isfile(os.path.join(d.dataset, "meta.json")):
        return {}
    unread = set() if d.dataset.startswith("hf:") else {"split", "streaming", "data_files"}
    if d.dataset == "builtin":
        unread.add("text_field")
    return {keyword: key for keyword, key in DATA_RECIPE.items() if keyword not in unread}


def resolve_data_dir(cfg: Config) -> str:
    if cfg.data.data_dir:
        return cfg.data.data_dir
    if os.path.isfile(os.path.join(cfg.data.dataset, "meta.json")):
        return cfg.data.dataset                       # an already prepared directory
    def slug(text):
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))
    # a recipe other than the defaults gets a folder of its own: else two configs of one corpus
    # (another val_fraction, ...) would rebuild one cache folder in turn under each other's runs
    d, default = cfg.data, DataConfig()
    recipe = "".join(f"-{key}{slug(getattr(d, key))}" for key in source_settings(d).values()
                     if key != "hf_streaming" and getattr(d, key) != getattr(default, key))
    return os.path.join("data", "cache", f"{slug(d.dataset)}-{d.tokenizer}{recipe}")


def open_training_data(cfg: Config):
    """The prepared folder `cfg` trains on (resolve_data_dir) as a TokenDataset; data prepared
    with another tokenizer than data.tokenizer is a one-line ValueError (train.py, and the
    evals of a checkpoint: eval.perplexity, eval.run)."""
    from data.loader import TokenDataset
    return TokenDataset(resolve_data_dir(cfg), cfg.data.tokenizer, cfg.data.dataset)


def prepare_data(cfg: Config, data_dir):
    from data.prepare import ensure_prepared
    if os.path.isfile(os.path.join(data_dir, "meta.json")) and data_dir == cfg.data.dataset:
        return
    if not os.path.isdir(data_dir):       # a file, or under one: name the key (an existing folder may be read-only)
        check_output_dir(data_dir, "data.data_dir" if cfg.data.data_dir else "the data cache")
    d = cfg.data
    read = {keyword: getattr(d, key) for keyword, key in source_settings(d).items()}
    if "data_files" in read:
        read["data_files"] = read["data_files"] or None
    ensure_prepared(d.dataset, data_dir, tokenizer=d.tokenizer, num_workers=d.num_workers, **read)


# what a run writes in train.out_dir: name -> whether it is a folder
WANDB_ID = "wandb_run_id"      # <out_dir>/wandb_run_id: the W&B run a resume of this out_dir continues
OUT_DIR_ENTRIES = {"checkpoints": True, "config.yaml": False, "metrics.jsonl": False, "final_eval.json": False,
                   ".lock": False, WANDB_ID: False}
# out_dir -> the open .lock file of this process's run (an flock lasts while its file is open)
_out_dir_locks = {}


def lock_out_dir(out_dir) -> None:
    """Take <out_dir>/.lock for this run (rank 0), until release_out_dir: a second run on the
    same out_dir (say a requeued job while the first still runs) would delete the first's
    checkpoint in progress and interleave their metrics. Refused in one line naming the host:pid
    that holds it. The lock is the kernel's (flock): it ends with its process, however that
    ends. Without fcntl (not POSIX), or on a filesystem without locks, no lock is taken."""
    if os.path.realpath(out_dir) in _out_dir_locks:
        return
    try:
        import fcntl
    except ImportError:
        return
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(f"train.out_dir {out_dir} is in use by another run ({holder}): wait for it to end "
                          "or choose another train.out_dir") from None
    except OSError as e:    # a filesystem without locks (Lustre mounted without flock): run unlocked
        f.close()
        print(f"note: train.out_dir {out_dir} cannot be locked ({e.strerror or e}): nothing stops a second run "
              "on it")
        return
    f.seek(0)
    f.truncate()
    f.write(f"{socket.gethostname()}:{os.getpid()}\n")      # the host too: out_dirs are shared across nodes
    f.flush()
    _out_dir_locks[os.path.realpath(out_dir)] = f


def release_out_dir(out_dir) -> None:
    f = _out_dir_locks.pop(os.path.realpath(out_dir), None)
    if f:
        f.close()


def check_out_dir(t):
    """One-line ConfigErrors before anything is prepared, written or trained, so that a bad
    train.out_dir / train.resume loses nothing: an out_dir that is a file, or holds a file
    where the run writes a folder (or the reverse); resume=never, or resume=PATH of another
    run's checkpoint, on an out_dir that holds checkpoints (it would overwrite them and the
    metrics); resume=auto on checkpoints without the `latest` file that names the one to
    resume (a run killed during its first save), where starting over would overwrite them."""
    if not t.out_dir:
        raise ConfigError("train.out_dir must name a folder, got ''")
    if not t.resume:
        raise ConfigError("train.resume must be auto, never or a checkpoint path, got ''")
    check_output_dir(t.out_dir, "train.out_dir")          # not a file, can be made and written in
    inside = enclosing_checkpoint(t.out_dir)
    if inside:                      # its config.yaml and metrics would land in the checkpoint
        raise ConfigError(f"train.out_dir {t.out_dir} is inside the checkpoint {inside}: choose another folder")
    for name, is_folder in OUT_DIR_ENTRIES.items():       # else the write fails: checkpoints/ after training
        path = os.path.join(t.out_dir, name)
        if os.path.lexists(path) and os.path.isdir(path) != is_folder:
            raise ConfigError(f"train.out_dir {t.out_dir} holds a {'file' if is_folder else 'folder'} {name} "
                              f"where the run writes its {name}: move it away or choose another train.out_dir")
    root = os.path.join(t.out_dir, "checkpoints")
    steps = saved_steps(root)
    if t.resume == "never" and holds_checkpoints(t.out_dir):
        raise ConfigError(f"train.out_dir {t.out_dir} already holds checkpoints ({', '.join(steps) or LATEST}); "
                          "train.resume=never would overwrite them: choose another train.out_dir")
    if t.resume not in ("auto", "never") and holds_checkpoints(t.out_dir):
        # resuming its own earlier step is a rollback: allowed
        if not is_under(resolve_checkpoint(t.resume), root):
            raise ConfigError(f"train.out_dir {t.out_dir} already holds checkpoints ({', '.join(steps) or LATEST}); "
                              f"train.resume={t.resume} (another run's) would overwrite them: choose another "
                              "train.out_dir")
    if t.resume == "auto" and steps and not os.path.isfile(os.path.join(root, LATEST)):
        step = newest_complete_step(root) or os.path.join(root, steps[-1])
        raise ConfigError(f"{root} holds {', '.join(steps)} but no '{LATEST}' file: pass "
                          f"--train.resume={step} or choose another train.out_dir")


def is_under(ckpt, ckpt_root) -> bool:
    """Whether checkpoint folder `ckpt` is one of ckpt_root's (a trailing / and links allowed)."""
    return os.path.realpath(os.path.dirname(os.path.normpath(ckpt))) == os.path.realpath(ckpt_root)


def check_eval_split(cfg: Config, dataset, data_dir):
    """The evals (train.eval_every, eval.final) score windows of seq_len + 1 val tokens:
    checked before step 1, not after training."""
    t = cfg.train
    if not (t.eval_every or cfg.eval.final):
        return
    n = dataset.num_tokens("val")
    if n < t.seq_len + 1:
        raise ConfigError(f"the val split of {data_dir} has {n} tokens, fewer than train.seq_len + 1 = "
                          f"{t.seq_len + 1}: lower train.seq_len, or turn the evals off "
                          "(train.eval_every=0, eval.final=false)")


# model fields a resume may change: how the same math runs, a length recorded beside it, and
# the inner-loop stabilisers a diverging run may need to change at a rollback
RESUME_MAY_CHANGE = {"kernels", "attention", "max_seq_len", *(f"{part}.{key}" for part in ("titans", "hope")
                     for key in ("max_grad_norm", "detach_targets", "detach_chunks_older_than")), "titans.step_budget"}


def check_resume_config(cfg: Config, ckpt: str):
    """A resumed run is the checkpoint's model: a model field that would load into the same
    shapes but compute something else (heads, RoPE theta, chunk sizes, ...; all but
    RESUME_MAY_CHANGE, in the sections the architecture reads) or another tokenizer is a
    one-line ConfigError. So are another train.seed, train.batch_size, train.seq_len or
    data.sampling: the resumed data stream is the checkpoint's (a run begun before the paper
    configs took data.sampling=shuffled resumes with --data.sampling=random), and so is
    another corpus or data recipe
    (data_recipe_settings: checked before data.prepare would tokenize it); and another
    optimiser (optimiser_state_settings), whose state would not load. -> the checkpoint's config."""
    saved = load_config_of(ckpt)

    def fields(model_cfg):
        data = to_dict(model_cfg)
        out = {k: v for k, v in data.items() if not isinstance(v, dict)}
        for section in MODEL_SECTIONS:
            out.update({f"{section}.{k}": v for k, v in data[section].items() if reads(model_cfg.arch, section, k)})
        return out
    ours, theirs = fields(cfg.model), fields(saved.model)
    changed = [(f"model.{k}", v, ours.get(k)) for k, v in theirs.items()
               if k not in RESUME_MAY_CHANGE and ours.get(k) != v]
    changed += [(key, a, b) for key, a, b in (("data.tokenizer", saved.data.tokenizer, cfg.data.tokenizer),
                                              ("data.sampling", saved.data.sampling, cfg.data.sampling),
                                              *data_recipe_settings(saved.data, cfg.data),
                                              ("train.seed", saved.train.seed, cfg.train.seed),
                                              # the data position is one of these windows: the
                                              # sampler refuses another only after the model is built
                                              ("train.batch_size", saved.train.batch_size, cfg.train.batch_size),
                                              ("train.seq_len", saved.train.seq_len, cfg.train.seq_len),
                                              *optimiser_state_settings(saved.optim, cfg.optim)) if a != b]
    if changed:
        key, a, b = changed[0]
        raise ConfigError(f"{ckpt} was trained with {key}={a!r}, this run has {b!r}: resume with the "
                          "checkpoint's setting, or start a new train.out_dir")
    return saved


# optim.* that every rule reads (AdamW's betas and eps also serve the embeddings and vectors)
OPTIM_SHARED = ("name", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "schedule", "warmup_steps")


def unread_run_settings(data: dict, cfg: Config) -> list[str]:
    """Notes for the settings set in `data` (config_data) that this run does not read: model
    sections of another architecture (config.unread_settings), another rule's or schedule's
    optim.* options, data.* settings the source does not read."""
    from optim import CONFIG_FIELDS
    notes = [f"{key} is set, but model.arch={cfg.model.arch} does not read it"
             for key in unread_settings(data, cfg.model.arch)]
    model_keys = set()                                   # the model.* keys `data` sets, e.g. "titans.window_size"
    for key, value in (data["model"] if isinstance(data.get("model"), dict) else {}).items():
        model_keys |= {f"{key}.{k}" for k in value} if isinstance(value, dict) else {key}
    notes += [f"model.{key} is set, but is not read with {why}"
              for key, why in unread_by_choice(cfg.model).items() if key in model_keys]
    optim, d = data.get("optim"), data.get("data")
    read = set(OPTIM_SHARED) | set(CONFIG_FIELDS[cfg.optim.name].values())
    read |= {"min_lr_ratio"} if cfg.optim.schedule != "constant" else set()
    read |= {"decay_fraction"} if cfg.optim.schedule == "wsd" else set()
    notes += [f"optim.{key} is set, but optim.name={cfg.optim.name} with schedule={cfg.optim.schedule} does not "
              f"read it" for key in (optim if isinstance(optim, dict) else {}) if key not in read]
    notes += [f"data.{key} is set, but data.dataset={cfg.data.dataset} does not read it"
              for key in (d if isinstance(d, dict) else {})
              if key in DATA_RECIPE.values() and key not in source_settings(cfg.data).values()]
    return notes


def data_recipe_settings(saved: DataConfig, ours: DataConfig):
    """(key, saved, ours) of the data settings data.prepare would read for this run's source
    (the corpus and its recipe; none for an already prepared folder, whose recipe the sampler
    checks when it loads its position)."""
    keys = [key for key in source_settings(ours).values() if key != "hf_streaming"]
    return [(f"data.{key}", getattr(saved, key), getattr(ours, key)) for key in (["dataset"] + keys if keys else [])]


def optimiser_state_settings(saved, ours):
    """(key, saved, ours) of the optim settings that shape the optimiser state a resume loads:
    the rule, and DMGD's memory width / delta momentum's preconditioner where they are read
    (the others, lr, betas, weight decay, ..., may change: the config's win)."""
    keys = ["name"] + (["dmgd_hidden"] if ours.name == saved.name == "dmgd" else []) + \
        (["delta_preconditioner"] if ours.name == saved.name == "delta_momentum" else [])
    return [(f"optim.{key}", getattr(saved, key), getattr(ours, key)) for key in keys]


def earlier_checkpoint_hint(t, ckpt_root) -> str:
    """For an error about the checkpoint train.resume=auto picked: the step before it, which
    the run kept ('' where there is none, or the resume was explicit)."""
    steps = saved_steps(ckpt_root) if t.resume == "auto" else []
    try:
        latest = open(os.path.join(ckpt_root, LATEST)).read().strip()
    except (OSError, UnicodeDecodeError):
        latest = None
    earlier = [s for s in steps if latest and step_number(s) < step_number(latest)]
    if not earlier:
        return ""
    return f"; the earlier {earlier[-1]} is kept: --train.resume={os.path.join(ckpt_root, earlier[-1])} resumes it"


def with_earlier_hint(error, t, ckpt_root) -> Exception:
    """A damaged or missing latest checkpoint's error (ValueError or FileNotFoundError) with
    earlier_checkpoint_hint appended: the one-line error names what to resume instead."""
    kind = FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError
    return kind(f"{error}{earlier_checkpoint_hint(t, ckpt_root)}")


def checkpoint_to_resume(t) -> str | None:
    """train.resume -> the checkpoint to start from: auto = the out_dir's latest (None when
    it has none), never = None, a PATH = its checkpoint (FileNotFoundError without one)."""
    if t.resume == "never":
        return None
    ckpt_root = os.path.join(t.out_dir, "checkpoints")
    if t.resume == "auto":
        return find_checkpoint(ckpt_root) if os.path.isdir(ckpt_root) else None
    if not os.path.lexists(t.resume):        # a typo (`nevr`) reads as a path otherwise
        raise FileNotFoundError(f"no checkpoint found at {t.resume}: no such file or folder (train.resume "
                                "takes auto, never or the path of a checkpoint)")
    ckpt = resolve_checkpoint(t.resume)
    if is_under(ckpt, ckpt_root) and os.path.basename(os.path.normpath(ckpt)).startswith("abandoned-"):
        # a rollback's set-aside branch: resumed here, its steps would follow the live branch's
        # in metrics.jsonl and its checkpoints mix with that branch's (a walkthrough found both)
        raise ConfigError(f"train.resume={t.resume} is a checkpoint this out_dir abandoned in a rollback; "
                          "to continue that branch, resume it into another train.out_dir")
    return ckpt


def long_context_warning(cfg: Config) -> str | None:
    """A warning for a HOPE or Titans run whose sequences and settings are where their outer
    gradients were measured to explode (every step then skipped as non-finite); None otherwise."""
    risk = cfg.model.long_context_risk()
    if cfg.train.seq_len < LONG_CONTEXT or risk is None:
        return None
    return (f"warning: train.seq_len={cfg.train.seq_len} with {risk}; there the outer gradients explode and "
            f"train.py skips the steps")


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():   # the saving node may have had more GPUs
        for i, cuda_state in enumerate(s["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


def peak_memory_gib(device_type) -> float:
    """Peak memory of this process: CUDA tensors allocated, or the CPU resident set size."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20   # bytes on macOS, KiB on Linux


def _silent(*args, **kwargs):
    pass


class Throughput:
    """Tokens per second between two logged steps, with the time spent in evals and
    checkpoints left out (`with throughput.paused():`)."""

    def __init__(self):
        self.t_last, self.tokens = time.time(), 0

    def add(self, tokens):
        self.tokens += tokens

    @contextmanager
    def paused(self):
        t_paused = time.time()
        try:
            yield
        finally:
            self.t_last += time.time() - t_paused

    def rate(self) -> float:
        """Tokens/s since the last restart (or the start)."""
        return self.tokens / max(time.time() - self.t_last, 1e-9)

    def restart(self):
        """Count anew from now (after a log line, whose own time is left out too)."""
        self.t_last, self.tokens = time.time(), 0


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step. On resume, lines past the resumed
    step are dropped, so a killed-and-resumed run logs exactly what an uninterrupted one does;
    a rollback's are an abandoned run's, kept aside (`keep_dropped`). A step's line is written
    before its checkpoint, so a last line cut short by a kill is always past the resumed step:
    dropped too. Any other unreadable line is a one-line error naming the file and line.
    Reading (here) and rewriting (`start`, atomic) are apart, so that a caller can check the
    file, then change other outputs, then rewrite it."""

    def __init__(self, path, resume_step=None):
        self.path, self.resume_step, self.keep, self.dropped = path, resume_step, [], []
        if resume_step is None or not os.path.exists(path):
            return
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        for number, line in enumerate(lines, 1):
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError) as e:
                if number == len(lines):           # cut short by a kill: past the resume step
                    break
                raise ValueError(f"{path} line {number} is not a metrics record ({type(e).__name__}: "
                                 f"{e}); fix or remove it to resume") from None
            (self.keep if step <= resume_step else self.dropped).append(line)

    def keep_dropped(self) -> str | None:
        """Copy the records past the resumed step (an abandoned run's, in a rollback) to
        metrics.abandoned[-N].jsonl, atomically -> that path (None when there are none)."""
        if not self.dropped:
            return None
        kept = aside_name(self.path, "abandoned")
        self._write(kept, "".join(self.dropped))
        return kept

    def start(self):
        """Rewrite the file for this run: the records up to the resumed step (atomically: a
        kill or a full disk leaves the earlier file), or none for a fresh run."""
        if self.resume_step is None:
            if os.path.exists(self.path):
                os.remove(self.path)
        elif os.path.exists(self.path):
            self._write(self.path, "".join(self.keep))

    @staticmethod
    def _write(path, text):
        try:
            write_atomic(path, text)
        except OSError as e:
            raise OSError(f"cannot write {path}: {e.strerror or e}") from None

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def wandb_run_id(cfg: Config, continues: bool) -> tuple[str, bool]:
    """(the W&B run id of this training run, whether it continues a recorded one). A run that
    resumes a checkpoint of its own out_dir (`continues`) logs into the W&B run recorded in
    <out_dir>/wandb_run_id; a fresh run, or one resumed from elsewhere, gets a new id, which
    start_logging records once the outputs are open. After a rollback W&B keeps the steps it
    has and drops the re-logged ones up to its last (metrics.jsonl holds the rollback's)."""
    path = os.path.join(cfg.train.out_dir, WANDB_ID)
    if cfg.logging.wandb == "disabled" or not (continues and os.path.isfile(path)):
        return secrets.token_hex(4), False
    with open(path, errors="replace") as f:
        run_id = f.read().strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
        raise ConfigError(f"{path} holds no W&B run id (got {run_id[:40]!r}): delete it to log this resumed run as "
                          "a new W&B run")
    return run_id, True


def init_wandb(cfg: Config, run_id: str | None = None, resume: bool = False):
    """The W&B run (id `run_id`, continued where `resume`), or None for logging.wandb=disabled."""
    mode = cfg.logging.wandb
    if mode == "disabled":
        return None
    try:
        import wandb  # imported lazily: not installed on every GPU image
    except ImportError:
        raise ConfigError(f"logging.wandb={mode} needs the wandb package: pip install wandb") from None
    if mode == "online":
        import socket
        try:   # online mode without network hangs for ~100 s: check first, fall back to offline
            socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
        except OSError:
            print("wandb: no network, logging offline instead (wandb sync later)")
            mode = "offline"
    os.makedirs(cfg.train.out_dir, exist_ok=True)
    try:
        return wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.run_name or None, mode=mode,
                          config=to_dict(cfg), dir=cfg.train.out_dir, id=run_id, resume="allow" if resume else None)
    except Exception as e:          # wandb's own errors (a bad project name, ...): one line
        raise ConfigError(f"logging.wandb={mode}: wandb.init failed: {one_line(e)}") from None


# ----------------------------------------------------------------------------------------

def check_run(cfg: Config, device) -> None:
    """The checks of the config against the out_dir and this machine that can refuse the run
    before a tokenizer, corpus or model is loaded."""
    t = cfg.train
    if cfg.eval.during_training and not t.eval_every:   # here, not in config.validate: saved configs load
        raise ConfigError(f"eval.during_training={cfg.eval.during_training} never runs with train.eval_every=0")
    if cfg.eval.during_training:    # names checked by config.py; their data read now, not after training
        from eval.run import check_during_training
        check_during_training(cfg.eval.during_training)
    check_out_dir(t)
    check_vocab(cfg)
    why = triton_blocker(cfg.model, device)          # else the first step fails
    if why:
        raise ConfigError(why)


def run_to_resume(cfg: Config, ckpt_root) -> tuple[str | None, Config | None]:
    """The checkpoint to resume (None: a fresh run) and its saved config, checked against this
    one. Called before the data is prepared: a changed data recipe would otherwise tokenize
    (or rebuild) a corpus first."""
    try:
        resume_from = checkpoint_to_resume(cfg.train)
        return resume_from, (check_resume_config(cfg, resume_from) if resume_from else None)
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as e:     # a damaged or missing latest: name the one kept before it
        raise with_earlier_hint(e, cfg.train, ckpt_root) from None


def build_checked(model_cfg, device):
    """build_model on `device`; a model too large to build (past memory or int64) is a
    one-line ConfigError, any other error keeps its traceback."""
    from model import build_model
    try:
        return build_model(model_cfg).to(device)
    except (RuntimeError, OverflowError, MemoryError, TypeError) as e:
        if isinstance(e, (RuntimeError, TypeError)) and not any(
                words in str(e) for words in ("Overflow", "overflow", "allocate", "out of memory")):
            raise                   # a bug, not a size: keep its traceback
        m, why = model_cfg, (str(e).strip().splitlines() or [type(e).__name__])[0]   # not torch's C++ frames
        raise ConfigError(f"cannot build the model (model.n_layer={m.n_layer}, d_model={m.d_model}, "
                          f"vocab_size={m.vocab_size}) on {device}: {why}") from None


def report_model(model, cfg: Config, device, say) -> None:
    """The start-up lines about the model: its size, which memory parts run fused, and the
    settings measured or known not to train (long contexts, idle CMS levels, endless warm-up)."""
    t = cfg.train
    say(f"model: {cfg.model.arch}, {model.num_params() / 1e6:.2f}M parameters "
        f"({model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding)")
    for line in model.kernel_report(device):      # which memory parts run fused (model.kernels)
        say(f"kernels: {line}")
    warning = long_context_warning(cfg)
    if warning:
        say(warning, file=sys.stderr)
    idle = model.idle_parameters(t.seq_len)
    if idle:
        say(f"note: {len(idle)} parameter(s) get no gradient at train.seq_len={t.seq_len} and will not train "
            f"(a CMS fast level whose chunk is not shorter than the sequence, or a Titans gate projection "
            f"that no gate reads): {', '.join(idle[:2])}"
            + (", ..." if len(idle) > 2 else ""))
    if cfg.optim.warmup_steps > t.max_steps:
        say(f"note: optim.warmup_steps={cfg.optim.warmup_steps} > train.max_steps={t.max_steps}: the lr never "
            f"leaves warm-up (it peaks at {lr_at(t.max_steps - 1, cfg):.3g}, train.lr={t.lr:.3g})")


def resume_training(resume_from, saved_cfg, model, optimizer, sampler, cfg: Config, ckpt_root, say) -> tuple[int, dict]:
    """Load a checkpoint's weights, optimiser, sampler and RNG states (of any rank count: DCP
    reshards on load); returns the step to start from and the run's stats (tokens, skipped
    steps). A fresh run (`resume_from` None) starts at step 0."""
    t = cfg.train
    if not resume_from:
        return 0, {"skipped_steps": 0, "tokens": 0}
    try:
        state = load_training_state(resume_from, model, optimizer, required=RESUME_KEYS)
    except (ConfigError, CheckpointMismatch):       # not damage: an earlier step would not fit either
        raise
    except ValueError as e:          # a damaged latest checkpoint: name the one kept before it
        raise with_earlier_hint(e, t, ckpt_root) from None
    start_step = state["step"]
    if start_step > t.max_steps:     # before "resumed from": the run does not resume
        raise ConfigError(f"{resume_from} is at step {start_step}, past train.max_steps={t.max_steps}: "
                          "raise train.max_steps to train on")
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    say(f"resumed from {resume_from} at step {start_step}")
    note = schedule_change_note(cfg, saved_cfg.train.max_steps, start_step)
    if note:
        say(note)
    if start_step == t.max_steps:
        say(f"already at train.max_steps={t.max_steps}: nothing to train")
    return start_step, state["stats"]


def schedule_change_note(cfg: Config, saved_max_steps: int, start_step: int) -> str | None:
    """The start-up note of a run resumed at `start_step` under another train.max_steps than
    the checkpoint's run had, or None where that changes no step's lr. A warmup, a constant
    schedule and WSD's stable phase do not depend on max_steps: the note said the lr changed
    from the resumed step on even then. Going on past the checkpoint's run's end, the note
    gives the lr there, which a finished cosine run takes from its floor back up."""
    new_max = cfg.train.max_steps
    if saved_max_steps == new_max or start_step >= new_max:
        return None
    saved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=saved_max_steps))
    head = (f"note: train.max_steps={new_max}, the checkpoint's run had {saved_max_steps}: the lr schedule now "
            f"ends at step {new_max}")
    # (lr_at is a few float ops: scanning every shared step costs well under a second at 1M steps)
    changed = next((s for s in range(start_step, min(saved_max_steps, new_max))
                    if lr_at(s, cfg) != lr_at(s, saved)), None)
    if changed is not None:
        return (f"{head}, so from step {changed + 1} on the lr is not the one the checkpoint's run would have "
                f"used (step {changed + 1}: {lr_at(changed, cfg):.3g}, not {lr_at(changed, saved):.3g})")
    if new_max > saved_max_steps:
        return (f"{head}; the steps after {saved_max_steps}, its last, go on at lr {lr_at(saved_max_steps, cfg):.3g} "
                f"(step {saved_max_steps} had {lr_at(saved_max_steps - 1, saved):.3g})")
    return None


def sample_after_training(model, tokenizer, t, device, autocast) -> str:
    """The text of `train.sample_tokens` tokens sampled after `train.sample_prompt` (seeded by
    train.seed: the same run samples the same text; sample.py's sample 0 on CPU). A model whose
    logits went non-finite gets a line saying so: its checkpoints and evals are written."""
    model.eval()
    ids, start = tokenizer.encode_prompt(t.sample_prompt)
    g = torch.Generator(device=device).manual_seed(t.seed)
    try:
        with autocast:
            out = model.generate(torch.tensor([ids], device=device), t.sample_tokens, temperature=0.8, top_k=50,
                                 generator=g, vocab_size=tokenizer.vocab_size)
    except ValueError as e:          # generate's non-finite logits: the run is not an error
        return f"(none: {e})"
    return tokenizer.decode(out[0, start:].tolist())


def train(cfg: Config):
    """Train per `cfg`; under torchrun every rank calls this. Returns the exit code."""
    env = distributed.setup(cfg)
    finished = False
    try:
        code = _train(cfg, env)
        finished = True      # also code 1 (NaN stop): every rank decides it on the same global numbers
        return code
    finally:
        release_out_dir(cfg.train.out_dir)
        distributed.teardown(env, clean=finished)


def _train(cfg: Config, env: DistEnv):
    """One rank's run, in order: check the run (refusing before anything is loaded or
    written), prepare the data, build and report the model, resume, open the outputs, the
    training loop (log, eval, checkpoint), then the final eval and sample."""
    from data.loader import BatchSampler
    from data.tokenizer import get_tokenizer
    from eval.perplexity import evaluate_split

    t = cfg.train
    device, device_type = env.device, env.device_type
    say = print if env.is_main else _silent          # rank 0 alone prints and writes files
    param_dtype = distributed.mixed_precision_dtype(cfg, env) if env.data_parallel == "fsdp" else None
    # Autocast also wherever FSDP2 gathers bf16 parameters (distributed.mixed_precision=bf16
    # computes in bf16 whatever train.dtype says): the memory layers keep their fast weights
    # and gates in fp32 (memory.py), and their outputs meet bf16 weights (measured on an H100:
    # without autocast HOPE stopped at "expected scalar type Float but found BFloat16").
    use_bf16 = setup_precision(t, device_type) or param_dtype == torch.bfloat16
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    torch.manual_seed(t.seed)          # the same seed on every rank: identical initial weights
    random.seed(t.seed)
    np.random.seed(t.seed)

    # another run may hold the out_dir: refused before its files are read (check_run names an empty out_dir)
    if t.out_dir and os.path.isfile(os.path.join(t.out_dir, ".lock")):
        distributed.on_main(env, lambda: lock_out_dir(t.out_dir))
    check_run(cfg, device)
    tokenizer = get_tokenizer(cfg.data.tokenizer)      # check_run set a vocab_size of 0 to its own
    ckpt_root = os.path.join(t.out_dir, "checkpoints")
    resume_from, saved_cfg = run_to_resume(cfg, ckpt_root)
    data_dir = resolve_data_dir(cfg)
    # one preparer: concurrent ones would race on the final rename
    distributed.on_main(env, lambda: prepare_data(cfg, data_dir))
    dataset = open_training_data(cfg)
    check_eval_split(cfg, dataset, data_dir)

    if env.is_main:
        print("config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())

    model = build_checked(cfg.model, device)
    n_params = model.num_params()
    flops_per_token = model.flops_per_token(t.seq_len)
    # Titans/HOPE memory updates (inner gradients, scans) are counted apart from the 6N rule
    memory_flops_per_token = model.memory_flops_per_token(t.seq_len)
    report_model(model, cfg, device, say)
    # `model` keeps its parameter names (checkpoints, eval, sampling); `train_model` is what
    # forward/backward run through: the FSDP2 model itself or a DDP wrapper
    train_model = distributed.parallelize(model, cfg, env)
    optimizer = make_optimizer(model, cfg, device_type)
    local_bs = t.batch_size // env.world_size
    micro_bs = local_bs // t.grad_accum
    say(f"parallel: {env.data_parallel if env.world_size > 1 or env.data_parallel == 'fsdp' else 'single process'}"
        f" on {env.world_size} rank(s), {device_type}"
        + (f", fsdp params {str(param_dtype).removeprefix('torch.')}" if param_dtype else "")
        + f", compute {'bf16' if use_bf16 else 'fp32'}"
        f", activation checkpointing {'on' if cfg.distributed.activation_checkpointing else 'off'}"
        f", compile {'on' if t.compile else 'off'} | global batch {t.batch_size} = {env.world_size} rank(s) "
        f"x {t.grad_accum} micro-batch(es) x {micro_bs} sequences of {t.seq_len}")
    # every rank reads its slice of the same global batch (data/loader.py)
    sampler = BatchSampler(dataset, "train", t.batch_size, t.seq_len, seed=t.seed,
                           rank=env.rank, world_size=env.world_size, sampling=cfg.data.sampling)
    split_tokens = dataset.meta["splits"]["train"]["tokens"]
    steps = f"{t.max_steps} step" + ("" if t.max_steps == 1 else "s")
    say(f"data: {cfg.data.sampling} windows of {t.seq_len + 1} tokens; {steps} read "
        f"{t.max_steps * t.batch_size * t.seq_len / split_tokens:.3g}x the train split's {split_tokens:,} tokens")

    start_step, stats = resume_training(resume_from, saved_cfg, model, optimizer, sampler, cfg, ckpt_root, say)

    def open_outputs():   # written once the model, optimiser and resume checks have passed
        os.makedirs(t.out_dir, exist_ok=True)
        if not resume_from:           # a run that saved no checkpoint, started over: keep its results
            for name in ("metrics.jsonl", "final_eval.json"):
                kept = keep_aside(os.path.join(t.out_dir, name))
                if kept:
                    say(f"starting over: the earlier {name} is kept as {kept}")
        # metrics.jsonl read first: a damaged line stops the run before anything is rewritten
        log = MetricsLog(os.path.join(t.out_dir, "metrics.jsonl"), resume_step=start_step if resume_from else None)
        if resume_from and t.resume != "auto" and is_under(resume_from, ckpt_root) and any(
                step_number(d) > start_step for d in saved_steps(ckpt_root)):   # a rollback
            # in this order, a kill at any point loses nothing: the abandoned run's records are
            # copied aside, then `latest` names the rollback's step, then metrics.jsonl is cut
            kept = log.keep_dropped()
            abandoned = set_aside_later_steps(ckpt_root, start_step)
            if abandoned or kept:
                say(f"rollback to step {start_step}: the later checkpoints are kept as "
                    f"{', '.join(abandoned) or '(none)'}, their metrics in {kept or '(none)'}")
        log.start()
        dump_yaml(cfg, os.path.join(t.out_dir, "config.yaml"))
        return log

    def start_logging():    # wandb first: its errors (a bad project name) come before any rewrite
        lock_out_dir(t.out_dir)       # held to the end of the process: one run per out_dir
        run_id, continued = wandb_run_id(cfg, continues=bool(resume_from) and is_under(resume_from, ckpt_root))
        run = init_wandb(cfg, run_id, continued)
        try:
            outputs = open_outputs()
        except BaseException:
            if run:
                run.finish(exit_code=1)     # else a crashed run is left in the project
            raise
        if run and not continued:
            write_atomic(os.path.join(t.out_dir, WANDB_ID), f"{run_id}\n")
        return outputs, run
    metrics, run = distributed.on_main(env, start_logging) or (None, None)

    def checkpoint(step):   # collective: every rank writes its shards
        if not optimizer.state:           # (all steps so far skipped) DCP would make up a state: a
            say(f"step {step}: no checkpoint before the first optimiser step")   # resume then differs
            return
        bad = first_non_finite(model)     # a save would prune good checkpoints for NaN weights
        if bad:
            say(f"step {step}: no checkpoint: the weights hold a NaN or inf ({bad}); the earlier checkpoints "
                "are kept", file=sys.stderr)
            return
        trainer_state = {"step": step, "stats": stats, "sampler": sampler.state_dict(), "rng": rng_state()}
        path = save_checkpoint(ckpt_root, step, model, optimizer, trainer_state, cfg, keep=t.keep_checkpoints)
        say(f"saved checkpoint {path}")

    def evaluate():
        # the same windows whatever the rank count (train.eval_batch_size, else batch_size /
        # grad_accum); with several ranks each scores its rows of every batch
        with autocast:
            return evaluate_split(model, dataset, "val", batch_size=t.eval_batch_size or micro_bs * env.world_size,
                                  seq_len=t.seq_len,
                                  max_batches=t.eval_batches, device=device, rank=env.rank,
                                  world_size=env.world_size)

    def forward_backward(x, y) -> float:
        """The gradients of one optimiser step, summed over its micro-batches; returns the
        step's loss (the mean over micro-batches and ranks)."""
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for micro in range(t.grad_accum):
            rows = slice(micro * micro_bs, (micro + 1) * micro_bs)
            xb, yb = x[rows].to(device, non_blocking=True), y[rows].to(device, non_blocking=True)
            # gradients cross ranks once per step, in the last micro-batch's backward
            with gradient_sync(train_model, env, sync=micro == t.grad_accum - 1):
                with autocast:
                    _, loss, _ = train_model(xb, yb, return_state=False)    # frees each block's state
                (loss / t.grad_accum).backward()
            step_loss += loss.detach().double() / t.grad_accum
        return all_reduce_mean(step_loss).item()       # equal local batches: the global mean

    peak = peak_flops(device)

    def log_step(done, loss, lr, grad_norm) -> dict:
        """The metrics record of a logged step (tokens/s since the last one, peak memory,
        MFU on known GPUs), printed as one console line."""
        if device_type == "cuda":
            torch.cuda.synchronize()
        tok_s = throughput.rate()
        tok_s_device = tok_s / env.world_size
        peak_mem = all_reduce_max(peak_memory_gib(device_type), device)   # the fullest rank
        record = {"step": done, "tokens": stats["tokens"], "loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s_device,
                  "peak_mem_gib": peak_mem, "skipped_steps": stats["skipped_steps"]}
        line = (f"step {done}/{t.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s"
                + (f" ({tok_s_device:,.0f}/device)" if env.world_size > 1 else "")
                + f" | mem {peak_mem:.2f} GiB")
        if peak:
            record["mfu"] = tok_s_device * flops_per_token / peak
            line += f" | mfu {100 * record['mfu']:.1f}%"
            if memory_flops_per_token:
                record["mfu_memory"] = tok_s_device * memory_flops_per_token / peak
                line += f" (+{100 * record['mfu_memory']:.1f}% memory updates)"
        say(line, flush=True)
        throughput.restart()
        return record

    model.train()
    bad_in_a_row, throughput = 0, Throughput()
    last_eval = None        # (step, result): the final eval reuses the last step's
    tokens_per_step = t.batch_size * t.seq_len
    for step in range(start_step, t.max_steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = forward_backward(*sampler.next_batch())
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)).item()  # total norm
        done = step + 1
        updated = math.isfinite(loss) and math.isfinite(grad_norm)
        if updated:
            bad_in_a_row = 0
            optimizer.step()
            stats["tokens"] += tokens_per_step
            throughput.add(tokens_per_step)
        else:
            # NaN/inf loss or gradient: skip the update, count it, stop if it persists. The
            # step still counts (its batch is consumed), so its eval and checkpoint still run.
            stats["skipped_steps"] += 1
            bad_in_a_row += 1
            say(f"step {done}: non-finite loss/grad ({loss}, {grad_norm}), step skipped "
                f"({bad_in_a_row} in a row)")
            if bad_in_a_row >= t.max_bad_steps:
                say(f"error: {bad_in_a_row} non-finite steps in a row; stopping. The last good checkpoint "
                    f"is kept in {ckpt_root}", file=sys.stderr)
                return 1
        optimizer.zero_grad(set_to_none=True)

        record = None
        # (the first step only of a fresh run: a resumed run logs what an uninterrupted one does)
        if updated and (done % t.log_every == 0 or done == t.max_steps or done == 1):
            record = log_step(done, loss, lr, grad_norm)
        if t.eval_every and (done % t.eval_every == 0 or done == t.max_steps):
            with throughput.paused():       # eval and checkpoint time is left out of tokens/s
                r = evaluate()
                last_eval = (done, r)
                record = record or {"step": done, "tokens": stats["tokens"], "loss": loss if updated else None,
                                    "lr": lr}
                record.update(val_loss=r["loss"], val_ppl=r["perplexity"], val_bpb=r["bits_per_byte"])
                say(f"eval step {done} | val loss {r['loss']:.4f} | ppl {r['perplexity']:.2f} | "
                    f"bits/byte {r['bits_per_byte']:.4f}", flush=True)
                if cfg.eval.during_training:   # collective under FSDP: every rank runs it
                    from eval.run import run_during_training
                    model.eval()
                    with autocast:
                        extra = run_during_training(model, tokenizer, cfg.eval.during_training, device,
                                                    seq_len=t.seq_len)   # offline eval data: $NL_DATA_DIR or ../shared/data
                    model.train()
                    record.update(extra)
                    say("eval step %d | %s" % (done, " | ".join(f"{k} {v:.4f}" for k, v in extra.items())), flush=True)
        if record and metrics:
            metrics.write(record)
            if run:
                run.log(record, step=done)
        if t.ckpt_every and (done % t.ckpt_every == 0 or done == t.max_steps):
            with throughput.paused():
                checkpoint(done)

    if cfg.eval.final:
        # the last step's eval scored these weights on the same batches: running it again doubled
        # the final eval's time for the same numbers
        r = last_eval[1] if last_eval and last_eval[0] == t.max_steps else evaluate()
        summary = {"val_loss": r["loss"], "val_ppl": r["perplexity"], "val_bpb": r["bits_per_byte"],
                   "tokens": stats["tokens"], "skipped_steps": stats["skipped_steps"], "params": n_params}
        if env.is_main:
            write_json(os.path.join(t.out_dir, "final_eval.json"), summary, indent=1)
        say(f"final: val loss {r['loss']:.4f} | ppl {r['perplexity']:.2f} | bits/byte {r['bits_per_byte']:.4f}")
    if t.sample_tokens and (env.is_main or env.data_parallel == "fsdp"):   # FSDP2: all ranks run the forwards
        say("sample:\n" + sample_after_training(model, tokenizer, t, device, autocast))
    if run:
        run.finish()
    say("training done")
    return 0


def usage() -> str:
    """--help: this module's docstring, then every key an override can set, with config.py's
    default (a config file sets its own on top)."""
    def keys(section, prefix=""):
        for key, value in section.items():
            if isinstance(value, dict):
                yield from keys(value, f"{prefix}{key}.")
            else:
                yield f"  --{prefix}{key}={value if isinstance(value, str) else json.dumps(value)}"
    return (__doc__.strip() + "\n\nOverrides (--section.key=value; config.py's defaults):\n"
            + "\n".join(keys(to_dict(Config()))))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    path = DEFAULT_CONFIG
    if argv and not argv[0].startswith("--"):
        path, argv = argv[0], argv[1:]
    cfg = None
    try:
        data = config_data(path, argv)
        cfg = config_from_dict(data)
        if int(os.environ.get("RANK", "0")) == 0:
            for note in unread_run_settings(data, cfg):
                print(f"note: {note}")
        return train(cfg)
    except (ConfigError, OSError, ValueError, MemoryError) as e:   # OSError: e.g. an out_dir name too long
        # one write: under torchrun every rank prints this line to the same stream, and print's
        # separate write of the newline let two ranks' lines interleave
        sys.stderr.write(f"error: {'out of memory: ' if isinstance(e, MemoryError) else ''}{e}\n")
        return 2
    except KeyboardInterrupt:       # Ctrl-C: a traceback would add nothing
        sys.stderr.write(f"interrupted: {rerun_hint(cfg)}\n")
        return 130
    except Terminated:
        sys.stderr.write(f"terminated (SIGTERM): {rerun_hint(cfg)}\n")
        return 143


def rerun_hint(cfg: Config | None) -> str:
    """What running the same command again does after a stop. It said the run continues from
    the last checkpoint also when none had been saved yet (stopped before train.ckpt_every),
    where a rerun starts over."""
    saved = "checkpoints are written atomically, so train.resume=auto continues from the last one"
    if cfg is None:                 # stopped while reading the config
        return saved
    try:
        latest = find_checkpoint(os.path.join(cfg.train.out_dir, "checkpoints"))
    except (OSError, ValueError):   # a damaged `latest`: the rerun's resume names it
        return saved
    if latest:
        return f"{saved} ({latest})"
    return (f"no checkpoint of this run was saved yet (train.ckpt_every={cfg.train.ckpt_every}): the same command "
            "starts it again")


class Terminated(BaseException):
    """SIGTERM (a scheduler's stop: SLURM preemption, `scancel`, a job's time limit) raised
    where the run is, as Ctrl-C raises KeyboardInterrupt: the run unwinds (its out_dir lock
    and files closed) and says so in one line. A BaseException, as KeyboardInterrupt is, so
    that no `except Exception` on the way swallows it."""


def raise_terminated(signum, frame):
    raise Terminated


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, raise_terminated)    # silent exit 143 before
    code = main()
    if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun: a finished run leaves without the interpreter's teardown, where gloo's
        # threads sometimes aborted a rank ("terminate called without an active exception"
        # after 'training done': exit -6, so torchrun failed the job; 2 of 24 CPU runs)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
