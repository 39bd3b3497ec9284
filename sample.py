"""Generate text from a checkpoint.

    python sample.py --checkpoint out/quickstart --prompt "And God said" --tokens 100

The prompt is encoded and read once: its state serves every sample (a forward returns a new
state and leaves the one it was passed as it was). Generation then feeds one token at a time
with the carried state. A recurrent model's state (Titans, HOPE: fast weights, windowed caches) has a fixed
size, so each token costs the same; an attention model's KV cache grows by one entry per
token, so each token costs more than the one before. A note on stderr says when prompt +
--tokens goes past what the model trained on (an attention model's train.seq_len) or where
its memory settings were measured to diverge (the evals' notes, eval/common.py).

Samples are drawn one after another, each printed as it completes: sample i is the same
whatever --samples is, and sample 0 is the one train.py prints at the end of training (its
sample_prompt and seed, temperature 0.8, top-k 50, on CPU).

Bad input (a flag's value, --device cuda without CUDA, a missing or damaged checkpoint, a
sample too long) is one line "error: ..." on stderr and exit status 2, before anything is
generated; so is running out of memory, or a model whose logits stop being finite, while
sampling, the samples printed so far kept. Ctrl-C is one line and exit status 130, the
samples printed so far kept; a reader that stops early (`| head`) ends it quietly.
"""
import argparse
import sys

import torch

from cli import (OneLineArgumentParser, non_negative_float, non_negative_int, one_line, positive_int, reader_gone,
                 resolve_device, seed_int)


def _prompt(text):
    """Text a tokenizer can encode: argv bytes that are not UTF-8 reach Python as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"is not UTF-8 text, got {text!r}") from None
    return text


def _temperature(text):
    """0 (greedy) or >= model.MIN_TEMPERATURE: fp32 logits divided by a much smaller one
    overflow to inf, and sampling from them fails."""
    from model import MIN_TEMPERATURE
    value = non_negative_float(text)
    if 0 < value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, got {text}")
    return value


def main(argv=None):
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, a training out_dir or an exported .safetensors")
    p.add_argument("--prompt", type=_prompt, default="\n",
                   help="default: a newline; '' starts a new document (after the end-of-text token, "
                        "which is not printed)")
    p.add_argument("--tokens", type=non_negative_int, default=100, help="new tokens per sample")
    p.add_argument("--samples", type=positive_int, default=1,
                   help="drawn one after another; sample i is the same whatever the number drawn")
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

    done = 0
    # One generator for all samples, drawn one after another: each token's draw takes the same
    # random numbers whatever the probabilities, so sample i is the same whatever --samples is
    # (a batch would draw each token of every sample in one call), and sample 0 is train.py's.
    g = torch.Generator(device=device).manual_seed(args.seed)
    try:
        try:
            model, tokenizer, ids, start = _load(args, device)
        except (FileNotFoundError, ValueError) as e:       # ConfigError is a ValueError
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        except (MemoryError, torch.OutOfMemoryError):
            print(f"error: out of memory loading {args.checkpoint} on {device}", file=sys.stderr)
            return 2
        try:
            with torch.no_grad():
                logits, _, state = model(torch.tensor([ids], device=device))
        except (MemoryError, torch.OutOfMemoryError):
            print(f"error: out of memory reading the prompt ({len(ids)} tokens) on {device}: shorten --prompt",
                  file=sys.stderr)
            return 2
        for i in range(args.samples):
            try:
                new = model.generate_from(logits[:, -1], state, args.tokens, temperature=args.temperature,
                                          top_k=args.top_k or None, generator=g, vocab_size=tokenizer.vocab_size)[0]
            except (MemoryError, torch.OutOfMemoryError):
                print(f"error: out of memory drawing sample {i} ({len(ids)} prompt + {args.tokens} new tokens) on "
                      f"{device}: lower --tokens", file=sys.stderr)
                return 2
            except ValueError as e:                          # the model's logits went non-finite
                print(f"error: sample {i}: {one_line(e)}", file=sys.stderr)
                return 2
            print(f"--- sample {i}\n{tokenizer.decode(ids[start:] + new.tolist())}", flush=True)
            done += 1
    except KeyboardInterrupt:       # a traceback would add nothing; what was printed stays
        print(f"interrupted after {done} of {args.samples} samples", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return reader_gone()          # the reader has gone (`| head`): nothing to say
    return 0


def _load(args, device):
    """(model, tokenizer, prompt ids, the index of the first id to print) for args, the
    sample's length checked and the notes on it printed: the one-line errors of bad input,
    before anything is generated."""
    from checkpoint import load_model
    from config import MAX_BATCH_TOKENS
    from data.tokenizer import get_tokenizer
    from eval.common import MAX_CONTEXT_TOKENS, context_limit, long_stream_note
    model, cfg = load_model(args.checkpoint, device)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    ids, start = tokenizer.encode_prompt(args.prompt)
    n = len(ids) + args.tokens
    # a sample's tokens (and an attention model's KV cache) are held at once: the evals' bound on
    # one input. Samples are drawn one at a time, so all of them together bound only the output:
    # the training batch's bound (past it, gigabytes of text)
    if n > MAX_CONTEXT_TOKENS:
        raise ValueError(f"--prompt ({len(ids)} tokens) + --tokens {args.tokens} is {n:,} tokens a sample; at most "
                         f"{MAX_CONTEXT_TOKENS:,}")
    if n * args.samples > MAX_BATCH_TOKENS:
        raise ValueError(f"--samples {args.samples} of {n:,} tokens are {n * args.samples:.3g} tokens; at most "
                         f"{MAX_BATCH_TOKENS:.3g}")
    limit = context_limit(model, cfg.train.seq_len)      # None for a recurrent model
    if limit is not None and n > limit:
        print(f"note: prompt + --tokens is {n} tokens, past the {limit} this model trained on (train.seq_len): "
              "its KV cache then holds positions it never saw in training (RoPE extrapolation), and the text "
              "may degrade there", file=sys.stderr)
    note = long_stream_note(model, n)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return model, tokenizer, ids, start


if __name__ == "__main__":
    sys.exit(main())
