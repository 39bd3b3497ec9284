"""What one block keeps for its backward, per token: the activation memory that decides the
micro-batch and whether a config needs activation checkpointing (docs/DISTRIBUTED.md).

    python bench/saved_memory.py configs/hope_760m.yaml configs/transformer_760m.yaml
    python bench/saved_memory.py configs/titans_lmm_760m.yaml --T 256 512 --model.kernels=torch

Builds the config's model with one block (a small vocabulary: the embedding and head are not
what is measured), runs a forward under bf16 autocast on one sequence of each length T, and
sums the bytes of the distinct storages autograd saves for the backward
(torch.autograd.graph.saved_tensors_hooks), grouped by the function of this repository that
saved them. The per-token figure is the growth between the two shortest T, which removes what
does not grow with T (weights' bf16 copies, one CMS chunk's fast weights). CPU only: the
kernels' PyTorch paths (chunked scans); on CUDA the Triton scans keep less.
"""
import argparse
import collections
import os
import sys
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.common import report_error, result_footer, split_overrides  # noqa: E402
from cli import OneLineArgumentParser, positive_int  # noqa: E402
from config import load_config  # noqa: E402
from kernels.checks import triton_blocker  # noqa: E402


def saved_bytes(cfg, T):
    """{where: bytes} that one forward of a one-block model of cfg saves for its backward,
    T tokens; where = 'file:function' of the innermost repository frame that saved it."""
    from model import build_model
    torch.manual_seed(0)
    model = build_model(cfg.model)
    x = torch.randint(0, cfg.model.vocab_size, (1, T + 1))
    by, seen = collections.Counter(), set()

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            frames = [f for f in traceback.extract_stack()[:-1]
                      if f.filename.startswith(REPO) and "-packages" not in f.filename
                      and not f.filename.endswith("saved_memory.py")]
            where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].name}" if frames else "torch"
            by[where] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        model(x[:, :-1], x[:, 1:])
    return by


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+")
    p.add_argument("--T", type=positive_int, nargs="+", default=[256, 512],
                   help="sequence lengths (at least two: the per-token figure is the growth)")
    p.add_argument("--top", type=positive_int, default=5, help="places listed per config")
    own, overrides = split_overrides(argv)
    args = p.parse_args(own)
    if len(set(args.T)) < 2:
        p.error("--T needs at least two different lengths")
    lengths = sorted(set(args.T))
    from model import build_model
    cfgs = []
    for path in args.configs:    # every config checked (and its model built) before any is measured
        try:
            cfgs.append(load_config(path, ["--model.n_layer=1", "--model.vocab_size=256", *overrides]))
        except ValueError as e:  # ConfigError: names the file or the key
            return report_error(e)
        try:   # the forwards run on CPU: without the interpreter, a traceback at the first fused launch
            why = triton_blocker(cfgs[-1].model, "cpu")
            if why:
                raise ValueError(why)
            build_model(cfgs[-1].model)
        except ValueError as e:  # a model this config cannot build or run here
            return report_error(f"{path}: {e}")
    for path, cfg in zip(args.configs, cfgs):
        runs = {T: saved_bytes(cfg, T) for T in lengths}
        totals = {T: sum(r.values()) / 2**20 for T, r in runs.items()}
        a, b = lengths[:2]
        per_token = (totals[b] - totals[a]) / (b - a)
        print(f"{os.path.basename(path)}: one block keeps " + ", ".join(
            f"{totals[T]:,.1f} MiB at T={T}" for T in lengths) + f"; {per_token:.3f} MiB per token")
        grown = {w: (runs[b][w] - runs[a][w]) / 2**20 / (b - a) for w in runs[b]}
        for where, mib in sorted(grown.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"    {mib:8.3f} MiB per token  {where}")
    print(result_footer("saved_memory.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
