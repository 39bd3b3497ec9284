"""
What every eval module needs about the model it scores (DESIGN §7): its kind (recurrent
state or attention context), its device, eval mode for the duration of a score, how a
prompt longer than an attention model's context is read (eval.babilong, eval.niah), how a
model reads any length in segments with its state carried and scores or generates from
there (those two, eval.continual, eval.lm_eval_adapter), and, for the CLIs, a checkpoint
loaded with the tokenizer it was trained with, and their answer to bad input: one line
"error: ...", exit status 2, no traceback, nothing lost (cli.py's parser, flag types and
output-path checks, check_checkpoint_out here for a folder that receives checkpoints,
exit_on_error for the rest). torch is imported inside the functions that use it, so a CLI
that only plans (eval.reproduce) starts without it.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

from cli import check_output_dir, one_line, reader_gone, resolve_device, shown_path

if TYPE_CHECKING:
    import torch

RECURRENT_ARCHS = ("titans", "hope")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The longest context a length flag may ask for: ten times the papers' longest (BABILong's 10M);
# past it, building one sample alone would exhaust memory before anything is said.
MAX_CONTEXT_TOKENS = 100_000_000

# where default_data_dir looks for the offline eval data, for --help texts and errors
DATA_DIR_LOOKUP = "$NL_DATA_DIR, $NL_SHARED_DATA or ../shared/data"
DATA_DIR_HELP = f"a copy of shared/data (default {DATA_DIR_LOOKUP})"


def default_data_dir() -> str | None:
    """A copy of shared/data (the offline eval data): $NL_DATA_DIR, else $NL_SHARED_DATA, else
    ../shared/data beside the repo if it is a folder, else None. The first variable that is
    set (non-empty) must name a folder: a ValueError naming it otherwise, since skipping a
    mistyped path would score another copy of the data (or skip the evals) without a word.
    A ValueError, not FileNotFoundError: eval.run records the latter as a skipped section."""
    for variable in ("NL_DATA_DIR", "NL_SHARED_DATA"):
        path = os.environ.get(variable)
        if path:
            if not os.path.isdir(path):
                raise ValueError(f"${variable}={path} is not a folder: set it to a copy of shared/data, or unset it")
            return path
    beside_repo = _beside_repo_data()
    return beside_repo if os.path.isdir(beside_repo) else None


def _beside_repo_data() -> str:
    """../shared/data beside the checkout, the last place default_data_dir looks."""
    return os.path.join(os.path.dirname(REPO), "shared", "data")


def require_data_dir(data_dir: str | None, what: str, sub: str | None = None) -> str:
    """The offline data folder `what` reads (--data-dir, else default_data_dir()), or its
    sub-folder `sub`; one FileNotFoundError naming what is missing otherwise (and
    default_data_dir's ValueError for a $NL_DATA_DIR / $NL_SHARED_DATA that is not a folder)."""
    root = data_dir or default_data_dir()
    if not root or not os.path.isdir(root):
        # where it looked, so a user sees that ../shared/data is not where they keep it
        tried = (f"--data-dir {data_dir} is not a folder" if data_dir else
                 f"--data-dir not given, $NL_DATA_DIR and $NL_SHARED_DATA unset, and {_beside_repo_data()} "
                 "is not a folder")
        raise FileNotFoundError(f"no offline data folder for {what} ({tried}): pass --data-dir or set "
                                "$NL_DATA_DIR to a copy of shared/data")
    if sub is None:
        return root
    path = os.path.join(root, sub)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} not found (a copy of shared/data has {sub}/)")
    return path


def check_data_dir(data_dir: str | None) -> str | None:
    """A --data-dir given on the command line must be a folder: checked up front, since a
    section or task that needs no data file would otherwise accept any value."""
    if data_dir is not None and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data-dir {data_dir} is not a folder")
    return data_dir


