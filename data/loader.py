"""
Reading prepared data (data/prepare.py): random training windows and ordered eval windows.

    dataset = TokenDataset("data/cache/builtin-gpt2")
    sampler = BatchSampler(dataset, "train", batch_size=32, seq_len=1024, seed=0, rank=rank, world_size=world_size)
    x, y = sampler.next_batch()              # [32 // world_size, 1024] int64, y = x shifted by one
    state = sampler.state_dict()             # saved with the checkpoint; load_state_dict resumes
    for x, y in iter_eval_batches(dataset, "val", 32, 1024): ...

The global batch at step s is a pure function of (seed, s), and rank r takes rows
[r*b, (r+1)*b): one process and N processes see the same global batches, and a resumed
run (on any world size) continues the exact stream. Two samplings (data.sampling):
  random    every row a window starting anywhere, drawn uniformly with replacement (nanoGPT);
  shuffled  the split cut into non-overlapping windows, each read once per epoch in an order
            that a seeded bijection gives per epoch (one pass over the data, as a paper's
            "trained on N tokens" means; the order is computed, not stored).
"""

import os
import shlex

import numpy as np
import torch

from data.meta import check_shard, check_split_tokens, load_meta
from data.shards import read_shard


class TokenDataset:
    """A prepared folder: meta.json plus the shards of each split (read-only memmaps)."""

    def __init__(self, data_dir: str, tokenizer: str | None = None, source: str = "builtin"):
        """tokenizer: the model's data.tokenizer; data prepared with another is refused (its ids
        mean other tokens, or overflow the embedding). source: data.dataset, for the hint."""
        self.data_dir = data_dir
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isdir(data_dir) or not os.path.isfile(meta_path):
            # quoted: a files: glob or a folder with a space must reach data.prepare as typed
            raise FileNotFoundError(
                f"no prepared data in {data_dir}: run python -m data.prepare --source {shlex.quote(source)} "
                f"--tokenizer {tokenizer or 'gpt2'} --out {shlex.quote(data_dir)}"
            )
        self.meta = load_meta(data_dir)  # one-line ValueError naming meta.json and the field
        if tokenizer is not None and self.meta["tokenizer"] != tokenizer:
            raise ValueError(f"{data_dir} was prepared with tokenizer {self.meta['tokenizer']!r}, but "
                             f"data.tokenizer={tokenizer!r}: prepare it again with --tokenizer {tokenizer}")
        self.vocab_size = self.meta["vocab_size"]
        self.eot_id = self.meta["eot_id"]
        self.tokenizer_name = self.meta["tokenizer"]
        _allow_open_files(data_dir, sum(len(info["shards"]) for info in self.meta["splits"].values()))
        self.shards = {}  # split -> list of uint16 arrays
        for split, info in self.meta["splits"].items():
            for index in range(len(info["shards"])):
                check_shard(data_dir, self.meta, split, index)  # exists, valid, meta's vocab
            arrays = [read_shard(os.path.join(data_dir, name)) for name in info["shards"]]
            check_split_tokens(data_dir, self.meta, split, sum(len(a) for a in arrays))
            self.shards[split] = arrays

    def _split_shards(self, split: str) -> list:
        if split not in self.shards:
            raise ValueError(f"split {split!r} not in {self.data_dir}; splits: {', '.join(self.shards)}")
        return self.shards[split]

    def num_tokens(self, split: str) -> int:
        return sum(len(a) for a in self._split_shards(split))

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's text (for bits per byte = nats * tokens / (bytes * ln 2))."""
        self._split_shards(split)
        return int(self.meta["splits"][split]["bytes"])

    def check_ids(self, split: str, shard: int, start: int, tokens: np.ndarray) -> np.ndarray:
        """tokens (shard `shard` of split from offset start) -> tokens, or a one-line ValueError
        naming the shard if an id is >= vocab_size. write_shard never writes one, but a damaged
        shard can hold one: the model's embedding would fail with a traceback (a device-side
        assert on CUDA) in the middle of training. Checked per batch, not per folder: a max over
        a batch is cheap, a scan of every shard at start-up is not."""
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            position = int(np.argmax(tokens >= self.vocab_size))
            name = self.meta["splits"][split]["shards"][shard]
            raise ValueError(f"shard {os.path.join(self.data_dir, name)} holds token id {int(tokens[position])} "
                             f"at token {start + position}, outside its vocab of {self.vocab_size}; "
                             "prepare the data again")
        return tokens

    def tokens(self, split: str, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split seen as the concatenation of its shards."""
        total = self.num_tokens(split)
        if not 0 <= start <= stop <= total:
            raise ValueError(f"token range [{start}, {stop}) outside split {split!r} of {total} tokens")
        pieces, offset = [], 0
        for shard, array in enumerate(self._split_shards(split)):
            lo, hi = max(start - offset, 0), min(stop - offset, len(array))
            if lo < hi:
                pieces.append(self.check_ids(split, shard, lo, array[lo:hi]))
            offset += len(array)
        if not pieces:
            return np.zeros(0, dtype=np.uint16)
        return np.concatenate(pieces) if len(pieces) > 1 else np.asarray(pieces[0])


OTHER_OPEN_FILES = 256  # what the rest of a training process keeps open: torch, checkpoints, logs


def _allow_open_files(data_dir: str, num_shards: int):
    """Every shard's memmap keeps a file open (Python's mmap holds a duplicate descriptor), so
    100B tokens in the default 100M-token shards exceed the common soft limit of 1,024 open
    files ("Too many open files" on the next open, anywhere). Raise the soft limit to the hard
    one (no privileges needed; all of it, as a second dataset in the process needs as many);
    a one-line error where even that is too low."""
    try:
        import resource
    except ImportError:                  # not a Unix: no such per-process limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = num_shards + OTHER_OPEN_FILES
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    too_few = (f"{data_dir} has {num_shards} shards, each kept open, but this process may open at most "
               f"{{}} files (ulimit -Hn): raise the limit, or prepare the data again with a larger --shard-tokens")
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise ValueError(too_few.format(hard))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard))
    except (ValueError, OSError):        # macOS: an unlimited hard limit, but a soft one capped lower
        raise ValueError(too_few.format(soft)) from None


def _check_split_length(dataset: TokenDataset, split: str, seq_len: int) -> int:
    n = dataset.num_tokens(split)
    if n < seq_len + 1:
        raise ValueError(f"split {split!r} of {dataset.data_dir} has {n} tokens, fewer than seq_len + 1 = "
                         f"{seq_len + 1}: lower seq_len or prepare more data")
    return n


def _rows_to_tensors(rows: np.ndarray):
    rows = torch.from_numpy(rows.astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


SAMPLINGS = ("random", "shuffled")


def permute(index: np.ndarray, n: int, key) -> np.ndarray:
    """A pseudo-random bijection of [0, n) applied to `index`, chosen by `key` (4 uint64): a
    4-round Feistel network on the smallest even power of two >= n, walked round its cycles
    until the value falls back in [0, n) (a bijection of [0, n) again). Stateless: the
    shuffled sampler's epoch order without storing a permutation of every window."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.asarray(key, dtype=np.uint64)

    def rounds(x):
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            h = (right ^ k) * np.uint64(0x9E3779B97F4A7C15)     # a multiply-xorshift mix (splitmix64's)
            h ^= h >> np.uint64(29)
            left, right = right, left ^ (h & mask)
        return (left << np.uint64(half)) | right

    x = np.asarray(index, dtype=np.uint64).copy()
    outside = np.ones(x.shape, dtype=bool)
    while outside.any():
        x[outside] = rounds(x[outside])
        outside = x >= np.uint64(n)
    return x.astype(np.int64)


