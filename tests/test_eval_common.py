"""eval/common.py: device names, eval mode restored, the CLIs' exit on bad input, and the
long-input helpers eval.babilong and eval.niah share (which prompt tokens a model reads)."""
import pytest
import torch

from eval.common import (bf16_autocast, check_long_inputs, context_handling, context_limit, eval_mode, exit_on_error,
                         fit_prompt, is_recurrent, load_checkpoint, mean_over_scored, model_device, resolve_device)


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_eval_mode_restores_the_mode_even_after_an_error():
    model = torch.nn.Dropout(0.5)
    for was_training in (True, False):
        model.train(was_training)
        with pytest.raises(RuntimeError):
            with eval_mode(model):
                assert not model.training
                raise RuntimeError("inside")
        assert model.training == was_training


def test_model_kind_and_device():
    class Config:
        arch = "titans"
    model = torch.nn.Linear(2, 2)
    assert model_device(model) == torch.device("cpu") and model_device(torch.nn.ReLU()) == torch.device("cpu")
    assert not is_recurrent(model) and context_limit(model, 256) == 256     # attention: its context
    model.config = Config()
    assert is_recurrent(model) and context_limit(model, 256) is None        # recurrent: streams


def test_exit_on_error_only_for_the_named_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        with exit_on_error(FileNotFoundError, ValueError):
            raise ValueError("--samples must be >= 1")
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: --samples must be >= 1\n"
    with pytest.raises(KeyError):
        with exit_on_error(FileNotFoundError, ValueError):
            raise KeyError("a bug is not bad input")


def test_load_checkpoint_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .* not found"):
        load_checkpoint(str(tmp_path / "none"), "cpu")


def test_fit_prompt_truncates_or_skips_only_attention_models():
    ids = list(range(10))
    assert fit_prompt(ids, True, 4, 2, "skip") == (ids, False)                # streaming reads it all
    assert fit_prompt(ids, False, 10, 2, "skip") == (ids, False)              # fits
    assert fit_prompt(ids, False, 6, 2, "truncate") == ([6, 7, 8, 9], True)   # room for 2 answer tokens
    assert fit_prompt(ids, False, 2, 5, "truncate") == ([9], True)            # at least one token
    assert fit_prompt(ids, False, 6, 2, "skip") == (None, False)


def test_check_long_inputs_and_mean_over_scored():
    model = torch.nn.Linear(2, 2)
    assert check_long_inputs(model, "truncate", None, 8) is False
    assert check_long_inputs(model, "skip", True, None) is True
    with pytest.raises(ValueError, match="needs max_len"):
        check_long_inputs(model, "truncate", None, None)
    with pytest.raises(ValueError, match="overflow"):
        check_long_inputs(model, "drop", True, 8)
    assert mean_over_scored([{"ok": True}, {"ok": False}, {"ok": True}, {"ok": True}], "ok") == 0.75
    assert mean_over_scored([], "ok") is None


def test_context_handling_says_what_fit_prompt_does():
    ids = list(range(10))
    assert context_handling(True, None, 64, "skip", 2) == \
        "streamed: whole input in segments of 64 tokens with the state carried"
    kept = len(fit_prompt(ids, False, 6, 2, "truncate")[0])
    assert context_handling(False, 6, 64, "truncate", 2) == \
        f"attention: inputs over 6 tokens truncated to their last {kept}"
    assert context_handling(False, 6, 64, "skip", 2) == "attention: inputs over 6 tokens skipped"


def test_bf16_autocast_only_on_cuda():
    with bf16_autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
    if torch.cuda.is_available():
        with bf16_autocast("cuda", "auto"):
            assert torch.get_autocast_dtype("cuda") == torch.bfloat16 and torch.is_autocast_enabled("cuda")
        with bf16_autocast("cuda", "float32"):
            assert not torch.is_autocast_enabled("cuda")
