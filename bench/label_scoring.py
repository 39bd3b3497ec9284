"""Label ranking from one prefilled state: the 150 CLINC intent names scored at once.

    python bench/label_scoring.py                                 # hope_tiny, CPU, batch sizes 1,16
    python bench/label_scoring.py configs/hope_760m.yaml --device cuda --batch-sizes 1,4,16

The icl / in_context_memory arms of eval.continual (and BABILong's and S-NIAH's label
ranking) read a prompt once and then score every candidate continuation from its state
(eval.common.continuation_logprobs). --batch-sizes 1 is one forward per label, as the evals
ran before grouping; larger sizes score that many labels per forward on the state expanded
to the group (fewer where the states would pass eval.common.SCORING_STATE_BUDGET). The model
is the config's, randomly initialised; the prompt is --prefix-tokens GPT-2 tokens of CLINC
queries. Prints seconds per 150-label query and the largest score difference from batch
size 1 (rounding: rows of one forward are not summed in the same order).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from bench.common import report_error, result_footer, timer  # noqa: E402
from cli import OneLineArgumentParser, positive_int, resolve_device  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/hope_tiny.yaml")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated labels per forward (default 1,16)")
    p.add_argument("--prefix-tokens", type=positive_int, default=512, help="prompt tokens read before the labels")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--data-dir", default=None, help="a copy of shared/data (for CLINC150's intent names)")
    args = p.parse_args(argv)
    try:
        sizes = [positive_int(s) for s in args.batch_sizes.split(",")]
    except argparse.ArgumentTypeError as e:
        return report_error(f"--batch-sizes {args.batch_sizes!r}: {e}")
    try:
        device = resolve_device(args.device)
        from config import check_vocab, load_config
        from data.tokenizer import get_tokenizer
        from eval.common import bf16_autocast, continuation_logprobs, prefill
        from eval.continual import clinc_tasks
        from model import build_model
        cfg = load_config(args.config, ["--data.tokenizer=gpt2"])
        check_vocab(cfg)
        tasks = clinc_tasks(args.data_dir)
    except (ValueError, OSError, argparse.ArgumentTypeError) as e:
        return report_error(e)
    tokenizer = get_tokenizer("gpt2")
    labels = sorted({label for task in tasks for label in task["labels"]})
    label_ids = [tokenizer.encode(" " + label) for label in labels]
    queries = "".join(f"Query: {text}\nIntent: {label}\n\n" for task in tasks for text, label in task["test"])
    prompt = tokenizer.encode(queries)[:args.prefix_tokens]
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    print(f"{args.config}: {model.num_params() / 1e6:.1f}M params, {len(labels)} labels of "
          f"{min(map(len, label_ids))}-{max(map(len, label_ids))} tokens, prompt {len(prompt)} tokens, {device}")
    with torch.no_grad(), bf16_autocast(device, cfg.train.dtype):
        last, state = prefill(model, prompt, cfg.train.seq_len, device)
        scores = {size: continuation_logprobs(model, last, state, label_ids, device, batch_size=size) for size in sizes}
        seconds = {size: timer(lambda: continuation_logprobs(model, last, state, label_ids, device, batch_size=size),
                               device, args.repeats) for size in sizes}
    print("| labels per forward | s per query | vs batch size " f"{sizes[0]} | max score difference |\n|---:|---:|---:|---:|")
    for size in sizes:
        diff = max(abs(a - b) for a, b in zip(scores[size], scores[sizes[0]]))
        print(f"| {size} | {seconds[size]:.3f} | {seconds[sizes[0]] / seconds[size]:.1f}x | {diff:.1e} |")
    print(result_footer("label_scoring.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