class BatchSampler:
    """Windows of seq_len + 1 tokens that lie inside one shard (windows do not straddle shard
    files, so reads stay one slice): `random` draws each from every such window, uniformly;
    `shuffled` reads the non-overlapping ones (starts seq_len apart) once per epoch."""

    def __init__(self, dataset: TokenDataset, split: str, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, sampling: str = "random"):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        _check_split_length(dataset, split, seq_len)
        self.dataset, self.split, self.sampling = dataset, split, sampling
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.arrays = dataset.shards[split]
        # shards shorter than a window hold no window (a split's last shard may be tiny)
        self.usable_shards = [i for i, a in enumerate(self.arrays) if len(a) >= seq_len + 1]
        if not self.usable_shards:
            raise ValueError(f"no shard of split {split!r} holds seq_len + 1 = {seq_len + 1} tokens; "
                             "prepare with a larger --shard-tokens")
        # a window is seq_len + 1 tokens; `random` may start one at any token, `shuffled` every
        # seq_len tokens (consecutive windows share one boundary token, as iter_eval_batches')
        self.stride = 1 if sampling == "random" else seq_len
        windows_per_shard = np.array([(len(self.arrays[i]) - 1 - seq_len) // self.stride + 1
                                      for i in self.usable_shards], dtype=np.int64)
        self.window_ends = np.cumsum(windows_per_shard)  # global window index -> shard via searchsorted
        self.step = 0

    @property
    def num_windows(self) -> int:
        return int(self.window_ends[-1])

    def global_window_starts(self, step: int) -> list[tuple[int, int]]:
        """(shard index, start offset) of every row of the global batch at `step`."""
        if self.sampling == "random":
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step])))
            windows = rng.integers(0, self.num_windows, size=self.batch_size)
        else:                          # rows n of the whole stream: epoch n // N, place n % N in it
            rows = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
            epochs, places = rows // self.num_windows, rows % self.num_windows
            windows = np.empty_like(rows)
            for epoch in np.unique(epochs):                 # one epoch, or two where a batch ends it
                key = np.random.SeedSequence([self.seed, int(epoch)]).generate_state(4, np.uint64)
                windows[epochs == epoch] = permute(places[epochs == epoch], self.num_windows, key)
        usable = np.searchsorted(self.window_ends, windows, side="right")
        first_window = np.concatenate([[0], self.window_ends[:-1]])
        return [(self.usable_shards[u], int(w - first_window[u]) * self.stride) for u, w in zip(usable, windows)]

    def next_batch(self):
        """This rank's (x, y), int64 [batch_size // world_size, seq_len] on the CPU; advances the step."""
        starts = self.global_window_starts(self.step)
        b = self.local_batch_size
        mine = starts[self.rank * b: (self.rank + 1) * b]
        rows = np.stack([self.arrays[s][o: o + self.seq_len + 1] for s, o in mine])
        if int(rows.max()) >= self.dataset.vocab_size:  # one max per batch; the slow search only on damage
            for (s, o), row in zip(mine, rows):
                self.dataset.check_ids(self.split, s, o, row)
        self.step += 1
        return _rows_to_tensors(rows)

    @property
    def recipe(self) -> dict | None:
        """How the data was prepared (source, tokenizer, split choice: meta.json's recipe)."""
        return self.dataset.meta.get("recipe")

    def state_dict(self) -> dict:
        # rank and world_size are left out on purpose: the global stream does not depend on them
        # shard_lengths: a window index names a (shard, offset) through them, so the same corpus
        # and recipe cut at another --shard-tokens (which can keep num_windows) is another stream
        return {"step": self.step, "seed": self.seed, "split": self.split, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "sampling": self.sampling, "num_windows": self.num_windows,
                "shard_lengths": self.shard_lengths, "recipe": self.recipe}

    @property
    def shard_lengths(self) -> list[int]:
        return [len(a) for a in self.arrays]

    def load_state_dict(self, state: dict):
        state = {"sampling": "random", **state}         # saved before the shuffled sampling existed
        if state.get("recipe") is not None and self.recipe is not None and state["recipe"] != self.recipe:
            theirs, ours = state["recipe"], self.recipe
            key = next(k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k))
            raise ValueError(f"data position was saved on data prepared with {key}={theirs.get(key)!r}, this run "
                             f"reads data prepared with {key}={ours.get(key)!r}: the batch stream would differ")
        # named as the config names them (num_windows: a count of the prepared data's windows)
        for key, name in (("batch_size", "train.batch_size"), ("seq_len", "train.seq_len"),
                          ("sampling", "data.sampling"), ("num_windows", "num_windows")):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"data position was saved with {name}={state[key]}, this sampler has "
                                 f"{name}={getattr(self, key)}: the batch stream would differ")
        saved, ours = state.get("shard_lengths"), self.shard_lengths    # saved: absent in older positions
        if saved is not None and list(saved) != ours:
            i = next((i for i, (a, b) in enumerate(zip(saved, ours)) if a != b), min(len(saved), len(ours)))
            then, now = (f"{lengths[i]} tokens" if i < len(lengths) else "no shard" for lengths in (saved, ours))
            raise ValueError(f"data position was saved on {self.split} shards of other lengths (shard {i}: {then} "
                             f"then, {now} now; prepared with another --shard-tokens?): the batch stream would differ")
        self.step = int(state["step"])
        self.seed = int(state["seed"])


