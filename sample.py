"""Generate text from a checkpoint.

    python sample.py --checkpoint out/quickstart --prompt "And God said" --tokens 100

The prompt is encoded once; generation then feeds one token at a time with the carried
state (KV cache / fast weights): one token costs one step, whatever the length so far.

Bad input (a flag's value, --device cuda without CUDA, a missing or damaged checkpoint) is one
line "error: ..." on stderr and exit status 2, before anything is generated.
"""
import argparse
import sys

import torch

from cli import OneLineArgumentParser, non_negative_float, non_negative_int, positive_int, resolve_device, seed_int


def _prompt(text):
    """Text a tokenizer can encode: argv bytes that are not UTF-8 reach Python as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"is not UTF-8 text, got {text!r}") from None
    return text


MIN_TEMPERATURE = 1e-6


def _temperature(text):
    """0 (greedy) or >= MIN_TEMPERATURE: fp32 logits divided by a much smaller one overflow to
    inf, and sampling from them fails."""
    value = non_negative_float(text)
    if 0 < value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, got {text}")
    return value


def main(argv=None):
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, a training out_dir or an exported .safetensors")
    p.add_argument("--prompt", type=_prompt, default="\n")
    p.add_argument("--tokens", type=non_negative_int, default=100, help="new tokens per sample")
    p.add_argument("--samples", type=positive_int, default=1)
    p.add_argument("--temperature", type=_temperature, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=non_negative_int, default=50,
                   help="sample among the k most likely tokens (0 = all of them)")
    p.add_argument("--seed", type=seed_int, default=1337)
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
    out = model.generate(idx, args.tokens, temperature=args.temperature, top_k=args.top_k or None, generator=g,
                         vocab_size=tokenizer.vocab_size)
    for i, row in enumerate(out.tolist()):
        print(f"--- sample {i}\n{tokenizer.decode(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
