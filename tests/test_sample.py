"""sample.py and what it runs on: LanguageModel.generate's argument checks and decode loop, and
checkpoint.load_model's answers for a config made elsewhere (flash-attn, no vocab_size) or a
path that holds no checkpoint. Every model here is an untrained 1-layer byte model (CPU, ms)."""
import os
import shutil
import sys
from contextlib import nullcontext

import pytest
import torch

from helpers import save_tiny_checkpoint

STEP = os.path.join("checkpoints", "step_000000")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A training out_dir holding an untrained byte Transformer (train.seq_len 256)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("sample") / "run")


@pytest.fixture
def run(tiny_run, tmp_path):
    """A fresh copy of tiny_run to edit."""
    return shutil.copytree(tiny_run, str(tmp_path / "run"))


def _edit_config(run, old, new):
    path = os.path.join(run, STEP, "config.yaml")
    with open(path) as f:
        text = f.read()
    assert old in text
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def _sample(capsys, *argv):
    """sample.main on CPU -> (exit status, stdout, stderr)."""
    import sample
    code = sample.main(["--device", "cpu", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _samples(out):
    """The texts of sample.py's output, by sample."""
    return out.split("--- sample ")[1:]


def _one_line(err, *parts):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], lines[0]


# ----------------------------------------------------------------------------------------
# loading: a config made for another machine, a path that is not a checkpoint

def test_a_flash_attention_checkpoint_samples_where_flash_attn_cannot_run(run, capsys, monkeypatch):
    """model.attention=flash (a GPU run's setting) refused every load without flash-attn, with
    advice no sample or eval flag could follow; like model.kernels=triton it is a speed setting,
    so the loaded config takes "auto" where flash-attn is missing or the device is not CUDA."""
    import model
    from checkpoint import _for_device, load_model
    from config import Config, ModelConfig
    _edit_config(run, "attention: auto", "attention: flash")
    monkeypatch.setattr(model, "flash_attn_func", None)             # as on a machine without it
    m, cfg = load_model(run, "cpu")
    assert cfg.model.attention == "auto" and m.config.attention == "auto"
    code, out, err = _sample(capsys, "--checkpoint", run, "--tokens", "2")
    assert code == 0 and err == "" and out.startswith("--- sample 0\n")
    monkeypatch.setattr(model, "flash_attn_func", lambda *a, **k: None)      # installed, but CPU
    assert _for_device(Config(model=ModelConfig(attention="flash")), "cpu").model.attention == "auto"
    assert _for_device(Config(model=ModelConfig(attention="flash")), "cuda").model.attention == "flash"


def test_a_config_without_vocab_size_takes_the_tokenizers_as_train_py_does(run):
    """model.vocab_size missing (0) in a checkpoint's config.yaml was "model.vocab_size must be
    set ..." naming no file; train.py reads 0 as the tokenizer's vocabulary, and so does a load."""
    from checkpoint import load_model
    _edit_config(run, "vocab_size: 257", "vocab_size: 0")
    m, cfg = load_model(run, "cpu")
    assert cfg.model.vocab_size == 257 and m.embed.weight.shape[0] == 257


def test_a_missing_checkpoint_is_named_visibly(run, capsys):
    """--checkpoint '' read "no checkpoint found at  (expected ...": the empty path was invisible."""
    code, _, err = _sample(capsys, "--checkpoint", "")
    assert code == 2
    _one_line(err, "error: no checkpoint found at '' (expected a step_N directory")


def test_an_out_dir_without_latest_names_its_complete_step(run, capsys):
    """An out_dir whose checkpoints/latest is gone (a copy, a save killed before it) but that
    holds a complete step_N/ said only "no checkpoint found": the step to pass is named."""
    os.remove(os.path.join(run, "checkpoints", "latest"))
    os.makedirs(os.path.join(run, "checkpoints", "step_000009"))             # incomplete: no trainer state
    code, _, err = _sample(capsys, "--checkpoint", run)
    assert code == 2
    _one_line(err, f"no checkpoint found at {run}", f"{os.path.join(run, STEP)} is a complete checkpoint: pass that")
    code, out, _ = _sample(capsys, "--checkpoint", os.path.join(run, STEP), "--tokens", "1")
    assert code == 0 and out.startswith("--- sample 0")


# ----------------------------------------------------------------------------------------
# sample.py

def test_sample_i_does_not_depend_on_how_many_are_drawn(tiny_run, capsys):
    """All samples were one batch sampled from one generator, so sample 0 changed with
    --samples; now they are drawn one after another from it."""
    argv = ["--checkpoint", tiny_run, "--tokens", "12", "--temperature", "1", "--top-k", "0", "--prompt", "ab"]
    runs = [_samples(_sample(capsys, *argv, "--samples", str(n))[1]) for n in (1, 2, 3)]
    assert runs[1] == runs[2][:2] and runs[0] == runs[2][:1]
    assert len(set(runs[2])) == 3                                   # and they differ from each other


def test_sample_0_is_train_pys_end_of_training_sample(tiny_run, capsys):
    """train.py's end-of-run sample (model.generate, one generator seeded train.seed) equals
    `sample.py` with its defaults and train's prompt: one model, one sampler."""
    from checkpoint import load_model
    from config import TrainConfig
    from data.tokenizer import get_tokenizer
    from train import sample_after_training
    t = TrainConfig(sample_tokens=20)
    model, _ = load_model(tiny_run, "cpu")
    expected = sample_after_training(model, get_tokenizer("bytes"), t, "cpu", nullcontext())
    code, out, _ = _sample(capsys, "--checkpoint", tiny_run, "--prompt", t.sample_prompt,
                           "--tokens", str(t.sample_tokens), "--seed", str(t.seed))
    assert code == 0 and out == f"--- sample 0\n{expected}\n"


def test_ctrl_c_is_one_line_and_keeps_the_samples_printed(tiny_run, capsys, monkeypatch):
    """Ctrl-C printed a ~40-line traceback and nothing of what was generated: each sample is
    printed as it completes, and Ctrl-C is one line, exit status 130."""
    from model import LanguageModel
    generate_from, calls = LanguageModel.generate_from, []

    def interrupted_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate_from(self, *args, **kwargs)
    monkeypatch.setattr(LanguageModel, "generate_from", interrupted_second)
    code, out, err = _sample(capsys, "--checkpoint", tiny_run, "--tokens", "3", "--samples", "3", "--prompt", "ab")
    assert code == 130 and out.startswith("--- sample 0\nab") and len(_samples(out)) == 1
    _one_line(err, "interrupted after 1 of 3 samples")


def test_a_reader_that_stops_early_ends_it_quietly(tiny_run, capsys, monkeypatch):
    """`sample.py ... | head -c 10`: a BrokenPipeError traceback. stdout here is a pipe whose
    reader is already gone (a pipe of this test, not the process's fd 1, which the fix
    points at devnull)."""
    import sample
    read, write = os.pipe()
    os.close(read)
    with open(write, "w") as broken:
        monkeypatch.setattr(sys, "stdout", broken)
        code = sample.main(["--device", "cpu", "--checkpoint", tiny_run, "--tokens", "2"])
        monkeypatch.undo()
    assert code == 1
    assert capsys.readouterr().err == ""


def test_an_empty_prompt_does_not_print_the_end_of_text_token(capsys, monkeypatch):
    """--prompt '' feeds the end-of-text token (a new document), which GPT-2 decodes to a
    literal "<|endoftext|>" that read like a typed prompt: only the new tokens are printed."""
    import checkpoint
    from config import Config, DataConfig, ModelConfig
    from data.tokenizer import get_tokenizer
    from model import build_model
    try:
        tokenizer = get_tokenizer("gpt2")
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"no GPT-2 BPE files here: {e}")
    cfg = Config(model=ModelConfig(vocab_size=50257, d_model=8, n_layer=1, n_head=2), data=DataConfig(tokenizer="gpt2"))
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    monkeypatch.setattr(checkpoint, "load_model", lambda path, device: (model, cfg))
    code, out, _ = _sample(capsys, "--checkpoint", "x", "--prompt", "", "--tokens", "4")
    new = model.generate(torch.tensor([[tokenizer.eot_id]]), 4, temperature=0.8, top_k=50,
                         generator=torch.Generator().manual_seed(1337), vocab_size=50257)[0, 1:]
    assert code == 0 and out == f"--- sample 0\n{tokenizer.decode(new.tolist())}\n"
    assert "<|endoftext|>" not in out.splitlines()[1][:13]


