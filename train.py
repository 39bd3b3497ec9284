"""Pretrain a language model.

    python train.py                                  # configs/quickstart.yaml on the built-in corpus
    python train.py configs/hope_tiny.yaml --train.max_steps=200 --model.d_model=256

Reads a YAML config (DESIGN §2), prepares token shards if needed, trains with AdamW and a
warmup + cosine/WSD schedule, evaluates, checkpoints atomically and resumes exactly
(`train.resume=auto`). Writes <out_dir>/config.yaml and <out_dir>/metrics.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import yaml

from checkpoint import find_checkpoint, load_training_state, resolve_checkpoint, save_checkpoint
from config import Config, ConfigError, dump_yaml, load_config, to_dict

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "quickstart.yaml")
# dense bf16 peak FLOP/s for MFU (H100/H200 SXM; A100); other GPUs report MFU as n/a
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


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
        decay_start = int(total * (1 - o.decay_fraction))
        if step < decay_start:
            return base
        frac = (step - decay_start) / max(1, total - decay_start)
        return base + (min_lr - base) * min(frac, 1.0)
    frac = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * frac))


def make_optimizer(model, cfg: Config, device_type):
    """AdamW; weight decay on matrices only (norm gains, biases, scalars are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.train.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    if device_type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def resolve_data_dir(cfg: Config) -> str:
    if cfg.data.data_dir:
        return cfg.data.data_dir
    if os.path.isfile(os.path.join(cfg.data.dataset, "meta.json")):
        return cfg.data.dataset                       # an already prepared directory
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.data.dataset)
    return os.path.join("data", "cache", f"{slug}-{cfg.data.tokenizer}")


