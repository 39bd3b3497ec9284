"""
What every eval module needs about the model it scores (DESIGN §7): its kind (recurrent
state or attention context), its device, eval mode for the duration of a score, and, for
the CLIs, a checkpoint loaded with the tokenizer it was trained with, and their exit on bad
input. torch is imported inside the functions that use it, so a CLI that only plans
(eval.reproduce) starts without it.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RECURRENT_ARCHS = ("titans", "hope")


def is_recurrent(model) -> bool:
    """Constant-size state (fast weights, windowed caches): any length streams in flat memory."""
    config = getattr(model, "config", None)
    return getattr(config, "arch", None) in RECURRENT_ARCHS


def context_limit(model, max_len: int | None) -> int | None:
    """The most tokens `model` reads at once: None for a recurrent model (it streams any
    length with its state carried), else max_len (an attention model's context)."""
    return None if is_recurrent(model) else max_len


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    import torch
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def resolve_device(name: str) -> str:
    """--device auto|cpu|cuda[:N] -> a device name; auto picks CUDA when it is there."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return name


@contextmanager
def eval_mode(model):
    """model.eval() for the duration, then its previous train/eval mode again (train.py runs
    evals in the middle of training, so scoring must not leave dropout off)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def load_checkpoint(path: str, device: str = "auto") -> tuple:
    """An eval CLI's model: (model, cfg, tokenizer, device) for a checkpoint dir or a training
    out_dir, loaded on resolve_device(device), with the tokenizer named in its config."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    from checkpoint import load_model
    from data.tokenizer import get_tokenizer
    device = resolve_device(device)
    model, cfg = load_model(path, device)
    return model, cfg, get_tokenizer(cfg.data.tokenizer), device


@contextmanager
def exit_on_error(*errors):
    """An eval CLI's answer to bad input: any of `errors` raised inside prints one line
    "error: ..." on stderr and exits with status 2 (no traceback)."""
    try:
        yield
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