def iter_eval_batches(dataset: TokenDataset, split: str, batch_size: int, seq_len: int, max_batches=None):
    """Consecutive non-overlapping windows from the start of the split: row j holds tokens
    [j*seq_len, (j+1)*seq_len + 1), so every token after the first is a target exactly once.
    The leftover tail (shorter than seq_len) comes last as a [1, tail] batch. Every rank of a
    distributed run reads them all (eval.perplexity.evaluate_split spreads each batch's rows)."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    n = _check_split_length(dataset, split, seq_len)
    if max_batches is not None and max_batches < 1:     # a negative one would drop batches from the end
        raise ValueError(f"max_batches must be positive (or None for the whole split), got {max_batches}")
    num_rows = (n - 1) // seq_len
    batches = [(first, min(first + batch_size, num_rows)) for first in range(0, num_rows, batch_size)]
    tail_start = num_rows * seq_len
    if n - tail_start >= 2:
        batches.append(None)  # marker for the tail batch
    if max_batches is not None:
        batches = batches[:max_batches]
    for rows in batches:
        if rows is None:
            yield _rows_to_tensors(dataset.tokens(split, tail_start, n)[None, :])
            continue
        first, last = rows
        block = dataset.tokens(split, first * seq_len, last * seq_len + 1)
        # overlapping views: row i = block[i*seq_len : i*seq_len + seq_len + 1]
        windows = np.lib.stride_tricks.sliding_window_view(block, seq_len + 1)[::seq_len]
        yield _rows_to_tensors(np.ascontiguousarray(windows))