def prepare_data(cfg: Config, data_dir):
    from data.prepare import ensure_prepared
    if os.path.isfile(os.path.join(data_dir, "meta.json")) and data_dir == cfg.data.dataset:
        return
    d = cfg.data
    ensure_prepared(d.dataset, data_dir, tokenizer=d.tokenizer, val_fraction=d.val_fraction,
                    num_workers=d.num_workers, text_field=d.text_field, split=d.hf_split,
                    streaming=d.hf_streaming, max_docs=d.max_docs, data_files=d.hf_data_files or None)


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step. On resume, lines past the resumed
    step are dropped, so a killed-and-resumed run logs exactly what an uninterrupted one does."""

    def __init__(self, path, resume_step=None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(path, "w") as f:
                f.writelines(keep)
        elif resume_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def init_wandb(cfg: Config):
    mode = cfg.logging.wandb
    if mode == "disabled":
        return None
    import wandb  # imported lazily: not installed on every GPU image
    if mode == "online":
        import socket
        try:   # online mode without network hangs for ~100 s: check first, fall back to offline
            socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
        except OSError:
            print("wandb: no network, logging offline instead (wandb sync later)")
            mode = "offline"
    return wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.run_name or None, mode=mode,
                      config=to_dict(cfg), dir=cfg.train.out_dir)


# ----------------------------------------------------------------------------------------

def train(cfg: Config):
    from data.loader import BatchSampler, TokenDataset
    from data.tokenizer import get_tokenizer
    from eval.perplexity import evaluate_split
    from model import build_model

    t = cfg.train
    device = ("cuda" if torch.cuda.is_available() else "cpu") if t.device == "auto" else t.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device == "cuda")
    autocast = torch.autocast(device, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)

    tokenizer = get_tokenizer(cfg.data.tokenizer)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                          f"{cfg.data.tokenizer} tokenizer's {tokenizer.vocab_size}")
    data_dir = resolve_data_dir(cfg)
    prepare_data(cfg, data_dir)
    dataset = TokenDataset(data_dir)
    if dataset.meta["tokenizer"] != cfg.data.tokenizer:
        raise ConfigError(f"{data_dir} was prepared with tokenizer {dataset.meta['tokenizer']!r}, "
                          f"but data.tokenizer={cfg.data.tokenizer!r}")

    os.makedirs(t.out_dir, exist_ok=True)
    print("config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    dump_yaml(cfg, os.path.join(t.out_dir, "config.yaml"))

    model = build_model(cfg.model).to(device)
    n_params = model.num_params()
    print(f"model: {cfg.model.arch}, {n_params / 1e6:.2f}M parameters "
          f"({model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding)")
    optimizer = make_optimizer(model, cfg, device)
    step_model = torch.compile(model) if t.compile else model
    micro_bs = t.batch_size // t.grad_accum
    sampler = BatchSampler(dataset, "train", t.batch_size, t.seq_len, seed=t.seed)

    # ---- resume
    ckpt_root = os.path.join(t.out_dir, "checkpoints")
    start_step, stats, resume_from = 0, {"skipped_steps": 0, "tokens": 0}, None
    if t.resume == "auto":
        resume_from = find_checkpoint(ckpt_root) if os.path.isdir(ckpt_root) else None
    elif t.resume != "never":
        resume_from = resolve_checkpoint(t.resume)
    if resume_from:
        state = load_training_state(resume_from, model, optimizer)
        start_step, stats = state["step"], state["stats"]
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        print(f"resumed from {resume_from} at step {start_step}")
    metrics = MetricsLog(os.path.join(t.out_dir, "metrics.jsonl"), resume_step=start_step if resume_from else None)
    run = init_wandb(cfg)

    def checkpoint(step):
        trainer_state = {"step": step, "stats": stats, "sampler": sampler.state_dict(), "rng": rng_state()}
        path = save_checkpoint(ckpt_root, step, model, optimizer, trainer_state, cfg, keep=t.keep_checkpoints)
        print(f"saved checkpoint {path}")

    def evaluate():
        model.eval()
        with autocast:
            r = evaluate_split(model, dataset, "val", batch_size=micro_bs, seq_len=t.seq_len,
                               max_batches=t.eval_batches, device=device)
        model.train()
        return r

    peak = next((v for k, v in PEAK_FLOPS.items() if device == "cuda" and k in torch.cuda.get_device_name()), None)
    flops_per_token = model.flops_per_token(t.seq_len)
    model.train()
    bad_in_a_row, t_last, tokens_since = 0, time.time(), 0
    tokens_per_step = t.batch_size * t.seq_len
    for step in range(start_step, t.max_steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = sampler.next_batch()
        loss_sum = 0.0
        for micro in range(t.grad_accum):
            xb = x[micro * micro_bs:(micro + 1) * micro_bs].to(device, non_blocking=True)
            yb = y[micro * micro_bs:(micro + 1) * micro_bs].to(device, non_blocking=True)
            with autocast:
                _, loss, _ = step_model(xb, yb)
            (loss / t.grad_accum).backward()
            loss_sum += loss.item() / t.grad_accum
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)   # also the total norm
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm.item())):
            # NaN/inf loss or gradient: skip the update, count it, stop if it persists
            optimizer.zero_grad(set_to_none=True)
            stats["skipped_steps"] += 1
            bad_in_a_row += 1
            print(f"step {step + 1}: non-finite loss/grad ({loss_sum}, {grad_norm.item()}), step skipped "
                  f"({bad_in_a_row} in a row)")
            if bad_in_a_row >= t.max_bad_steps:
                print(f"error: {bad_in_a_row} non-finite steps in a row; stopping. The last good checkpoint "
                      f"is kept in {ckpt_root}", file=sys.stderr)
                return 1
            continue
        bad_in_a_row = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats["tokens"] += tokens_per_step
        tokens_since += tokens_per_step
        done = step + 1

        record = None
        if done % t.log_every == 0 or done == t.max_steps or done == start_step + 1:
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t_last
            tok_s = tokens_since / max(dt, 1e-9)
            record = {"step": done, "tokens": stats["tokens"], "loss": loss_sum, "lr": lr,
                      "grad_norm": grad_norm.item(), "tokens_per_s": tok_s, "skipped_steps": stats["skipped_steps"]}
            line = f"step {done}/{t.max_steps} | loss {loss_sum:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s"
            if peak:
                record["mfu"] = tok_s * flops_per_token / peak
                line += f" | mfu {100 * record['mfu']:.1f}%"
            print(line, flush=True)
            t_last, tokens_since = time.time(), 0
        if t.eval_every and (done % t.eval_every == 0 or done == t.max_steps):
            r = evaluate()
            record = record or {"step": done, "tokens": stats["tokens"], "loss": loss_sum, "lr": lr}
            record.update(val_loss=r["loss"], val_ppl=r["perplexity"], val_bpb=r["bits_per_byte"])
            print(f"eval step {done} | val loss {r['loss']:.4f} | ppl {r['perplexity']:.2f} | "
                  f"bits/byte {r['bits_per_byte']:.4f}", flush=True)
            t_last = time.time()
        if record:
            metrics.write(record)
            if run:
                run.log(record, step=done)
        if t.ckpt_every and (done % t.ckpt_every == 0 or done == t.max_steps):
            checkpoint(done)
            t_last = time.time()

    if cfg.eval.final:
        r = evaluate()
        summary = {"val_loss": r["loss"], "val_ppl": r["perplexity"], "val_bpb": r["bits_per_byte"],
                   "tokens": stats["tokens"], "skipped_steps": stats["skipped_steps"], "params": n_params}
        with open(os.path.join(t.out_dir, "final_eval.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(f"final: val loss {r['loss']:.4f} | ppl {r['perplexity']:.2f} | bits/byte {r['bits_per_byte']:.4f}")
    if t.sample_tokens:
        model.eval()
        ids = torch.tensor([tokenizer.encode(t.sample_prompt) or [tokenizer.eot_id]], device=device)
        g = torch.Generator(device=device).manual_seed(t.seed)
        with autocast:
            out = model.generate(ids, t.sample_tokens, temperature=0.8, top_k=50, generator=g)
        print("sample:\n" + tokenizer.decode(out[0].tolist()))
    if run:
        run.finish()
    print("training done")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = DEFAULT_CONFIG
    if argv and not argv[0].startswith("--"):
        path, argv = argv[0], argv[1:]
    try:
        cfg = load_config(path, argv)
        return train(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
