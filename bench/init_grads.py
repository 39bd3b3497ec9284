"""The outer (model-parameter) gradient norm at initialisation, and the parameters it comes from.

    python bench/init_grads.py configs/transformer_340m.yaml configs/titans_mac_340m.yaml --seq-lens 128,1024
    python bench/init_grads.py configs/titans_lmm_tiny.yaml --seq-lens 1024 --model.titans.step_budget=0.5

For each config and each length T: the config's model, built after torch.manual_seed(--seed),
takes one sequence of T + 1 uniformly random tokens (its own generator, seed 1: the same
tokens for every config) with a GPT-2 vocabulary unless --vocab says otherwise; the loss's
backward gives the total gradient norm over the parameters and the three largest parameters'
norms. What docs/FIDELITY.md reports for the paper-size widths at init. --section.key=value
overrides follow the configs, as in train.py. CPU, eager; prints a table plus the command,
machine and date, ready for BENCHMARKS.md.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import report_error, result_footer, split_overrides  # noqa: E402
from cli import OneLineArgumentParser, non_negative_int, positive_int, seed_int  # noqa: E402
from config import load_config  # noqa: E402
from kernels.checks import triton_blocker  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def positive_int_list(text: str) -> list[int]:
    """'128,1024' -> [128, 1024]: a comma list of at least one integer >= 1."""
    try:
        values = [positive_int(t) for t in text.split(",") if t.strip()]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers >= 1, got {text!r}")
    return values


def init_grads(cfg, T, seed=0, dtype=torch.float32):
    """(loss, total gradient norm, {parameter name: gradient norm}) of cfg's model as built
    after torch.manual_seed(seed), on one sequence of T + 1 random tokens (generator seed 1)."""
    from model import build_model
    torch.manual_seed(seed)
    model = build_model(cfg.model).to(dtype)
    x = torch.randint(0, cfg.model.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(1))
    _, loss, _ = model(x[:, :-1], x[:, 1:])
    loss.backward()
    norms = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), sum(v * v for v in norms.values()) ** 0.5, norms


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="%(prog)s [options] config [config ...] [--section.key=value ...]")
    p.add_argument("configs", nargs="+", help="train.py configs")
    p.add_argument("--seq-lens", type=positive_int_list, default=[128, 1024],
                   help="comma list of sequence lengths (default 128,1024)")
    p.add_argument("--seed", type=seed_int, default=0, help="torch seed the model is built with")
    p.add_argument("--vocab", type=non_negative_int, default=50257,
                   help="model.vocab_size (default 50257 = GPT-2; 0 = the config's tokenizer's)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    own, overrides = split_overrides(argv)
    args = p.parse_args(own)
    if args.threads:
        torch.set_num_threads(args.threads)
    from data.tokenizer import TOKENIZER_CLASSES
    from model import build_model
    cfgs = []
    for path in args.configs:    # every config checked, and its model built, before any is measured
        try:
            cfg = load_config(path, overrides)
        except ValueError as e:  # ConfigError: a missing file or a bad key, named
            return report_error(e)
        cfg.model.vocab_size = args.vocab or TOKENIZER_CLASSES[cfg.data.tokenizer].vocab_size
        try:   # the forwards run on CPU: without the interpreter, a traceback at the first fused launch
            why = triton_blocker(cfg.model, "cpu")
            if why:
                raise ValueError(why)
            with torch.device("meta"):    # construction's checks without its memory or time
                build_model(cfg.model)
        except ValueError as e:  # a model this config cannot build or run here
            return report_error(f"{path}: {e}")
        cfgs.append(cfg)

    print(f"{'config':<24} {'T':>6} {'loss':>7} {'grad norm':>9}  largest parameters (grad norm)")
    for path, cfg in zip(args.configs, cfgs):
        for T in args.seq_lens:
            loss, total, norms = init_grads(cfg, T, args.seed, DTYPES[args.dtype])
            top = sorted(norms.items(), key=lambda kv: -kv[1])[:3]
            print(f"{os.path.basename(path):<24} {T:>6} {loss:>7.3f} {total:>9.3g}  "
                  + ", ".join(f"{name} {norm:.3g}" for name, norm in top), flush=True)
    print(result_footer("init_grads.py", argv))
    vocab = args.vocab or "each config's tokenizer's"
    print(f"settings: seed {args.seed}, vocabulary {vocab}, {args.dtype} eager, "
          "one sequence of uniformly random tokens (generator seed 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
