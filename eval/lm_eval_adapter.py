"""
Our models inside EleutherAI's lm-evaluation-harness (optional: pip install -r requirements-eval.txt),
for the zero-shot table of Titans Table 1 / NL Table 2 (reference/evals.md §3):

    from eval.lm_eval_adapter import OurLM
    import lm_eval
    lm = OurLM.from_checkpoint("out/run", device="cuda")
    lm_eval.simple_evaluate(model=lm, tasks=["wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande",
                                             "arc_easy", "arc_challenge", "social_iqa", "boolq"], num_fewshot=0)

`OurLM` is an `lm_eval.api.model.LM` subclass, created on first access so this module
imports without lm-eval. All the scoring is eval/perplexity.py's (the same code as our own
WikiText / LAMBADA evaluator, so the numbers agree):
  loglikelihood          (context, continuation) -> (sum log p, is_greedy): lm-eval's
                         _encode_pair, then loglikelihood_tokens (max_len = training context)
  loglikelihood_rolling  (text,) -> sum log p of every token: rolling_windows with the
                         end-of-text token as the first token's context
  generate_until         (context, {"until", "max_gen_toks", ...}) -> greedy text, cut at
                         the first stop string; recurrent models read the whole context
                         with the state carried, attention models its last
                         max_len - max_gen_toks tokens (max_gen_toks >= max_len is an error).
                         As lm-eval 0.4.13 reads it: empty stop strings are skipped; the
                         length is the first of max_gen_toks, max_new_tokens, max_tokens,
                         max_completion_tokens that is set (else the adapter's max_gen_toks),
                         a whole number >= 0 (else an error naming the key);
                         do_sample=False with a temperature > 0 warns and stays greedy;
                         sampling (do_sample=True, or a temperature > 0 alone) is an error.
`LMAdapter` holds that logic without lm-eval (tests use it with Instance-like objects).
"""
from __future__ import annotations

import warnings

import torch

from eval.common import greedy_generate, is_recurrent, load_checkpoint, model_device, prefill, prompt_room
from eval.perplexity import encode_pair, loglikelihood_tokens, rolling_windows

INSTALL_HINT = "lm-eval is not installed: pip install -r requirements-eval.txt"
DEFAULT_MAX_GEN_TOKS = 256
# lm-eval 0.4.13's names for the answer length, the first one set wins
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def _args(request):
    """lm-eval passes Instance objects (their .args tuple); plain tuples work too."""
    return request.args if hasattr(request, "args") else tuple(request)