def test_a_sample_past_the_trained_context_gets_a_note(tiny_run, capsys):
    """An attention model's KV cache went past train.seq_len (256 here) without a word."""
    code, _, err = _sample(capsys, "--checkpoint", tiny_run, "--prompt", "ab", "--tokens", "254")
    assert code == 0 and err == ""
    code, out, err = _sample(capsys, "--checkpoint", tiny_run, "--prompt", "ab", "--tokens", "255")
    assert code == 0 and out.startswith("--- sample 0")
    _one_line(err, "note: prompt + --tokens is 257 tokens, past the 256 this model trained on (train.seq_len)")


def test_a_recurrent_sample_past_the_measured_length_gets_the_evals_note(tmp_path, capsys, monkeypatch):
    """A HOPE model whose settings ModelConfig.long_context_risk names: the evals noted it past
    config.LONG_CONTEXT tokens (eval.common.long_stream_note), sample.py said nothing. The
    threshold is lowered to 8 here so that the sample stays a few tokens."""
    import config
    from checkpoint import save_checkpoint
    from config import Config, DataConfig, HopeConfig, ModelConfig
    from model import build_model
    cfg = Config(model=ModelConfig(arch="hope", vocab_size=257, d_model=32, n_layer=1, n_head=2,
                                   hope=HopeConfig(max_grad_norm=3.0)), data=DataConfig(tokenizer="bytes"))
    assert cfg.model.long_context_risk()
    model = build_model(cfg.model)
    save_checkpoint(str(tmp_path / "checkpoints"), 0, model, torch.optim.AdamW(model.parameters()), {"step": 0}, cfg)
    monkeypatch.setattr(config, "LONG_CONTEXT", 8)
    code, _, err = _sample(capsys, "--checkpoint", str(tmp_path), "--prompt", "ab", "--tokens", "5")
    assert code == 0 and err == ""
    code, _, err = _sample(capsys, "--checkpoint", str(tmp_path), "--prompt", "ab", "--tokens", "6")
    assert code == 0
    _one_line(err, "note: inputs of up to 8 tokens with model.hope.max_grad_norm=3.0")


