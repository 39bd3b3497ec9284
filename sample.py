"""Generate text from a checkpoint.

    python sample.py --checkpoint out/quickstart --prompt "And God said" --tokens 100

The prompt is encoded once; generation then feeds one token at a time with the carried
state (KV cache / fast weights), as in DESIGN §3.6.

Bad input (a flag's value, --device cuda without CUDA, a missing or damaged checkpoint) is one
line "error: ..." on stderr and exit status 2, before anything is generated.
"""
import argparse
import sys

import torch

from cli import OneLineArgumentParser, non_negative_float, non_negative_int, positive_int, resolve_device


def _seed(text):
    """torch.Generator.manual_seed's range: -2**63 .. 2**64 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
    if not -2**63 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [-2**63, 2**64); got {value}")
    return value


def main(argv=None):
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir or a training out_dir")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=non_negative_int, default=100, help="new tokens per sample")
    p.add_argument("--samples", type=positive_int, default=1)
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=non_negative_int, default=50,
                   help="sample among the k most likely tokens (0 = all of them)")
    p.add_argument("--seed", type=_seed, default=1337)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))

    from checkpoint import load_model
    from data.tokenizer import get_tokenizer
    try:
        model, cfg = load_model(args.checkpoint, device)
        tokenizer = get_tokenizer(cfg.data.tokenizer)
    except (FileNotFoundError, ValueError) as e:       # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = tokenizer.encode(args.prompt) or [tokenizer.eot_id]
    idx = torch.tensor([ids] * args.samples, device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(idx, args.tokens, temperature=args.temperature, top_k=args.top_k or None, generator=g)
    for i, row in enumerate(out.tolist()):
        print(f"--- sample {i}\n{tokenizer.decode(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
