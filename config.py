"""Typed configuration: YAML files map onto nested dataclasses, `--section.key=value` overrides.

    cfg = load_config("configs/quickstart.yaml", ["--train.max_steps=10"])

Config files are data (yaml.safe_load, never exec). Unknown keys and values of the wrong
type or outside a field's choices raise ConfigError naming the key and listing what is
valid. Every section is a dataclass below; their fields are the documentation.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from cli import write_atomic


class ConfigError(ValueError):
    """A bad config key or value. The message is one line, fit to print as `error: ...`."""


def choice(default, choices, help=""):
    return field(default=default, metadata={"choices": tuple(choices), "help": help})


# ----------------------------------------------------------------------------------------
# sections

# The largest scale setting (inner clip, fixed inner lr, gate maxima, learning rates, init
# std): each becomes or multiplies an fp32 tensor, which overflows from ~3.4e38 (a clip's
# square from ~1.8e19; null turns the clip off). The cap guards representability, not
# stability: far smaller values still diverge (inner_lr_fixed 1e18 is NaN at step 1).
MAX_INNER_SETTING = 1e18


@dataclass
class TitansConfig:
    """Titans neural long-term memory (arXiv 2501.00663; DESIGN §3.4)."""
    variant: str = choice("lmm", ["lmm", "mac", "mag", "mal"])
    memory_depth: int = 2            # 1 = linear memory W x; 2 = residual MLP x + W1 s(W2 x)
    memory_expansion: int = 2        # hidden width E = expansion * head_dim for depth 2
    activation: str = choice("silu", ["silu", "gelu"])
    chunk_size: int = 16             # C: gradients at the chunk-start weights (Titans §3.2)
    theta_max: float = 1.0           # inner learning rate theta_t = theta_max * sigmoid(.)
    inner_lr_fixed: Optional[float] = None  # set (e.g. 0.0) to replace theta_t by a constant
    momentum: bool = True            # False: beta_t = 0 (Titans Table 5 "w/o momentum")
    weight_decay: bool = True        # False: forget_t = 0, alpha_t = 1 ("w/o weight decay")
    conv_size: int = 4               # causal depthwise conv on q, k, v (Titans §4.4); 0 = off
    n_persistent: int = 4            # N_p learned tokens (Titans §3.3): an always-visible attention
                                     # prefix in mac/mag/mal; lmm has no attention and ignores it
    segment_size: int = 64           # MAC: attention segment length C_seg
    window_size: int = 64            # MAG/MAL: sliding-window attention width (keys incl. the query's own)
    max_grad_norm: Optional[float] = 10.0  # per-token inner-gradient clip (null = off, the paper's
                                     # Eq. 13-14); bounds writes of an unstable deep memory
    detach_targets: bool = False     # stop outer gradients through the targets v of the inner loss
    detach_chunks_older_than: int = 0  # n > 0: detach the fast weights every n chunks (truncated
                                     # backprop through the inner loop); 0 = full backprop
    step_budget: Optional[float] = None  # cap on a chunk's summed inner step along each of its keys
                                     # (memory.chunk_step_budget; null = off, the paper's update);
                                     # the paper-scale configs use 0.5 with max_grad_norm 1.0 so
                                     # that 4K contexts train (docs/FIDELITY.md, Titans choice 14)

    def __post_init__(self):
        # titans.check_titans_config runs these again when a model is built
        d = self.memory_depth
        if not (isinstance(d, int) and not isinstance(d, bool) and d in (1, 2)):
            raise ConfigError(f"model.titans.memory_depth must be 1 or 2, got {d!r}")
        for key in ("memory_expansion", "chunk_size", "segment_size", "window_size"):
            _check_range(getattr(self, key), f"model.titans.{key}", 1, integer=True)
        for key in ("conv_size", "n_persistent", "detach_chunks_older_than"):
            _check_range(getattr(self, key), f"model.titans.{key}", 0, integer=True)
        self.theta_max = _check_range(self.theta_max, "model.titans.theta_max", 0, strict=True,
                                      high=MAX_INNER_SETTING)
        self.inner_lr_fixed = _check_range(self.inner_lr_fixed, "model.titans.inner_lr_fixed", 0, null=True,
                                           high=MAX_INNER_SETTING)
        self.max_grad_norm = _check_range(self.max_grad_norm, "model.titans.max_grad_norm", 0, strict=True, null=True,
                                          high=MAX_INNER_SETTING)
        self.step_budget = _check_range(self.step_budget, "model.titans.step_budget", 0, strict=True, null=True)


@dataclass
class CMSConfig:
    """Continuum Memory System (NL §7, Eq. 70-71; DESIGN §3.5), implemented in cms.py.

    A chain of levels, each z <- z + MLP_l(RMSNorm_l(z)) with the 2-layer MLP
    MLP_l(a) = W_out act(W_in a) (hidden = int(hidden_mult * d_model), rounded up to
    model.ffn_multiple_of, as the FFN's). Level l is static when chunk_sizes[l] is null (a plain FFN,
    trained by the outer optimiser only) and fast otherwise: per-sequence weights start from
    the outer-learned ones and take one GD step on ||MLP_l(a_t) - W_v,l a_t||^2, summed over
    the chunk, every chunk_sizes[l] tokens. The default (one fast level, one static level,
    hidden 2 d each) has about the parameters of one SwiGLU FFN plus d^2 for W_v.
    """
    chunk_sizes: list = field(default_factory=lambda: [16, None])  # C_l per level, first applied first; null = static
    hidden_mult: float = 2.0         # hidden width of every level's MLP = hidden_mult * d_model
    activation: str = choice("gelu", ["gelu", "silu"])
    inner_lr: Any = 1e-3             # lr_l: one number for all fast levels, or a list with one per level
                                     # (entries of static levels are ignored and may be null). The step
                                     # sums the gradients of C_l tokens, so lr_l is a rate per token: a larger
                                     # chunk at the same lr_l takes rarer, larger steps.

    def __post_init__(self):
        # Checked here (not in validate) so that a ModelConfig built anywhere is checked too.
        if not isinstance(self.chunk_sizes, list) or not self.chunk_sizes:
            raise ConfigError(f"model.cms.chunk_sizes must be a non-empty list (null = static level), "
                              f"got {self.chunk_sizes!r}")
        for i, c in enumerate(self.chunk_sizes):
            _check_range(c, f"model.cms.chunk_sizes[{i}]", 1, integer=True, null=True)
        self.hidden_mult = _check_range(self.hidden_mult, "model.cms.hidden_mult", 0, strict=True)
        if isinstance(self.inner_lr, list):
            if len(self.inner_lr) != len(self.chunk_sizes):
                raise ConfigError(f"model.cms.inner_lr has {len(self.inner_lr)} entries but "
                                  f"model.cms.chunk_sizes has {len(self.chunk_sizes)} levels")
            self.inner_lr = [_check_range(lr, f"model.cms.inner_lr[{i}]", 0, null=c is None, high=MAX_INNER_SETTING)
                             for i, (lr, c) in enumerate(zip(self.inner_lr, self.chunk_sizes))]
        else:
            self.inner_lr = _check_range(self.inner_lr, "model.cms.inner_lr", 0, high=MAX_INNER_SETTING)

    def level_lrs(self) -> list:
        """The inner learning rate of every level (None for static levels)."""
        lrs = self.inner_lr if isinstance(self.inner_lr, list) else [self.inner_lr] * len(self.chunk_sizes)
        return [None if c is None else lr for c, lr in zip(self.chunk_sizes, lrs)]


def _check_range(value, key, low, *, integer=False, strict=False, below=None, high=None, null=False,
                 finite=True):
    """The one range check of config values -> value (a float unless integer): an int
    (integer=True; bools are not) or a number (YAML 1.1 reads '1e-3' as a string: read as a
    float) that is >= low (> low when strict), < below and <= high when given, and finite
    (not inf or nan) unless finite=False; None passes when null. Else a one-line ConfigError
    naming the key, the range and the value, e.g.
    "model.hope.chunk_mem must be an integer >= 1, got 0",
    "train.lr must be a finite number > 0, got inf",
    "data.val_fraction must be a finite number in (0, 1), got 0.0"."""
    if value is None and null:
        return None
    if not integer and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    kind = int if integer else (int, float)
    ok = (isinstance(value, kind) and not isinstance(value, bool)
          and (value > low if strict else value >= low)                 # NaN fails
          and (below is None or value < below) and (high is None or value <= high)
          and (integer or not finite or _is_finite(value)))
    if not ok:
        if below is not None or high is not None:
            bound = (f"in {'(' if strict else '['}{low}, "
                     f"{below if below is not None else high}{')' if below is not None else ']'}")
        else:
            bound = f"{'>' if strict else '>='} {low}"
        what = "an integer" if integer else ("a finite number" if finite else "a number")
        raise ConfigError(f"{key} must be {what} {bound}{' or null' if null else ''}, got {value!r}")
    return value if integer else float(value)


def _is_finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:                           # an int too large for a float
        return False


@dataclass
class HopeConfig:
    """Self-modifying Titans, the HOPE sequence mixer (NL §8, Eq. 83-97; DESIGN §3.5), in hope.py.

    Memories M_k, M_v, M_eta, M_alpha (chunk size chunk_other) and M_mem (chunk_mem) are
    per-head residual MLPs x + W1 s(W2 x) with hidden memory_expansion * head_dim; each learns
    its self-generated target M_B(v_t) by DGD (NL Eq. 88) with the shared gates
    eta_t = eta_max * sigmoid(.) and alpha_t = sigmoid(.). The switches are NL Table 6's
    ablations; `cms` also applies to hope_attention.
    """
    chunk_mem: int = 64              # C_mem: chunk size of M_mem (gradients at its chunk-start weights)
    chunk_other: int = 16            # C_other: chunk size of M_k, M_v, M_eta, M_alpha (and M_q)
    memory_expansion: int = 1        # hidden width of every memory MLP = expansion * head_dim
    activation: str = choice("silu", ["silu", "gelu"])   # s in x + W1 s(W2 x)
    eta_max: float = 1.0             # eta_t = eta_max * sigmoid(w_eta . M_eta(x~) + b_eta)
    inner_lr_fixed: Optional[float] = None  # set: eta_t = this constant and no M_eta (0 = no writes)
    inner_opt: str = choice("dgd", ["dgd", "gd"])        # gd: W(alpha I) - eta g a^T, no a a^T term ("w/o DGD")
    max_grad_norm: Optional[float] = 3.0  # each token's inner gradient rescaled to norm <= this
                                     # (memory.py; null = the paper's update): with self-generated
                                     # targets M(v) unclipped writes can grow the memories
                                     # super-exponentially across chunks; at 3 the outer gradients
                                     # explode past ~1K tokens, so the 4K paper configs set 1.0
                                     # (docs/FIDELITY.md, HOPE choice 12)
    retention: bool = True           # False: alpha_t = 1 and no M_alpha ("w/o weight decay")
    adaptive_k: bool = True          # False: k = L2norm(W_k x~), a static projection ("w/o inner-projection k")
    adaptive_v: bool = True          # False: v = W_v x~
    adaptive_q: bool = False         # NL §8.1: "q_t = x_t W_q is the only non-adaptive projection";
                                     # True: q = L2norm(M_q(x~)), a memory too
    conv_size: int = 4               # causal depthwise conv on W_in x (NL §8.3 "window size of 4"); 0 = off
                                     # (1: a learned per-channel scale, as model.titans.conv_size)
    cms: bool = True                 # False: a SwiGLU FFN instead of the CMS chain ("w/o CMS")
    detach_targets: bool = False     # stop outer gradients through the self-generated targets
    detach_chunks_older_than: int = 0  # >0: truncated backprop through the memories' inner loops
                                     # (memory.py); the CMS fast levels still backprop through the
                                     # whole sequence

    def __post_init__(self):
        for key in ("chunk_mem", "chunk_other", "memory_expansion"):
            _check_range(getattr(self, key), f"model.hope.{key}", 1, integer=True)
        for key in ("conv_size", "detach_chunks_older_than"):
            _check_range(getattr(self, key), f"model.hope.{key}", 0, integer=True)
        self.eta_max = _check_range(self.eta_max, "model.hope.eta_max", 0, strict=True, high=MAX_INNER_SETTING)
        self.inner_lr_fixed = _check_range(self.inner_lr_fixed, "model.hope.inner_lr_fixed", 0, null=True,
                                           high=MAX_INNER_SETTING)
        self.max_grad_norm = _check_range(self.max_grad_norm, "model.hope.max_grad_norm", 0, strict=True, null=True,
                                          high=MAX_INNER_SETTING)


# From this many tokens on, memories with the settings ModelConfig.long_context_risk names
# were measured to diverge; below these inner clips and step budget they held
LONG_CONTEXT = 1024
HOPE_MAX_LONG_CONTEXT_CLIP = 1.5
TITANS_MAX_STEP_BUDGET, TITANS_MAX_LONG_CONTEXT_CLIP = 0.5, 1.0


@dataclass
class ModelConfig:
    arch: str = choice("transformer", ["transformer", "titans", "hope", "hope_attention"])
    vocab_size: int = 0              # 0 = take it from the tokenizer
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    ffn_mult: float = 8 / 3          # SwiGLU hidden = ffn_mult * d_model, rounded to ffn_multiple_of
    ffn_multiple_of: int = 32
    max_seq_len: int = 4096          # the context the model is meant for, recorded with it; nothing is
                                     # sized by it (RoPE angles are computed per position, so KV caches
                                     # and streamed evals may go past it; the evals read train.seq_len)
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    attention: str = choice("auto", ["auto", "sdpa", "flash"])
    kernels: str = choice("auto", ["auto", "torch", "triton", "reference"])  # the memory layers' and
                                     # CMS fast levels' backend (kernels/__init__.py): auto = the Triton scans
                                     # and the fused linear-memory kernel on CUDA, else chunked torch; the
                                     # fused MLP-memory, HOPE stage-1 and CMS kernels only with "triton"
                                     # (until a GPU has timed them in a model)
    titans: TitansConfig = field(default_factory=TitansConfig)
    hope: HopeConfig = field(default_factory=HopeConfig)
    cms: CMSConfig = field(default_factory=CMSConfig)

    @property
    def uses_rope(self) -> bool:
        """Whether the blocks have softmax attention with RoPE (model.Attention, titans.PersistentAttention):
        HOPE and Titans-LMM have none. tests/test_config.py checks this against every built architecture."""
        return self.arch in ("transformer", "hope_attention") or (self.arch == "titans"
                                                                  and self.titans.variant != "lmm")

    def long_context_risk(self) -> str | None:
        """Why this model's memories may not hold from ~LONG_CONTEXT tokens on, or None. The
        settings named here were measured to make the chunk-to-chunk maps of the memories
        expanding (docs/FIDELITY.md, Titans choice 14, HOPE choice 12): in training the outer
        gradients explode; in a streamed eval the outputs amplify rounding, so fp32 and fp64,
        other segment lengths or kernels give different tokens. Titans' MAC and MAG explode at
        head dim 32 as at 64; LMM and MAL held at 32 and explode at 64, so they count from 64."""
        t, clip = self.titans, self.hope.max_grad_norm
        held = t.variant in ("lmm", "mal") and self.d_model // self.n_head < 64
        if self.arch == "titans" and t.inner_lr_fixed != 0 and not held and (
                t.step_budget is None or t.step_budget > TITANS_MAX_STEP_BUDGET
                or t.max_grad_norm is None or t.max_grad_norm > TITANS_MAX_LONG_CONTEXT_CLIP):
            return (f"model.titans.step_budget={t.step_budget} and max_grad_norm={t.max_grad_norm}: Titans' "
                    f"memories can diverge from ~{LONG_CONTEXT} tokens unless step_budget <= {TITANS_MAX_STEP_BUDGET} "
                    f"and max_grad_norm <= {TITANS_MAX_LONG_CONTEXT_CLIP} (the paper configs' values; "
                    f"docs/FIDELITY.md, Titans choice 14)")
        if self.arch == "hope" and self.hope.inner_lr_fixed != 0 and (clip is None or clip > HOPE_MAX_LONG_CONTEXT_CLIP):
            return (f"model.hope.max_grad_norm={clip}: HOPE's memories diverge from ~{LONG_CONTEXT} tokens above "
                    f"a clip of {HOPE_MAX_LONG_CONTEXT_CLIP} (the paper configs use 1.0; docs/FIDELITY.md, "
                    f"HOPE choice 12)")
        return None

    def __post_init__(self):
        # Checked here (not in validate) so that build_model(dict | path) is checked too.
        for key in ("n_layer", "n_head", "d_model", "ffn_multiple_of", "max_seq_len"):
            _check_range(getattr(self, key), f"model.{key}", 1, integer=True)
        _check_range(self.vocab_size, "model.vocab_size", 0, integer=True)
        for key in ("ffn_mult", "norm_eps"):
            setattr(self, key, _check_range(getattr(self, key), f"model.{key}", 0, strict=True))
        self.init_std = _check_range(self.init_std, "model.init_std", 0, strict=True, high=MAX_INNER_SETTING)
        # RoPE's frequencies are rope_theta^(-2i/d): a base below 1 makes them grow past 1 rad
        # per token (and 1e-300 overflows them to inf)
        self.rope_theta = _check_range(self.rope_theta, "model.rope_theta", 1)
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
        if self.uses_rope and (self.d_model // self.n_head) % 2:
            raise ConfigError(f"head dim d_model/n_head={self.d_model // self.n_head} must be even for RoPE")


@dataclass
class DataConfig:
    dataset: str = "builtin"         # builtin | files:GLOB | hf:NAME[:CONFIG] | a prepared dir
    tokenizer: str = choice("gpt2", ["gpt2", "bytes"])
    data_dir: str = ""               # where shards live; "" = data/cache/<dataset>-<tokenizer>[-<key><value>
                                     # for each recipe setting off its default] (train.resolve_data_dir)
    val_fraction: float = 0.01       # in (0, 1): every split needs documents
    num_workers: int = 0             # tokenization processes; 0 = all cores
    hf_split: str = "train"
    hf_streaming: bool = False
    hf_data_files: str = ""
    text_field: str = "text"
    max_docs: Optional[int] = None   # null = all; else >= 2 (one train and one val document)
    sampling: str = choice("random", ["random", "shuffled"])   # training windows (data/loader.py):
                                     # random = drawn anywhere with replacement (nanoGPT); shuffled =
                                     # non-overlapping, each once per epoch in a seeded order (one pass)

    def __post_init__(self):
        self.val_fraction = _check_range(self.val_fraction, "data.val_fraction", 0, strict=True, below=1)
        _check_range(self.num_workers, "data.num_workers", 0, integer=True)
        _check_range(self.max_docs, "data.max_docs", 2, integer=True, null=True, high=10**18)


@dataclass
class OptimConfig:
    """AdamW or a deep optimiser from NL §4 (optim.py, docs/OPTIMIZERS.md). The deep rules
    act on hidden matrices; embeddings, the LM head and vectors always use AdamW."""
    name: str = choice("adamw", ["adamw", "muon", "m3", "dmgd", "delta_momentum", "preconditioned_momentum"])
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0           # max global gradient norm; 0 = off
    schedule: str = choice("cosine", ["cosine", "wsd", "constant"])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1        # final lr = min_lr_ratio * train.lr, in [0, 1]
    decay_fraction: float = 0.2      # WSD: the last fraction of steps decays linearly, in [0, 1]
    momentum: Optional[float] = None  # muon/dmgd/delta_momentum; None = the rule's default
    nesterov: bool = True            # muon
    ns_steps: int = 5                # Newton-Schulz iterations (muon, m3)
    muon_scale: str = choice("match_adamw", ["match_adamw", "spectral"])
    m3_frequency: int = 10           # M3: slow momentum refreshed every f steps (NL Alg. 1)
    m3_alpha: float = 1.0            # M3: weight of the slow orthogonalised momentum
    m3_beta3: float = 0.9            # M3: EMA of the slow accumulator (the paper's does not decay)
    m3_update_rms: float = 0.2       # M3: rescale each step to this RMS; 0 = literal Algorithm 1
    dmgd_hidden: int = 8             # DMGD: hidden width of the momentum MLP memory (NL Eq. 50)
    dmgd_inner_lr: float = 0.05
    delta_strength: float = 1.0      # delta momentum: scale of the erase term (NL Eq. 48-49)
    delta_preconditioner: str = choice("adam", ["adam", "none"])

    def __post_init__(self):
        # the ranges optim.py checks again, here with the key named
        _check_range(self.warmup_steps, "optim.warmup_steps", 0, integer=True)
        for key in ("ns_steps", "m3_frequency", "dmgd_hidden"):
            _check_range(getattr(self, key), f"optim.{key}", 1, integer=True)
        for key in ("beta1", "beta2", "m3_beta3"):
            setattr(self, key, _check_range(getattr(self, key), f"optim.{key}", 0, below=1))
        self.momentum = _check_range(self.momentum, "optim.momentum", 0, below=1, null=True)
        for key in ("min_lr_ratio", "decay_fraction"):
            setattr(self, key, _check_range(getattr(self, key), f"optim.{key}", 0, high=1))
        self.grad_clip = _check_range(self.grad_clip, "optim.grad_clip", 0)   # a threshold: any size holds
        for key in ("weight_decay", "m3_alpha", "m3_update_rms", "dmgd_inner_lr", "delta_strength"):
            setattr(self, key, _check_range(getattr(self, key), f"optim.{key}", 0, high=MAX_INNER_SETTING))
        self.eps = _check_range(self.eps, "optim.eps", 0, strict=True)


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 8              # sequences per optimiser step (global, all ranks)
    grad_accum: int = 1              # micro-batches per step; batch_size % grad_accum == 0
    seq_len: int = 256
    lr: float = 1e-3
    seed: int = 1337
    out_dir: str = "out"
    eval_every: int = 100            # 0 = no evals during training
    eval_batches: int = 20           # val batches scored at each eval
    eval_batch_size: int = 0         # windows per val batch (split over ranks); 0 = batch_size / grad_accum,
                                     # a 1-process micro-batch: set it where grad_accum changes with the rank count
    ckpt_every: int = 100            # 0 = no checkpoints
    keep_checkpoints: int = 2        # the newest n checkpoints are kept; 0 = keep all
    resume: str = "auto"             # auto | never | PATH to a checkpoint
    device: str = choice("auto", ["auto", "cpu", "cuda"])
    dtype: str = choice("auto", ["auto", "float32", "bfloat16", "fp32", "bf16"])  # auto: bf16 autocast on
                                     # CUDA; fp32 / bf16 are read as float32 / bfloat16 (the spelling of
                                     # distributed.mixed_precision and checkpoint export)
    compile: bool = False
    log_every: int = 10
    max_bad_steps: int = 5           # consecutive NaN/inf steps before stopping
    sample_tokens: int = 100         # text sampled at the end of training (0 = none)
    sample_prompt: str = "And God said"

    def __post_init__(self):
        for key in ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "log_every",
                    "max_bad_steps"):
            _check_range(getattr(self, key), f"train.{key}", 1, integer=True)
        for key in ("eval_every", "eval_batch_size", "ckpt_every", "keep_checkpoints", "sample_tokens"):
            _check_range(getattr(self, key), f"train.{key}", 0, integer=True)
        self.lr = _check_range(self.lr, "train.lr", 0, strict=True, high=MAX_INNER_SETTING)
        _check_range(self.seed, "train.seed", 0, integer=True, below=2**32)   # np.random.seed's range
        self.dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(self.dtype, self.dtype)
        if isinstance(self.sample_prompt, str):
            try:        # argv bytes that are not UTF-8 arrive as lone surrogates: no tokenizer encodes them
                self.sample_prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"train.sample_prompt is not UTF-8 text, got {self.sample_prompt!r}") from None

    def computes_in_bf16(self, device_type: str) -> bool:
        """Whether the run computes in bf16 (autocast): dtype bfloat16, or auto on CUDA. Read by
        train.setup_precision and by distributed.mixed_precision_dtype (FSDP2's auto)."""
        return self.dtype == "bfloat16" or (self.dtype == "auto" and device_type == "cuda")


DURING_TRAINING_EVALS = ("perplexity", "babilong_quick", "niah_quick", "continual_quick")


@dataclass
class EvalConfig:
    final: bool = True               # evaluate val loss / ppl / bits-per-byte after training
    # evals run at every train.eval_every step and logged to metrics.jsonl / wandb
    # (eval.run.run_during_training), any of DURING_TRAINING_EVALS
    during_training: list = field(default_factory=list)

    def __post_init__(self):
        unknown = [n for n in self.during_training if n not in DURING_TRAINING_EVALS]
        if unknown:
            raise ConfigError(f"eval.during_training has unknown eval(s) {unknown}; "
                              f"valid: {', '.join(DURING_TRAINING_EVALS)}")


@dataclass
class LoggingConfig:
    wandb: str = choice("disabled", ["disabled", "offline", "online"])
    wandb_project: str = "nested-learning"
    run_name: str = ""


@dataclass
class DistributedConfig:
    """Multi-device training under torchrun (DESIGN §5; docs/DISTRIBUTED.md). The speed
    switches (activation_checkpointing, and train.compile) apply to one process as well."""
    data_parallel: str = choice("auto", ["auto", "fsdp", "ddp"])  # auto: FSDP2 on > 1 rank, plain on 1;
                                     # fsdp: FSDP2 even on 1 device (throughput checks); ddp: DDP on > 1 rank
    reshard_after_forward: bool = True  # free gathered block weights after forward (ZeRO-3); False keeps
                                     # them to backward (ZeRO-2: fewer all-gathers, more memory)
    mixed_precision: str = choice("auto", ["auto", "bf16", "fp32"])  # FSDP2 parameter dtype in forward and
                                     # backward; gradients are always reduced in fp32. auto: bf16 when the
                                     # run computes in bf16 (train.dtype), else fp32
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    timeout_s: int = 1800            # collective timeout before a stuck rank aborts the job

    def __post_init__(self):
        _check_range(self.timeout_s, "distributed.timeout_s", 1, integer=True, high=10**9)   # ~31 years: a safe
        # bound (timedelta itself fails from ~8.6e13 s)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# ----------------------------------------------------------------------------------------
# dict <-> dataclass with checking

def _coerce(value, tp, key):
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:                      # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:               # an int too large for a float
                raise ConfigError(f"{key} must be a finite number, got {value!r}") from None
        if isinstance(value, str):          # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
    raise ConfigError(f"{key} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _from_dict(cls, data, prefix=""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix[:-1] or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{full}'; valid keys in "
                              f"'{prefix[:-1] or 'top level'}': {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, {} if value is None else value, full + ".")
            continue
        value = _coerce(value, tp, full)
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{full}={value!r} is not one of: {', '.join(map(str, choices))}")
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_path(data: dict, dotted: str, value):
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def _declared_type(dotted: str):
    """The annotation of config field 'section.key' (None when there is no such field)."""
    cls = Config
    for part in dotted.split("."):
        if not (dataclasses.is_dataclass(cls) and part in {f.name for f in dataclasses.fields(cls)}):
            return None
        cls = typing.get_type_hints(cls)[part]
    return cls


def parse_overrides(args: list[str]) -> dict:
    """['--train.lr=3e-4', '--model.arch', 'hope'] -> nested dict; values parsed as YAML,
    except for fields declared str, which keep the text as typed (--logging.run_name=010
    is '010', not 8; --train.sample_prompt=yes is 'yes', not True)."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            if arg.endswith((".yaml", ".yml")):     # torchtitan-style `--overrides CONFIG` order
                raise ConfigError(f"unexpected argument '{arg}': the config file comes first, before the "
                                  "--section.key=value overrides")
            raise ConfigError(f"unexpected argument '{arg}'; overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override '{arg}' has no value; use --{body}=VALUE")
            key, raw = body, args[i + 1]
            i += 1
        key = key.replace("-", "_")
        if dataclasses.is_dataclass(_declared_type(key)):     # --model.titans=null reset it silently
            raise ConfigError(f"override '{arg}' sets the whole section {key}; set its keys, "
                              f"e.g. --{key}.KEY=VALUE")
        if _declared_type(key) is str:
            value = raw
        else:
            try:
                value = yaml.load(raw, Loader=_StrictLoader) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
            if isinstance(value, (dict,)):
                value = raw
        _set_path(out, key, value)
        i += 1
    return out


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, mark):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.mark = key, mark


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (SafeLoader keeps the
    last silently). Keys merged in with `<<: *anchor` may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:                   # unhashable: construct_mapping reports it
                    continue
                if duplicate:
                    raise _DuplicateKey(key, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# Integers as YAML 1.2 reads them: YAML 1.1 (PyYAML) reads 010 as 8 (octal) and 1:30 as 90
# (base 60), so `--train.seed=010` trained with seed 8. Decimal (with _ separators), 0o and 0x.
_INT = "tag:yaml.org,2002:int"
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _INT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+(?:_[0-9]+)*|[-+]?0o[0-7]+|[-+]?0x[0-9a-fA-F]+)$"),
                                    list("-+0123456789"))


def _construct_int(loader, node):
    text = loader.construct_scalar(node)
    return int(text, 0 if text.lstrip("+-")[:2].lower() in ("0o", "0x") else 10)


_StrictLoader.add_constructor(_INT, _construct_int)


class _Dumper(yaml.SafeDumper):
    """Quotes what _StrictLoader would read back as another type: a run_name of '0o17' stays a
    string through a checkpoint's config.yaml."""


_Dumper.yaml_implicit_resolvers = _StrictLoader.yaml_implicit_resolvers


def read_yaml(path: str) -> dict:
    if not path:
        raise ConfigError("the config file path is empty")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a folder; give a .yaml file (e.g. configs/quickstart.yaml)")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} is not UTF-8 text (line {line})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"config file {path} has the key {e.key!r} twice (again on line "
                          f"{e.mark.line + 1})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def config_from_dict(data: dict) -> Config:
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def config_data(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> dict:
    """The config file's mapping with the overrides merged in: what the user set."""
    data = read_yaml(path) if path is not None else {}
    return _merge(data, parse_overrides(overrides or []))


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    return config_from_dict(config_data(path, overrides))


# The model sections (or single fields of one) each architecture reads; the others are kept
# in every config (and checkpoint) but change nothing.
MODEL_SECTIONS = ("titans", "hope", "cms")
ARCH_SECTIONS = {"transformer": (), "titans": ("titans",), "hope": ("hope", "cms"),
                 "hope_attention": ("hope.cms", "cms")}


def reads(arch: str, section: str, key: str) -> bool:
    """Whether model.arch reads model.<section>.<key>."""
    return any(part in (section, f"{section}.{key}") for part in ARCH_SECTIONS[arch])


def unread_settings(data: dict, arch: str) -> list[str]:
    """The model.<section>.<key> set in `data` (config_data) that `arch` does not read: a
    setting that silently changed nothing."""
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    return [f"model.{section}.{key}" for section in MODEL_SECTIONS
            if isinstance(model.get(section), dict) for key in model[section] if not reads(arch, section, key)]


def unread_by_choice(m: "ModelConfig") -> dict[str, str]:
    """{<key> under model.: the choice that leaves it unread} for the settings model.arch reads
    in general but this config's variant or switches do not (train.unread_run_settings notes
    the ones a config sets): e.g. titans.window_size under variant mac."""
    off = {}
    if m.arch == "titans":
        t, variant = m.titans, f"model.titans.variant={m.titans.variant}"
        if t.variant != "mac":
            off["titans.segment_size"] = variant
        if t.variant not in ("mag", "mal"):
            off["titans.window_size"] = variant
        if t.variant == "lmm":
            off["titans.n_persistent"] = variant
        if t.memory_depth == 1:                                   # a linear memory W x
            off.update(dict.fromkeys(("titans.memory_expansion", "titans.activation"), "model.titans.memory_depth=1"))
        if t.inner_lr_fixed is not None:
            off["titans.theta_max"] = "model.titans.inner_lr_fixed set"
    if m.arch in ("hope", "hope_attention"):
        if m.arch == "hope" and m.hope.inner_lr_fixed is not None:
            off["hope.eta_max"] = "model.hope.inner_lr_fixed set"
        if m.hope.cms:                                             # the CMS chain replaces the FFN
            off["ffn_mult"] = "model.hope.cms=true (the CMS chain replaces the FFN)"
        else:
            off.update({f"cms.{f.name}": "model.hope.cms=false" for f in dataclasses.fields(CMSConfig)})
    return off


def model_config_from(obj) -> ModelConfig:
    """build_model accepts a ModelConfig, a full Config, a dict (either shape) or a YAML path."""
    if isinstance(obj, ModelConfig):
        return obj
    if isinstance(obj, Config):
        return obj.model
    if isinstance(obj, str):
        obj = read_yaml(obj)
    if isinstance(obj, dict):
        if "model" in obj and isinstance(obj["model"], dict):
            obj = obj["model"]
        return _from_dict(ModelConfig, obj, "model.")
    raise ConfigError(f"cannot build a model config from {type(obj).__name__}")


# tokens of one global batch: 2^31, about 500x a paper run's 128 x 4096
MAX_BATCH_TOKENS = 2**31


def validate(cfg: Config):
    """Cross-field checks that a type check cannot see."""
    t = cfg.train        # single values, and the model's fields, are checked in each section's __post_init__
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    if t.batch_size * (t.seq_len + 1) > MAX_BATCH_TOKENS:      # else numpy fails (or hangs) at the first batch
        raise ConfigError(f"train.batch_size={t.batch_size} sequences of train.seq_len={t.seq_len} are "
                          f"{t.batch_size * (t.seq_len + 1):.3g} tokens a step; at most {MAX_BATCH_TOKENS:.3g}")


def check_vocab(cfg: Config):
    """model.vocab_size holds every id of data.tokenizer: else the ids past the embedding are an
    IndexError mid-run; 0 (the default) becomes the tokenizer's, as the model is built with it.
    For what tokenizes (train.py, a checkpoint's config.yaml, also one written by hand), not in
    validate: a model built alone may have any vocabulary."""
    from data.tokenizer import TOKENIZER_CLASSES     # light: the BPE files load only in get_tokenizer
    ids = TOKENIZER_CLASSES[cfg.data.tokenizer].vocab_size
    if cfg.model.vocab_size and cfg.model.vocab_size < ids:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                          f"{cfg.data.tokenizer} tokenizer's {ids}")
    cfg.model.vocab_size = cfg.model.vocab_size or ids


def dump_yaml(cfg: Config, path: str):
    write_atomic(path, yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False))