class LMAdapter:
    """The three request types of lm-eval's LM API on one of our models."""

    def __init__(self, model, tokenizer, max_len: int, device=None, batch_size: int = 8,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, segment_len: int = 2048):
        if max_len < 1 or batch_size < 1 or max_gen_toks < 1:
            raise ValueError("max_len, batch_size and max_gen_toks must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_len = max_len
        self._device = torch.device(device) if device is not None else model_device(model)
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.segment_len = segment_len

    @classmethod
    def from_checkpoint(cls, path, device="auto", **kwargs):
        """The adapter over a checkpoint dir, training out_dir or exported .safetensors, loaded
        as every eval CLI loads it (eval.common.load_checkpoint): its own tokenizer, device
        auto|cpu|cuda[:N], the same one-line errors for a missing checkpoint or a bad device."""
        model, cfg, tokenizer, device = load_checkpoint(path, str(device))
        return cls(model, tokenizer, cfg.train.seq_len, device=device, **kwargs)

    # lm-eval reads these
    @property
    def device(self):
        """lm-eval's LM (0.4.13) has a read-only `device` property over `_device`: assigning
        self.device would fail there, so this class keeps `_device` too."""
        return self._device

    @property
    def eot_token_id(self):
        return self.tokenizer.eot_id

    @property
    def max_length(self):
        return self.max_len

    def tok_encode(self, text: str, **kwargs) -> list:
        return self.tokenizer.encode(text)

    def tok_decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list:
        pairs = []
        for request in requests:
            context, continuation = _args(request)[:2]
            pairs.append(encode_pair(self.tokenizer, context, continuation))
        return loglikelihood_tokens(self.model, pairs, max_len=self.max_len, device=self.device,
                                    batch_size=self.batch_size, progress=not disable_tqdm and len(pairs) > 1000)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        windows, owner = [], []
        for i, request in enumerate(requests):
            for window in rolling_windows(self.tokenizer.encode(_args(request)[0]), self.tokenizer.eot_id,
                                          self.max_len):
                windows.append(window)
                owner.append(i)
        scores = loglikelihood_tokens(self.model, windows, max_len=self.max_len, device=self.device,
                                      batch_size=self.batch_size, progress=not disable_tqdm and len(windows) > 1000)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        return totals

    def _generation_args(self, request) -> tuple:
        """-> (context, stop strings, max new tokens) of one request, read as lm-eval 0.4.13's
        normalize_gen_kwargs reads them; only greedy decoding is supported."""
        context, gen_kwargs = _args(request)[:2]
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until")
        until = [until] if isinstance(until, str) else list(until or [])
        until = [s for s in until if s]            # lm-eval skips '' (e.g. an end-of-text that decodes to '')
        key, size = next(((k, gen_kwargs[k]) for k in MAX_TOKEN_KEYS if gen_kwargs.get(k) is not None),
                         ("max_gen_toks", self.max_gen_toks))
        try:
            max_new = int(size)
        except (TypeError, ValueError):
            max_new = -1
        if max_new < 0:     # a negative length would widen an attention model's prompt past max_len
            raise ValueError(f"generate_until: {key} must be a whole number >= 0, got {size!r}")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = gen_kwargs.get("do_sample")
        if do_sample or (do_sample is None and temperature > 0):
            raise ValueError("generate_until: only greedy decoding is supported (do_sample=False, temperature=0)")
        if temperature > 0:                        # do_sample=False wins, as in lm-eval
            warnings.warn(f"generate_until: do_sample=False with temperature={temperature}: decoding greedily")
        if not is_recurrent(self.model) and self.max_len <= max_new:
            raise ValueError(f"generate_until: max_gen_toks {max_new} leaves no room for the prompt in the "
                             f"model's context of {self.max_len} tokens; ask for fewer")
        return context, until, max_new

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        jobs = [self._generation_args(request) for request in requests]   # bad arguments fail before any work
        outputs = []
        for context, until, max_new in jobs:
            ids = self.tokenizer.encode(context) if context else []
            ids = ids or [self.tokenizer.eot_id]
            if not is_recurrent(self.model):       # attention: keep room for the answer in the context
                ids = ids[-prompt_room(self.max_len, max_new):]
            last, state = prefill(self.model, ids, self.segment_len, self.device)
            stop = (lambda text: any(s in text for s in until)) if until else None
            text = greedy_generate(self.model, self.tokenizer, last, state, max_new, self.device, stop=stop)
            for s in until:                        # lm-eval cuts at the first stop string
                text = text.split(s)[0]
            outputs.append(text)
        return outputs


_OUR_LM = None


def _make_our_lm():
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise ImportError(INSTALL_HINT) from None

    class OurLM(LMAdapter, LM):
        """lm_eval.api.model.LM over one of our models (see the module docstring)."""

        def __init__(self, model, tokenizer, max_len: int, **kwargs):
            LM.__init__(self)
            LMAdapter.__init__(self, model, tokenizer, max_len, **kwargs)

    return OurLM


def __getattr__(name):
    """`OurLM` is built on first access (PEP 562), so importing this module needs no lm-eval."""
    global _OUR_LM
    if name == "OurLM":
        if _OUR_LM is None:
            _OUR_LM = _make_our_lm()
        return _OUR_LM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":          # a library: say so rather than exit 0 having done nothing
    import sys
    print("error: eval.lm_eval_adapter has no command line; the zero-shot tasks run with "
          "python -m eval.reproduce zeroshot --checkpoint RUN --out DIR (docs/REPRODUCE.md)", file=sys.stderr)
    sys.exit(2)
