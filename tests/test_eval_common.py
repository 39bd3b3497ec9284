"""eval/common.py and the long-input helpers every eval shares (eval.babilong): device names,
eval mode restored, the CLIs' exit on bad input, and which prompt tokens a model reads."""
import pytest
import torch

from eval.babilong import check_long_inputs, fit_prompt, mean_over_scored
from eval.common import (context_limit, eval_mode, exit_on_error, is_recurrent, load_checkpoint, model_device,
                         resolve_device)


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