def exp_or_inf(x: float) -> float:
    """exp(x), inf past the float range: a diverged model (a mean NLL over ~709 nats) gets
    perplexity inf, not an OverflowError after its whole eval (json writes it as Infinity)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def is_recurrent(model) -> bool:
    """Constant-size state (fast weights, windowed caches): any length streams in flat memory."""
    config = getattr(model, "config", None)
    return getattr(config, "arch", None) in RECURRENT_ARCHS


def long_stream_note(model, n_tokens: int) -> str | None:
    """A note for results that streamed `model` over inputs of up to n_tokens, where its
    memory settings amplify rounding past config.LONG_CONTEXT tokens
    (ModelConfig.long_context_risk; docs/BABILONG.md, "Long inputs"), or None."""
    from config import LONG_CONTEXT, ModelConfig
    config = getattr(model, "config", None)
    risk = config.long_context_risk() if isinstance(config, ModelConfig) else None
    if risk is None or n_tokens < LONG_CONTEXT:
        return None
    return (f"inputs of up to {n_tokens} tokens with {risk}; there a streamed model amplifies rounding, so "
            f"per-token results past ~{LONG_CONTEXT} tokens can change with the dtype, --segment-len or model.kernels")


def longest_input_note(model, scored: list[dict]) -> str | None:
    """long_stream_note for the longest input the model read: the most n_input_tokens (before
    any truncation) of an eval's scored records; skipped records were never read."""
    return long_stream_note(model, max((r["n_input_tokens"] for r in scored), default=0))


def notes_of(results) -> list[str]:
    """The distinct long_stream_note lines of several evaluate() results, in order."""
    return list(dict.fromkeys(r["note"] for r in results if r.get("note")))


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


# -----------------------------------------------------------------------------
# long inputs: recurrent models stream every token, attention models read their context

def check_long_inputs(model, overflow: str, streaming: bool | None, max_len: int | None,
                      max_new_tokens: int | None = None) -> bool:
    """The long-input arguments of eval.babilong.evaluate and eval.niah.evaluate_niah, checked
    -> whether the model streams (recurrent, or streaming=True: the whole input in segments,
    state carried). Given max_new_tokens (the niah / babilong CLIs), an attention model also
    needs room in its max_len for a prompt before the answer (else every prompt would be cut
    to one token); eval.run's suites keep fit_prompt's one-token floor."""
    if overflow not in ("truncate", "skip"):
        raise ValueError(f"overflow must be 'truncate' or 'skip', got {overflow!r}")
    streaming = is_recurrent(model) if streaming is None else streaming
    if not streaming and max_len is None:
        raise ValueError("an attention model needs max_len (its context, e.g. cfg.train.seq_len); "
                         "pass streaming=True to read any length with a growing KV cache")
    if not streaming and max_new_tokens is not None and max_len <= max_new_tokens:
        raise ValueError(f"an attention model reading max_len={max_len} tokens has no room for a prompt before "
                         f"max_new_tokens={max_new_tokens} answer tokens: pass --max-new-tokens below {max_len}"
                         + (" (e.g. 32)" if max_len > 64 else "") + " or a larger --max-len")
    return streaming


def prompt_room(max_len: int, max_new_tokens: int) -> int:
    """The most prompt tokens an attention model of context max_len keeps when it is to add
    max_new_tokens: the rest of its context, at least one token."""
    return max(1, max_len - max_new_tokens)


def fit_prompt(ids: list[int], streaming: bool, max_len: int | None, max_new_tokens: int, overflow: str,
               candidates=()) -> tuple:
    """-> (the prompt ids the model reads, truncated?). A streaming model reads them all; an
    attention model reads at most max_len tokens, prompt and answer together (as lm-eval's
    generate_until and eval.lm_eval_adapter do), so a prompt over prompt_room tokens is cut to
    its last prompt_room (overflow='truncate') or not read at all (None; overflow='skip').
    `candidates` (token id lists) are the answers ranked by continuation_logprobs after the
    prompt: the answer's room is the longest of them where that is over max_new_tokens, or a
    UUID of 37 byte tokens after --max-new-tokens 4 would be read past max_len."""
    if streaming:
        return ids, False
    room = prompt_room(max_len, max([max_new_tokens, *map(len, candidates)]))
    if len(ids) <= room:
        return ids, False
    if overflow == "skip":
        return None, False
    return ids[-room:], True