def test_too_many_tokens_are_one_line_before_anything_is_generated(tiny_run, capsys, monkeypatch):
    """--samples 100000000 built a list of 10^10 ids and died of OOM with a traceback: a sample
    is held up to eval.common.MAX_CONTEXT_TOKENS, all of them up to config.MAX_BATCH_TOKENS
    (lowered here, so that the test generates nothing big)."""
    import config
    import eval.common
    monkeypatch.setattr(eval.common, "MAX_CONTEXT_TOKENS", 50)
    code, out, err = _sample(capsys, "--checkpoint", tiny_run, "--prompt", "ab", "--tokens", "49")
    assert code == 2 and out == ""
    _one_line(err, "error: --prompt (2 tokens) + --tokens 49 is 51 tokens a sample; at most 50")
    monkeypatch.setattr(config, "MAX_BATCH_TOKENS", 3000)       # the checkpoint's training batch still fits
    code, out, err = _sample(capsys, "--checkpoint", tiny_run, "--prompt", "ab", "--tokens", "8", "--samples", "301")
    assert code == 2 and out == ""
    _one_line(err, "error: --samples 301 of 10 tokens are 3.01e+03 tokens; at most 3e+03")


def test_out_of_memory_is_one_line_and_keeps_the_samples_printed(tiny_run, capsys, monkeypatch):
    """A sample too long for the device (a KV cache), a prompt too long, or a model too large
    for it: one line."""
    import checkpoint
    from model import LanguageModel
    generate_from, forward, calls = LanguageModel.generate_from, LanguageModel.forward, []

    def oom_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore")
        return generate_from(self, *args, **kwargs)
    monkeypatch.setattr(LanguageModel, "generate_from", oom_second)
    code, out, err = _sample(capsys, "--checkpoint", tiny_run, "--tokens", "3", "--samples", "3")
    assert code == 2 and len(_samples(out)) == 1
    _one_line(err, "error: out of memory drawing sample 1 (1 prompt + 3 new tokens) on cpu: lower --tokens")

    def oom_prompt(self, idx, *args, **kwargs):
        if idx.shape[1] > 1:                                # the prompt's forward, not a new token's
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore")
        return forward(self, idx, *args, **kwargs)
    monkeypatch.setattr(LanguageModel, "forward", oom_prompt)
    code, out, err = _sample(capsys, "--checkpoint", tiny_run, "--tokens", "3", "--prompt", "abc")
    assert code == 2 and out == ""
    _one_line(err, "error: out of memory reading the prompt (3 tokens) on cpu: shorten --prompt")

    def oom(path, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore")
    monkeypatch.setattr(checkpoint, "load_model", oom)
    code, out, err = _sample(capsys, "--checkpoint", tiny_run)
    assert code == 2 and out == ""
    _one_line(err, f"error: out of memory loading {tiny_run} on cpu")


# ----------------------------------------------------------------------------------------
# LanguageModel.generate

def _tiny(arch="transformer"):
    from model import build_model
    torch.manual_seed(0)
    return build_model({"arch": arch, "vocab_size": 61, "n_layer": 1, "n_head": 2, "d_model": 32,
                        "init_std": 0.5}).eval()


@pytest.mark.parametrize("arch", ["transformer", "hope"])
def test_generate_runs_no_forward_after_the_last_token_and_draws_the_same(arch, monkeypatch):
    """One forward for the prompt and one per new token but the last (whose logits nothing
    reads: the extra forward doubled --tokens 1); the tokens are those drawn before."""
    m = _tiny(arch)
    idx = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(1))
    # a forward that was skipped changes no draw: n tokens are the first n of n + 1 (the loop
    # before drew both alike, the n + 1st from the forward now skipped at n)
    for kwargs in ({"temperature": 0}, {"temperature": 0.8, "top_k": 10, "vocab_size": 50}):
        longer = m.generate(idx, 7, generator=torch.Generator().manual_seed(2), **kwargs)
        assert torch.equal(m.generate(idx, 6, generator=torch.Generator().manual_seed(2), **kwargs), longer[:, :-1])
    forward, calls = type(m).forward, []
    monkeypatch.setattr(type(m), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    for n, forwards in ((0, 1), (1, 1), (4, 4)):
        calls.clear()
        assert m.generate(idx, n).shape == (2, 5 + n)
        assert len(calls) == forwards


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0; got -1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 0; got 2.5"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 0; got True"),
    ({"temperature": float("nan")}, "temperature must be a finite number, 0 (greedy) or >= 1e-06; got nan"),
    ({"temperature": float("inf")}, "temperature must be a finite number, 0 (greedy) or >= 1e-06; got inf"),
    ({"temperature": 1e-7}, "temperature must be a finite number, 0 (greedy) or >= 1e-06; got 1e-07"),
    ({"temperature": "hot"}, "temperature must be a finite number, 0 (greedy) or >= 1e-06; got 'hot'"),
], ids=str)
def test_generate_refuses_bad_arguments_in_one_line(kwargs, message):
    """A negative max_new_tokens returned the prompt silently; a NaN or tiny temperature gave NaN
    probabilities (a multinomial RuntimeError)."""
    m = _tiny()
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError) as e:
        m.generate(torch.zeros(1, 2, dtype=torch.long), **kwargs)
    assert str(e.value) == message


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_generate_names_the_token_whose_logits_are_not_finite(temperature, monkeypatch):
    """NaN logits (a diverged model): multinomial raised a RuntimeError (a device-side assert on
    CUDA) and greedy decoding picked a token silently."""
    m = _tiny()
    head, calls = m.head.forward, []

    def nan_from_the_second_call(x):
        calls.append(1)
        y = head(x)
        return y.fill_(float("nan")) if len(calls) >= 2 else y
    monkeypatch.setattr(m.head, "forward", nan_from_the_second_call)
    with pytest.raises(ValueError) as e:
        m.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=temperature)
    assert str(e.value) == ("the model's logits are not finite (NaN or inf) at new token 2 of 5 "
                            "(stream position 4): it has diverged")
