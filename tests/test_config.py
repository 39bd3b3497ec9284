import subprocess
import sys

import pytest

from config import Config, ConfigError, config_from_dict, load_config, model_config_from, parse_overrides
from conftest import REPO


def test_defaults_and_yaml_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  arch: transformer\n  d_model: 64\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config(str(path), ["--train.lr=3e-4", "--model.n_layer", "3", "--logging.wandb=offline",
                                  "--train.resume=never"])
    assert isinstance(cfg, Config)
    assert cfg.model.d_model == 64 and cfg.model.n_layer == 3
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.logging.wandb == "offline" and cfg.train.resume == "never"


def test_int_accepted_for_float_and_nested_sections():
    cfg = config_from_dict({"train": {"lr": 1}, "model": {"titans": {"variant": "mac"}}})
    assert cfg.train.lr == 1.0 and cfg.model.titans.variant == "mac"


@pytest.mark.parametrize("data, message", [
    ({"trian": {}}, "unknown config key 'trian'; valid keys in 'top level': model, data"),
    ({"train": {"max_step": 3}}, "unknown config key 'train.max_step'; valid keys in 'train': max_steps"),
    ({"train": {"max_steps": "ten"}}, "train.max_steps must be int, got 'ten'"),
    ({"train": {"max_steps": 1.5}}, "train.max_steps must be int"),
    ({"model": {"arch": "rnn"}}, "model.arch='rnn' is not one of: transformer, titans, hope, hope_attention"),
    ({"train": {"batch_size": 6, "grad_accum": 4}}, "not divisible by train.grad_accum"),
    ({"model": {"d_model": 100, "n_head": 3}}, "model.d_model=100 is not divisible by model.n_head=3"),
    ({"data": {"tokenizer": "llama"}}, "data.tokenizer='llama' is not one of: gpt2, bytes"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_override_parsing_errors():
    with pytest.raises(ConfigError, match="overrides look like --section.key=value"):
        parse_overrides(["train.lr=3"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.lr"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_model_config_from_accepts_many_shapes(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("model:\n  d_model: 96\n  n_head: 3\n")
    assert model_config_from(str(path)).d_model == 96
    assert model_config_from({"d_model": 32}).d_model == 32
    assert model_config_from({"model": {"d_model": 48}}).d_model == 48
    assert model_config_from(Config()).d_model == Config().model.d_model


def test_every_config_file_parses():
    import glob
    files = sorted(glob.glob(f"{REPO}/configs/*.yaml"))
    assert files
    for path in files:
        load_config(path)


def test_cli_error_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "train.py", "--train.max_stepz=3"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown config key 'train.max_stepz'")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("arch", ["titans", "hope", "hope_attention"])
def test_model_kernels_reaches_every_memory_and_cms_level(arch):
    from cms import CMSLevel
    from memory import NeuralMemory
    from model import build_model
    cfg = load_config(None, [f"--model.arch={arch}", "--model.kernels=torch", "--model.vocab_size=64",
                             "--model.n_layer=1", "--model.d_model=32", "--model.n_head=2"])
    layers = [m for m in build_model(cfg.model).modules() if isinstance(m, (NeuralMemory, CMSLevel))]
    assert layers and {m.backend for m in layers} == {"torch"}
    with pytest.raises(ConfigError, match="model.kernels"):
        load_config(None, ["--model.kernels=cuda"])


@pytest.mark.parametrize("data, message", [
    ({"train": {"max_steps": 0}}, "train.max_steps must be an integer >= 1, got 0"),
    ({"model": {"n_head": -2}}, "model.n_head must be an integer >= 1, got -2"),
    ({"train": {"lr": 0}}, "train.lr must be a number > 0, got 0"),
    ({"train": {"lr": float("nan")}}, "train.lr must be a number > 0, got nan"),
    ({"distributed": {"timeout_s": 0}}, "distributed.timeout_s must be an integer >= 1, got 0"),
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction must be a number in [0, 1), got 1.0"),
    ({"data": {"val_fraction": -0.1}}, "data.val_fraction must be a number in [0, 1), got -0.1"),
    ({"model": {"hope": {"chunk_mem": 0}}}, "model.hope.chunk_mem must be an integer >= 1, got 0"),
    ({"model": {"hope": {"memory_expansion": True}}}, "model.hope.memory_expansion must be int, got True"),
    ({"model": {"hope": {"conv_size": -1}}}, "model.hope.conv_size must be an integer >= 0, got -1"),
    ({"model": {"hope": {"eta_max": 0}}}, "model.hope.eta_max must be a number > 0, got 0.0"),
    ({"model": {"hope": {"inner_lr_fixed": -1}}}, "model.hope.inner_lr_fixed must be a number >= 0 or null, got -1.0"),
    ({"model": {"hope": {"max_grad_norm": 0}}}, "model.hope.max_grad_norm must be a number > 0 or null, got 0.0"),
    ({"model": {"cms": {"chunk_sizes": [8, 0]}}}, "model.cms.chunk_sizes[1] must be an integer >= 1 or null, got 0"),
    ({"model": {"cms": {"chunk_sizes": [2.5]}}}, "model.cms.chunk_sizes[0] must be an integer >= 1 or null, got 2.5"),
    ({"model": {"cms": {"chunk_sizes": []}}}, "model.cms.chunk_sizes must be a non-empty list"),
    ({"model": {"cms": {"hidden_mult": -1}}}, "model.cms.hidden_mult must be a number > 0, got -1.0"),
    ({"model": {"cms": {"inner_lr": "fast"}}}, "model.cms.inner_lr must be a number >= 0, got 'fast'"),
    ({"model": {"cms": {"inner_lr": [None, None]}}}, "model.cms.inner_lr[0] must be a number >= 0, got None"),
    ({"model": {"cms": {"inner_lr": [1e-3, -1]}}}, "model.cms.inner_lr[1] must be a number >= 0 or null, got -1"),
    ({"model": {"cms": {"inner_lr": [1e-3]}}}, "model.cms.inner_lr has 1 entries but model.cms.chunk_sizes has 2"),
])
def test_range_checks_name_the_key_range_and_value(data, message):
    """Every range check (config._check_range) gives one line: key, allowed range, value."""
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_range_checks_pass_edges_and_read_yaml_number_strings():
    """The edges of each range pass; '1e-3' (a string to YAML 1.1) is read as a number;
    a static level's inner_lr may be null; numbers come back as floats."""
    cfg = config_from_dict({"data": {"val_fraction": 0.0}, "distributed": {"timeout_s": 1},
                            "model": {"hope": {"conv_size": 0, "inner_lr_fixed": 0, "max_grad_norm": None},
                                      "cms": {"chunk_sizes": [4, None], "inner_lr": ["1e-3", None]}}})
    assert cfg.model.cms.inner_lr == [1e-3, None] and cfg.model.cms.level_lrs() == [1e-3, None]
    assert cfg.model.hope.inner_lr_fixed == 0.0 and isinstance(cfg.model.hope.inner_lr_fixed, float)
    assert cfg.model.hope.max_grad_norm is None
    from config import CMSConfig, HopeConfig
    assert CMSConfig(inner_lr="2e-3").inner_lr == 2e-3
    with pytest.raises(ConfigError, match=r"^model.hope.chunk_other must be an integer >= 1, got 1.5$"):
        HopeConfig(chunk_other=1.5)                 # built directly: no YAML type check before
    with pytest.raises(ConfigError, match=r"^model.hope.memory_expansion must be an integer >= 1, got True$"):
        HopeConfig(memory_expansion=True)
