"""What every command-line entry point shares for bad input: one-line errors naming what is
wrong, flag types that name the flag, output paths checked before a long run and written so a
failure leaves nothing half-written.

    parser = OneLineArgumentParser(prog="python -m eval.niah")
    parser.add_argument("--max-len", type=positive_int)  # error: argument --max-len: must be >= 1, got 0
    check_output_file(args.out)                          # before the run: ValueError "--out x is a folder; ..."
    write_atomic(args.out, json.dumps(results))          # after it
"""
import argparse
import itertools
import json
import math
import os
import shutil
import socket
import sys
from urllib.parse import urlparse


def one_line(message) -> str:
    """A message as one line: its non-blank lines, stripped, joined by spaces."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def reader_gone() -> int:
    """After a BrokenPipeError on stdout (the reader stopped early: `| head`): point stdout at
    devnull, since the interpreter's own flush at exit would raise again (the Python docs'
    recipe, "Note on SIGPIPE") -> the exit status, 1 as there. A CLI then ends quietly."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


def shown_path(path) -> str:
    """A path as an error message shows it: quoted where it would be invisible or misread (an
    empty path, or one with leading or trailing spaces)."""
    return path if path and path == path.strip() else repr(path)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line "error: argument --x: ..." on stderr and exit status 2,
    without the usage block (--help prints it as usual), and which takes no abbreviated flags
    (argparse's default read `eval.reproduce --ru` as --run and started the plan). The
    subcommand parsers of add_subparsers are of this class too."""

    def __init__(self, *args, allow_abbrev=False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        print(f"error: {one_line(message)}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# flag types: argparse puts the flag before their message ("argument --max-len: must be >= 1, got 0")

def int_at_least(low: int, below: int | None = None):
    """An integer >= low (and < below when given)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be < {below}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
# every --seed: train.seed's range, which is numpy's (np.random.seed); torch's is wider. A
# seed outside it failed late, naming no flag ("Overflow when unpacking long long")
SEED_RANGE = 2**32
seed_int = int_at_least(0, below=SEED_RANGE)


def float_in(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """A finite number >= low (> low if low_open) and, if high is given, <= high (< high if
    high_open). nan and inf are refused."""
    if high is None:
        bounds = f"be {'>' if low_open else '>='} {low:g}"
    else:
        bounds = f"lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        above_low = value > low if low_open else value >= low
        below_high = high is None or (value < high if high_open else value <= high)
        if not (above_low and below_high):
            raise argparse.ArgumentTypeError(f"must {bounds}, got {text}")
        return value
    return parse


positive_float = float_in(0, low_open=True)
non_negative_float = float_in(0)
open_fraction = float_in(0, 1, low_open=True, high_open=True)


def fraction_list(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]: a comma list of at least one number in [0, 1]."""
    values = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"expected numbers in [0, 1], got {item!r}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers in [0, 1], got {text!r}")
    return values


def resolve_device(name: str) -> str:
    """--device auto|cpu|cuda[:N] -> the device to run on (auto: CUDA when it is there); a
    ValueError naming the flag otherwise, e.g. cuda on a machine without it."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"argument --device: must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"argument --device: {name} is not available on this machine (use --device cpu or auto)")
    return name


# -----------------------------------------------------------------------------
# input files

def read_text(path: str, hint: str = "") -> str:
    """A UTF-8 text file, read as open() in text mode reads it (universal newlines); a file
    that is not UTF-8 is a ValueError naming it and its first bad byte (the decoder's own
    message names neither the file nor where), followed by "; <hint>" when given."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})"
                         + (f"; {hint}" if hint else "")) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


# -----------------------------------------------------------------------------
# output paths: checked before the long run, so that a bad one is an error up front, not after
# hours; missing folders on the way are made when the output is written

def _creation_problem(folder: str) -> str | None:
    """Why `folder` cannot be written in, or made by os.makedirs (None when it can)."""
    probe = os.path.abspath(folder)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"cannot be created: {probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        if probe == os.path.abspath(folder):            # it exists: written in, not created
            return f"cannot be written in: no write permission in {probe}"
        return f"cannot be created: no write permission in {probe}"
    return None


# A checkpoint folder holds TRAINER_STATE (or DCP's index beside its shards); a checkpoints/
# root holds LATEST, naming one of its step_* folders. checkpoint.py writes them under these names.
TRAINER_STATE, DCP_INDEX, LATEST = "trainer_state.pt", ".metadata", "latest"


def enclosing_checkpoint(path: str) -> str | None:
    """The checkpoint folder or checkpoints/ root that `path` is, or lies inside, or None:
    anything written there replaces or mixes with what the checkpoint names."""
    probe = os.path.abspath(path)
    while True:
        if inside_checkpoint(probe):
            return probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent


def inside_checkpoint(folder: str) -> bool:
    """Whether `folder` itself is a checkpoint folder or a checkpoints/ root."""
    def has(name):                  # a file (or link) of that name: a folder so named is no checkpoint's
        path = os.path.join(folder, name)
        return os.path.isfile(path) or os.path.islink(path)
    try:
        names = os.listdir(folder) if os.path.isdir(folder) else []
    except OSError:                 # a parent we may pass through but not list (mode 711)
        names = []
    return (has(TRAINER_STATE) or (has(DCP_INDEX) and any(n.endswith(".distcp") for n in names))
            or (has(LATEST) and any(n.startswith("step_") and n[5:].isdigit() for n in names)))


def output_file_problem(path: str) -> str | None:
    """Why a file cannot be written at `path` (None when it can), to follow the path in a
    message: it is empty, a folder, a read-only file, inside a checkpoint (a results file
    replaces what it names there: `latest`, trainer_state.pt), or its folder cannot be made
    or written in."""
    if not path:
        return "is empty; give a file name"
    if os.path.isdir(path):
        return "is a folder; give a file name"
    if enclosing_checkpoint(os.path.dirname(os.path.abspath(path))):
        return "is inside a checkpoint folder; write it elsewhere"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "exists and is not writable"
    return _creation_problem(os.path.dirname(os.path.abspath(path)))


def output_dir_problem(path: str) -> str | None:
    """Why `path` cannot be an output folder (None when it can): it is empty or a file, or it
    cannot be made or written in."""
    if not path:
        return "is empty; give a folder"
    if os.path.lexists(path) and not os.path.isdir(path):
        return "is a file, not a folder; give a folder"
    return _creation_problem(path)


def check_output_file(path: str, flag: str = "--out") -> str:
    """-> path, or ValueError "<flag> <path> <output_file_problem>"."""
    problem = output_file_problem(path)
    if problem:
        raise ValueError(f"{flag} {path or repr(path)} {problem}")
    return path


def check_output_dir(path: str, flag: str = "--out") -> str:
    """-> path, or ValueError "<flag> <path> <output_dir_problem>"."""
    problem = output_dir_problem(path)
    if problem:
        raise ValueError(f"{flag} {path or repr(path)} {problem}")
    return path


def first_free_path(candidates) -> str:
    """The first of `candidates` (an iterable of paths) where nothing exists yet."""
    return next(path for path in candidates if not os.path.lexists(path))


def keep_aside(path, copy=False) -> str | None:
    """Keep a non-empty file that an output would overwrite as <stem>.previous[-N]<ext>
    (train.py's results on a fresh start, an export) -> the kept path, None when there was
    nothing to keep. copy=True leaves `path` its file too (a hard link, else a copy) until the
    caller's atomic rename replaces it."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    new = aside_name(path, "previous")
    if not copy:
        os.replace(path, new)
    else:
        try:
            os.link(path, new)
        except OSError:             # a filesystem without hard links
            shutil.copy2(path, new)
    return new


def aside_name(path, tag) -> str:
    """The first free <stem>.<tag>[-N]<ext> beside `path` (metrics.previous.jsonl, then
    metrics.previous-2.jsonl, ...): where an output is kept instead of overwritten."""
    stem, ext = os.path.splitext(path)
    return first_free_path(f"{stem}.{tag}{f'-{n}' if n > 1 else ''}{ext}" for n in itertools.count(1))


def check_unique(flag: str, items: list, keys: list | None = None) -> list:
    """-> items, or ValueError "<flag> names X twice" (a task or length listed twice ran twice;
    keys: what makes two items the same, e.g. '300' and '0300' are one length)."""
    seen = {}
    for item, key in zip(items, items if keys is None else keys):
        if key in seen:
            raise ValueError(f"{flag} names {seen[key]!r} twice" + (f" (as {item!r})" if item != seen[key] else ""))
        seen[key] = item
    return items


def write_json(path: str, data, indent=2) -> str:
    """A results file, written atomically (write_atomic) -> path."""
    return write_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_atomic(path: str, content) -> str:
    """Write `content` (a str, or a function that writes the file at the path it is given) to
    `path` through a temporary file beside it, synced and renamed over `path`: a failure leaves
    the earlier file (or none) and no temporary file behind. Missing folders are made -> path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "w") as f:
                f.write(content)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def hub_unreachable(streaming: bool = False, timeout: float = 3.0) -> str | None:
    """Why a Hugging Face Hub load cannot reach the Hub now, or None (also in the libraries'
    offline mode, HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE: they then read
    their local cache and never ask; and behind a proxy, which a direct connection does not
    test). Checked before a Hub load, which offline retries for ~30 s and prints ten lines
    before its own error. A streamed load reads no cache: it needs the network."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return None
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        fix = ("a streamed load needs the network" if streaming else
               "with the data in the local Hugging Face cache, set HF_HUB_OFFLINE=1")
        return f"{host} cannot be reached ({e.strerror or type(e).__name__}); {fix}"


def check_hub(streaming: bool = False):
    """hub_unreachable's reason as a ConnectionError, for the eval loaders' one-line Hub errors."""
    unreachable = hub_unreachable(streaming)
    if unreachable:
        raise ConnectionError(unreachable)
