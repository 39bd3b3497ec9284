"""Generate text from a checkpoint.

    python sample.py --checkpoint out/quickstart --prompt "And God said" --tokens 100

The prompt is encoded once; generation then feeds one token at a time with the carried
state (KV cache / fast weights), as in DESIGN §3.6.
"""
import argparse
import sys

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir or a training out_dir")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=100, help="new tokens per sample")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    if args.tokens < 0 or args.samples < 1:
        p.error("--tokens must be >= 0 and --samples >= 1")

    from checkpoint import load_model
    from data.tokenizer import get_tokenizer
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        model, cfg = load_model(args.checkpoint, device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    ids = tokenizer.encode(args.prompt) or [tokenizer.eot_id]
    idx = torch.tensor([ids] * args.samples, device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(idx, args.tokens, temperature=args.temperature, top_k=args.top_k, generator=g)
    for i, row in enumerate(out.tolist()):
        print(f"--- sample {i}\n{tokenizer.decode(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