def context_handling(streaming: bool, max_len: int | None, segment_len: int, overflow: str,
                     max_new_tokens: int) -> str:
    """What fit_prompt does to long inputs, in words, for an eval's result file."""
    if streaming:
        return f"streamed: whole input in segments of {segment_len} tokens with the state carried"
    room = prompt_room(max_len, max_new_tokens)
    over = (f"attention: inputs over {room} tokens (max_len {max_len}, less room for {max_new_tokens} answer tokens, "
            "or for a longer ranked candidate)")
    return f"{over} truncated to their last {room}" if overflow == "truncate" else f"{over} skipped"


def bf16_autocast(device, dtype: str = "auto"):
    """bf16 autocast on CUDA (dtype 'auto' or 'bfloat16'); a no-op context otherwise."""
    import torch
    if torch.device(device).type == "cuda" and dtype in ("auto", "bfloat16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def mean_over_scored(scored: list[dict], key: str) -> float | None:
    """The fraction of scored records whose `key` is true (None when nothing was scored)."""
    return sum(r[key] for r in scored) / len(scored) if scored else None


def format_accuracy(accuracy: float | None) -> str:
    """A mean_over_scored accuracy for a CLI's progress line: percent, 5 wide ('  n/a': none scored)."""
    return "  n/a" if accuracy is None else f"{100 * accuracy:5.1f}"


# -----------------------------------------------------------------------------
# running a model on long inputs: `logits, loss, state = model(idx, state=state)` is exact when
# a sequence is fed in segments with the state carried (DESIGN §3.6)

def expand_state(state, n: int):
    """A batch-1 state seen as n sequences: every tensor of at least one dim expanded along its
    batch dim, as views (no copy). That is safe because a forward never writes into the state
    it is passed; it returns new tensors (tests/test_model.py checks it for every architecture,
    and sample.py relies on it too)."""
    import torch
    if torch.is_tensor(state):
        return state.expand(n, *state.shape[1:]) if state.dim() else state
    if isinstance(state, dict):
        return {k: expand_state(v, n) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(expand_state(v, n) for v in state)
    return state


def state_bytes(state) -> int:
    """The bytes held by a state's tensors (nested dicts, lists and tuples)."""
    from model import state_tensors
    return sum(t.numel() * t.element_size() for t in state_tensors(state))


def prefill(model, ids: list[int], segment_len: int, device, state=None) -> tuple:
    """Feed `ids` in segments with the state carried -> (logits after the last token [V], state).
    Only one segment's activations and logits live at a time."""
    import torch
    if not ids:
        raise ValueError("cannot run a model on an empty input")
    last = None
    for start in range(0, len(ids), segment_len):
        segment = torch.tensor([ids[start:start + segment_len]], dtype=torch.long, device=device)
        logits, _, state = model(segment, state=state)
        last = logits[0, -1].float()
        del logits
    return last, state


# A group of continuations is scored on the prefix's state expanded to the group; the forward
# makes each row its own new state (fast weights, a KV cache with the new tokens appended), so a
# group holds at most this many bytes' worth of states: all of HOPE-760M's candidates at once
# would be 150 x ~0.9 GiB (a CLINC label set), a Transformer's long BABILong cache tens of GiB
# each (a group of one then, as before).
SCORING_STATE_BUDGET = 4 * 2**30


def continuation_logprobs(model, last_logits, state, continuations: list[list[int]], device,
                          batch_size: int = 16, state_budget: int = SCORING_STATE_BUDGET) -> list[float]:
    """log p(c | prefix) for each continuation c (token id lists), from the prefix's last logits
    [V] and its batch-1 state, which is left as it was. A continuation's first token is scored
    from last_logits, the rest from a forward over its tokens but the last. Those forwards run
    batch_size continuations at a time (fewer when their states would pass state_budget bytes),
    right-padded to the group's longest (the models are causal: padding after a row's tokens
    changes none of its scored logits), on the state expanded to the group (expand_state): one
    forward per group, not one per candidate with a copy of the state each, and one host sync."""
    import torch
    if not all(continuations):
        raise ValueError("continuation_logprobs needs continuations of at least one token each")
    if not continuations:           # eval.babilong: a question can name every label, ranking none
        return []
    first = torch.log_softmax(last_logits.float(), -1)
    scores = [first[c[0]] for c in continuations]
    # by length, so that a group pads little
    longer = sorted((i for i, c in enumerate(continuations) if len(c) > 1), key=lambda i: len(continuations[i]))
    group = max(1, min(batch_size, state_budget // max(1, state_bytes(state))))
    for start in range(0, len(longer), group):
        rows = longer[start:start + group]
        width = max(len(continuations[i]) for i in rows) - 1
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, i in enumerate(rows):
            c = continuations[i]
            inputs[r, :len(c) - 1] = torch.tensor(c[:-1])
            targets[r, :len(c) - 1] = torch.tensor(c[1:])
            mask[r, :len(c) - 1] = True
        logits, _, _ = model(inputs.to(device), state=expand_state(state, len(rows)))
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, targets.to(device)[..., None])[..., 0]
        # a select, not a product with the mask: a non-finite log-prob past a row's end (a diverged
        # model reading the padding) times 0 would be NaN in that row's score
        row_sums = torch.where(mask.to(device), logprobs, 0.0).sum(-1)
        del logits, logprobs
        for r, i in enumerate(rows):
            scores[i] = scores[i] + row_sums[r]
    return torch.stack(scores).tolist()


def greedy_generate(model, tokenizer, last_logits, state, max_new_tokens: int, device, stop=None) -> str:
    """Greedy decoding from a prefilled state, up to max_new_tokens or end-of-text. `stop(text)`
    ends it early once further tokens cannot change the score (eval.babilong: a '.' is out;
    eval.niah: the needle's value is out)."""
    import torch
    out: list[int] = []
    logits = last_logits
    for _ in range(max_new_tokens):
        token = int(logits[:tokenizer.vocab_size].argmax())   # a padded embedding's extra ids decode to nothing
        if token == tokenizer.eot_id:
            break
        out.append(token)
        if stop is not None and stop(tokenizer.decode(out)):
            break
        step_logits, _, state = model(torch.tensor([[token]], dtype=torch.long, device=device), state=state)
        logits = step_logits[0, -1].float()
    return tokenizer.decode(out)


# -----------------------------------------------------------------------------
# running a score, and the CLIs

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


def clipped_step(model, optimizer, loss: float, max_norm: float) -> tuple:
    """The fine-tuning step of the evals: clip the gradient norm to max_norm (<= 0: no clip)
    and step, unless the loss or the gradient norm is not finite. Such a step is not applied,
    as train.py skips it: a long input can overflow a recurrent model's backward, and
    clipping by a NaN norm would make every weight NaN. -> (gradient norm, whether applied)."""
    import torch
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return grad_norm, False
    optimizer.step()
    return grad_norm, True


def load_checkpoint(path: str, device: str = "auto") -> tuple:
    """An eval CLI's model: (model, cfg, tokenizer, device) for a checkpoint dir, a training
    out_dir or an exported .safetensors (checkpoint.load_model), loaded on
    resolve_device(device), with the tokenizer named in its config. A config that trained
    with distributed.activation_checkpointing gets it here too: the evals that train (the
    BABILong fine-tune, the continual arms) backpropagate through sequences at least as long
    as training's; forwards without gradients run as before."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {shown_path(path)} not found")
    from checkpoint import load_model
    from data.tokenizer import get_tokenizer
    device = resolve_device(device)
    model, cfg = load_model(path, device)
    if cfg.distributed.activation_checkpointing:
        from distributed import apply_activation_checkpointing
        apply_activation_checkpointing(model)
    return model, cfg, get_tokenizer(cfg.data.tokenizer), device


def load_for_generation(args) -> tuple:
    """The start of the generation eval CLIs (eval.niah, eval.babilong eval), in the order
    that loses nothing: --out checked before the checkpoint loads, then the context:
    (model, cfg, tokenizer, device, max_len), max_len None for a recurrent model (it
    streams), else --max-len or the training seq_len, with room for a prompt before
    --max-new-tokens (check_long_inputs). Their parsers have checked the numbers."""
    check_output_dir(args.out)
    model, cfg, tokenizer, device = load_checkpoint(args.checkpoint, args.device)
    max_len = context_limit(model, args.max_len if args.max_len is not None else cfg.train.seq_len)
    check_long_inputs(model, args.overflow, None, max_len, args.max_new_tokens)
    return model, cfg, tokenizer, device, max_len


def first_line(error: Exception) -> str:
    """The first line of an exception's message, or its type's name when it has none: the
    reason given in the one-line errors about a failed Hugging Face Hub load."""
    message = str(error)
    return message.splitlines()[0] if message else type(error).__name__


# what an eval CLI reports in one line: bad files, values and folders, a missing optional
# package, and a size that does not fit in memory
BAD_INPUT = (OSError, ValueError, ImportError, MemoryError)


@contextmanager
def exit_on_error(*errors):
    """An eval CLI's answer to bad input: any of `errors` (default BAD_INPUT) raised inside
    prints one line "error: ..." on stderr and exits with status 2 (no traceback). A reader
    that stops early (`| head`) ends it quietly, with status 1 as sample.py."""
    errors = errors or BAD_INPUT
    try:
        yield
    except BrokenPipeError:         # nothing to say to a reader that has gone
        sys.exit(reader_gone())
    except errors as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def resolve_checkpoint_arg(checkpoint: str) -> str:
    """The checkpoint a --checkpoint names now: its step folder (an out_dir names its latest)
    or the exported file; the path as given where it names none, so that loading it fails
    with the error that names what was typed."""
    from checkpoint import resolve_checkpoint
    if os.path.isfile(checkpoint):
        return checkpoint
    try:
        return resolve_checkpoint(checkpoint)
    except (OSError, ValueError):
        return checkpoint


def checkpoint_identity(resolved: str) -> dict:
    """What results.json records of the checkpoint `resolved` (resolve_checkpoint_arg) besides
    its path: checkpoint_step, and for an exported file checkpoint_config_sha256 (of the
    config in its metadata) and checkpoint_dtype (its weights' precision, in exports since it
    was recorded). Exporting another step, or another run's, to the same path keeps
    the name but not the weights, so for a file these, not the path, say whose results an
    --out holds. {} where they cannot be read: loading the checkpoint then fails with the
    error that says why."""
    from checkpoint import export_metadata, step_number
    if not os.path.isfile(resolved):            # a step folder: its name is its step
        step = step_number(os.path.basename(os.path.normpath(resolved)))
        return {"checkpoint_step": step} if step >= 0 else {}
    try:
        metadata = export_metadata(resolved)
    except ValueError:
        return {}
    if not (str(metadata.get("step", "")).isdigit() and isinstance(metadata.get("config"), str)):
        return {}
    identity = {"checkpoint_step": int(metadata["step"]),
                "checkpoint_config_sha256": hashlib.sha256(metadata["config"].encode()).hexdigest()[:16]}
    if "dtype" in metadata:                     # fp32 and bf16 exports of one step score differently
        identity["checkpoint_dtype"] = metadata["dtype"]
    return identity


def check_checkpoint_out(out: str, checkpoint: str | None = None, flag: str = "--out") -> str:
    """The output folder of a command that saves checkpoints (eval.babilong finetune): a
    usable folder (check_output_dir) that holds no checkpoints and is not the --checkpoint
    folder, since saving there would replace or prune the checkpoints it holds -> out."""
    from checkpoint import holds_checkpoints
    check_output_dir(out, flag)
    same = (checkpoint is not None and os.path.exists(out) and os.path.exists(checkpoint)
            and os.path.samefile(out, checkpoint))
    if same or (os.path.isdir(out) and holds_checkpoints(out)):
        raise ValueError(f"{flag} {out} already holds checkpoints; choose another folder")
    return out
