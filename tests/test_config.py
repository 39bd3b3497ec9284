import subprocess
import sys

import pytest

from config import (Config, ConfigError, ModelConfig, TitansConfig, config_from_dict, load_config, model_config_from,
                    parse_overrides, read_yaml)
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
    ({"model": {"arch": "titans", "titans": {"variant": "mag"}, "d_model": 30, "n_head": 2}},
     "head dim d_model/n_head=15 must be even for RoPE"),
    ({"data": {"tokenizer": "llama"}}, "data.tokenizer='llama' is not one of: gpt2, bytes"),
    ({"eval": {"during_training": ["perplexity", "bogus"]}},
     "eval.during_training has unknown eval(s) ['bogus']; valid: perplexity, babilong_quick"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ["transformer", "titans", "hope"])
def test_build_model_checks_the_head_split(arch):
    """build_model(dict) checks what config files get checked: Transformer++ and Titans built
    d_model 66 with 4 heads and failed at their first forward with a reshape error."""
    from model import build_model
    with pytest.raises(ConfigError, match=r"^model.d_model=66 is not divisible by model.n_head=4$"):
        build_model({"arch": arch, "vocab_size": 16, "d_model": 66, "n_head": 4})
    with pytest.raises(ConfigError, match=r"^head dim d_model/n_head=9 must be even for RoPE$"):
        build_model({"arch": "transformer", "vocab_size": 16, "d_model": 18, "n_head": 2})


def test_check_vocab_names_ids_past_the_embedding():
    """ids past the embedding were an IndexError in the first step (train) or the first
    forward of an edited checkpoint (sample, every eval)."""
    from config import check_vocab
    for data, message in [({"model": {"vocab_size": 257}}, "model.vocab_size=257 is smaller than the gpt2 tokenizer's 50257"),
                          ({"model": {"vocab_size": 256}, "data": {"tokenizer": "bytes"}},
                           "model.vocab_size=256 is smaller than the bytes tokenizer's 257")]:
        with pytest.raises(ConfigError, match=f"^{message}$"):
            check_vocab(config_from_dict(data))
    for vocab_size, kept in ((0, 257), (257, 257), (50304, 50304)):      # 0: the tokenizer's, as train.py builds it
        cfg = config_from_dict({"model": {"vocab_size": vocab_size}, "data": {"tokenizer": "bytes"}})
        check_vocab(cfg)
        assert cfg.model.vocab_size == kept


def test_override_parsing_errors():
    with pytest.raises(ConfigError, match="overrides look like --section.key=value"):
        parse_overrides(["train.lr=3"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.lr"])
    # a value left out before the next override: out_dir became the folder '--train.max_steps=1'
    with pytest.raises(ConfigError, match=r"^override '--train.out_dir' has no value; use --train.out_dir=VALUE$"):
        parse_overrides(["--train.out_dir", "--train.max_steps=1"])
    assert parse_overrides(["--train.lr", "-1"]) == {"train": {"lr": -1}}    # a negative value is a value
    # a config file after the overrides (torchtitan's order) was told to look like an override
    with pytest.raises(ConfigError, match=r"^unexpected argument 'configs/hope_tiny.yaml': the config file comes "
                                          r"first, before the --section.key=value overrides$"):
        parse_overrides(["--train.max_steps=1", "configs/hope_tiny.yaml"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="is a folder; give a .yaml file"):
        load_config(str(tmp_path))
    with pytest.raises(ConfigError, match="^the config file path is empty$"):   # train.py "$CFG", CFG unset
        load_config("")
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
    ({"train": {"lr": 0}}, "train.lr must be a finite number in (0, 1e+18], got 0"),
    ({"train": {"lr": float("nan")}}, "train.lr must be a finite number in (0, 1e+18], got nan"),
    ({"distributed": {"timeout_s": 0}}, "distributed.timeout_s must be an integer in [1, 1000000000], got 0"),
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction must be a finite number in (0, 1), got 1.0"),
    ({"data": {"val_fraction": -0.1}}, "data.val_fraction must be a finite number in (0, 1), got -0.1"),
    ({"data": {"val_fraction": 0}}, "data.val_fraction must be a finite number in (0, 1), got 0.0"),
    ({"model": {"hope": {"chunk_mem": 0}}}, "model.hope.chunk_mem must be an integer >= 1, got 0"),
    ({"model": {"hope": {"memory_expansion": True}}}, "model.hope.memory_expansion must be int, got True"),
    ({"model": {"hope": {"conv_size": -1}}}, "model.hope.conv_size must be an integer >= 0, got -1"),
    ({"model": {"hope": {"eta_max": 0}}}, "model.hope.eta_max must be a finite number in (0, 1e+18], got 0.0"),
    ({"model": {"hope": {"inner_lr_fixed": -1}}}, "model.hope.inner_lr_fixed must be a finite number in [0, 1e+18] or null, got -1.0"),
    ({"model": {"hope": {"max_grad_norm": 0}}}, "model.hope.max_grad_norm must be a finite number in (0, 1e+18] or null, got 0.0"),
    ({"model": {"cms": {"chunk_sizes": [8, 0]}}}, "model.cms.chunk_sizes[1] must be an integer >= 1 or null, got 0"),
    ({"model": {"cms": {"chunk_sizes": [2.5]}}}, "model.cms.chunk_sizes[0] must be an integer >= 1 or null, got 2.5"),
    ({"model": {"cms": {"chunk_sizes": []}}}, "model.cms.chunk_sizes must be a non-empty list"),
    ({"model": {"cms": {"hidden_mult": -1}}}, "model.cms.hidden_mult must be a finite number > 0, got -1.0"),
    ({"model": {"cms": {"inner_lr": "fast"}}}, "model.cms.inner_lr must be a finite number in [0, 1e+18], got 'fast'"),
    ({"model": {"cms": {"inner_lr": [None, None]}}}, "model.cms.inner_lr[0] must be a finite number in [0, 1e+18], got None"),
    ({"model": {"cms": {"inner_lr": [1e-3, -1]}}}, "model.cms.inner_lr[1] must be a finite number in [0, 1e+18] or null, got -1"),
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
    cfg = config_from_dict({"data": {"val_fraction": 1e-9}, "distributed": {"timeout_s": 1},
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


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("section, key, value, message", [
    # train
    ("train", "batch_size", 0, "train.batch_size must be an integer >= 1, got 0"),
    ("train", "grad_accum", 0, "train.grad_accum must be an integer >= 1, got 0"),
    ("train", "seq_len", -1, "train.seq_len must be an integer >= 1, got -1"),
    ("train", "lr", INF, "train.lr must be a finite number in (0, 1e+18], got inf"),
    ("train", "lr", "-inf", "train.lr must be a finite number in (0, 1e+18], got -inf"),
    ("train", "lr", 10 ** 400, "train.lr must be a finite number, got 1000"),
    ("train", "eval_every", -1, "train.eval_every must be an integer >= 0, got -1"),
    ("train", "eval_batch_size", -1, "train.eval_batch_size must be an integer >= 0, got -1"),
    ("train", "eval_batches", 0, "train.eval_batches must be an integer >= 1, got 0"),
    ("train", "ckpt_every", -5, "train.ckpt_every must be an integer >= 0, got -5"),
    ("train", "keep_checkpoints", -1, "train.keep_checkpoints must be an integer >= 0, got -1"),
    ("train", "log_every", 0, "train.log_every must be an integer >= 1, got 0"),
    ("train", "max_bad_steps", 0, "train.max_bad_steps must be an integer >= 1, got 0"),
    ("train", "sample_tokens", -1, "train.sample_tokens must be an integer >= 0, got -1"),
    ("train", "seed", -1, "train.seed must be an integer in [0, 4294967296), got -1"),
    ("train", "seed", 2 ** 32, "train.seed must be an integer in [0, 4294967296), got 4294967296"),
    ("train", "sample_prompt", "\udcff", "train.sample_prompt is not UTF-8 text, got '\\udcff'"),
    # optim
    ("optim", "warmup_steps", -1, "optim.warmup_steps must be an integer >= 0, got -1"),
    ("optim", "grad_clip", -1, "optim.grad_clip must be a finite number >= 0, got -1.0"),
    ("optim", "grad_clip", NAN, "optim.grad_clip must be a finite number >= 0, got nan"),
    ("optim", "grad_clip", INF, "optim.grad_clip must be a finite number >= 0, got inf"),
    ("optim", "min_lr_ratio", 1.5, "optim.min_lr_ratio must be a finite number in [0, 1], got 1.5"),
    ("optim", "min_lr_ratio", -0.1, "optim.min_lr_ratio must be a finite number in [0, 1], got -0.1"),
    ("optim", "decay_fraction", 1.01, "optim.decay_fraction must be a finite number in [0, 1], got 1.01"),
    ("optim", "decay_fraction", NAN, "optim.decay_fraction must be a finite number in [0, 1], got nan"),
    ("optim", "beta1", 1.0, "optim.beta1 must be a finite number in [0, 1), got 1.0"),
    ("optim", "beta2", -0.5, "optim.beta2 must be a finite number in [0, 1), got -0.5"),
    ("optim", "eps", 0, "optim.eps must be a finite number > 0, got 0.0"),
    ("optim", "eps", INF, "optim.eps must be a finite number > 0, got inf"),
    ("optim", "weight_decay", -0.1, "optim.weight_decay must be a finite number in [0, 1e+18], got -0.1"),
    ("optim", "momentum", 1.0, "optim.momentum must be a finite number in [0, 1) or null, got 1.0"),
    ("optim", "ns_steps", 0, "optim.ns_steps must be an integer >= 1, got 0"),
    ("optim", "m3_frequency", 0, "optim.m3_frequency must be an integer >= 1, got 0"),
    ("optim", "m3_beta3", 1.0, "optim.m3_beta3 must be a finite number in [0, 1), got 1.0"),
    ("optim", "m3_alpha", -1, "optim.m3_alpha must be a finite number in [0, 1e+18], got -1.0"),
    ("optim", "m3_update_rms", INF, "optim.m3_update_rms must be a finite number in [0, 1e+18], got inf"),
    ("optim", "dmgd_hidden", 0, "optim.dmgd_hidden must be an integer >= 1, got 0"),
    ("optim", "dmgd_inner_lr", -1, "optim.dmgd_inner_lr must be a finite number in [0, 1e+18], got -1.0"),
    ("optim", "delta_strength", NAN, "optim.delta_strength must be a finite number in [0, 1e+18], got nan"),
    # model
    ("model", "ffn_mult", 0, "model.ffn_mult must be a finite number > 0, got 0.0"),
    ("model", "ffn_mult", INF, "model.ffn_mult must be a finite number > 0, got inf"),
    ("model", "ffn_multiple_of", 0, "model.ffn_multiple_of must be an integer >= 1, got 0"),
    ("model", "init_std", -0.02, "model.init_std must be a finite number in (0, 1e+18], got -0.02"),
    ("model", "init_std", NAN, "model.init_std must be a finite number in (0, 1e+18], got nan"),
    ("model", "rope_theta", 0.5, "model.rope_theta must be a finite number >= 1, got 0.5"),
    ("model", "rope_theta", INF, "model.rope_theta must be a finite number >= 1, got inf"),
    ("model", "norm_eps", 0, "model.norm_eps must be a finite number > 0, got 0.0"),
    ("model", "norm_eps", NAN, "model.norm_eps must be a finite number > 0, got nan"),
    ("model", "max_seq_len", 0, "model.max_seq_len must be an integer >= 1, got 0"),
    ("model", "d_model", 0, "model.d_model must be an integer >= 1, got 0"),
    ("model", "n_layer", 0, "model.n_layer must be an integer >= 1, got 0"),
    ("model", "vocab_size", -1, "model.vocab_size must be an integer >= 0, got -1"),
    # model.titans
    ("model.titans", "theta_max", NAN, "model.titans.theta_max must be a finite number in (0, 1e+18], got nan"),
    ("model.titans", "theta_max", INF, "model.titans.theta_max must be a finite number in (0, 1e+18], got inf"),
    ("model.titans", "theta_max", 0, "model.titans.theta_max must be a finite number in (0, 1e+18], got 0.0"),
    ("model.titans", "max_grad_norm", NAN, "model.titans.max_grad_norm must be a finite number in (0, 1e+18] or null, got nan"),
    ("model.titans", "inner_lr_fixed", INF, "model.titans.inner_lr_fixed must be a finite number in [0, 1e+18] or null, got inf"),
    ("model.titans", "memory_depth", 3, "model.titans.memory_depth must be 1 or 2, got 3"),
    ("model.titans", "chunk_size", 0, "model.titans.chunk_size must be an integer >= 1, got 0"),
    ("model.titans", "window_size", 0, "model.titans.window_size must be an integer >= 1, got 0"),
    ("model.titans", "n_persistent", -1, "model.titans.n_persistent must be an integer >= 0, got -1"),
    # model.hope, model.cms
    ("model.hope", "eta_max", INF, "model.hope.eta_max must be a finite number in (0, 1e+18], got inf"),
    ("model.hope", "max_grad_norm", NAN, "model.hope.max_grad_norm must be a finite number in (0, 1e+18] or null, got nan"),
    ("model.hope", "inner_lr_fixed", INF, "model.hope.inner_lr_fixed must be a finite number in [0, 1e+18] or null, got inf"),
    ("model.cms", "inner_lr", INF, "model.cms.inner_lr must be a finite number in [0, 1e+18], got inf"),
    ("model.cms", "inner_lr", [NAN, None], "model.cms.inner_lr[0] must be a finite number in [0, 1e+18], got nan"),
    ("model.cms", "hidden_mult", INF, "model.cms.hidden_mult must be a finite number > 0, got inf"),
    # data
    ("data", "max_docs", 1, "data.max_docs must be an integer in [2, 1000000000000000000] or null, got 1"),
    ("data", "num_workers", -1, "data.num_workers must be an integer >= 0, got -1"),
    ("data", "val_fraction", NAN, "data.val_fraction must be a finite number in (0, 1), got nan"),
    ("data", "max_docs", 2**63, "data.max_docs must be an integer in [2, 1000000000000000000] or null"),
    # past these an fp32 square, a tensor or a timedelta overflows (tracebacks at step 1)
    ("model.titans", "max_grad_norm", 1e30, "model.titans.max_grad_norm must be a finite number in (0, 1e+18] or null"),
    ("model.hope", "max_grad_norm", 1e30, "model.hope.max_grad_norm must be a finite number in (0, 1e+18] or null"),
    ("model.hope", "inner_lr_fixed", 1e308, "model.hope.inner_lr_fixed must be a finite number in [0, 1e+18] or null"),
    ("distributed", "timeout_s", 10**14, "distributed.timeout_s must be an integer in [1, 1000000000]"),
    # scales past fp32's range were NaN at step 1 (review): capped as the inner clips
    ("model.titans", "theta_max", 1e39, "model.titans.theta_max must be a finite number in (0, 1e+18], got 1e+39"),
    ("model.hope", "eta_max", 1e39, "model.hope.eta_max must be a finite number in (0, 1e+18], got 1e+39"),
    ("model.cms", "inner_lr", 1e39, "model.cms.inner_lr must be a finite number in [0, 1e+18], got 1e+39"),
    ("model.cms", "inner_lr", [1e39, None], "model.cms.inner_lr[0] must be a finite number in [0, 1e+18], got 1e+39"),
    ("model", "init_std", 1e39, "model.init_std must be a finite number in (0, 1e+18], got 1e+39"),
    ("model", "rope_theta", 1e-300, "model.rope_theta must be a finite number >= 1, got 1e-300"),
    ("train", "lr", 1e39, "train.lr must be a finite number in (0, 1e+18], got 1e+39"),
    ("optim", "weight_decay", 1e39, "optim.weight_decay must be a finite number in [0, 1e+18], got 1e+39"),
    ("train", "batch_size", 2**62, "train.batch_size=4611686018427387904 sequences of train.seq_len=256 are 1.19e+21 "
                                   "tokens a step; at most 2.15e+09"),
])
def test_every_range_is_checked_at_load(section, key, value, message):
    """Each value outside its range fails at config load with one line naming key, range and value."""
    data: dict = {}
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_range_edges_and_off_values_pass():
    """The documented off values (0 = no evals / checkpoints / clipping / warmup / sample,
    keep all checkpoints) and the closed ends of [0, 1] pass."""
    cfg = config_from_dict({
        "train": {"eval_every": 0, "eval_batch_size": 0, "ckpt_every": 0, "keep_checkpoints": 0, "sample_tokens": 0,
                  "log_every": 1, "max_bad_steps": 1, "eval_batches": 1},
        "optim": {"grad_clip": 0, "warmup_steps": 0, "min_lr_ratio": 1, "decay_fraction": 0,
                  "beta1": 0, "weight_decay": 0, "momentum": 0.0, "m3_update_rms": 0},
        "model": {"vocab_size": 0, "ffn_multiple_of": 1, "titans": {"memory_depth": 1, "inner_lr_fixed": 0,
                                                                     "max_grad_norm": None}},
        "data": {"max_docs": 2, "val_fraction": 0.999}})
    assert cfg.optim.min_lr_ratio == 1.0 and isinstance(cfg.optim.min_lr_ratio, float)
    assert cfg.train.keep_checkpoints == 0 and cfg.optim.grad_clip == 0.0
    assert config_from_dict({"optim": {"min_lr_ratio": 0, "decay_fraction": 1}}).optim.decay_fraction == 1.0


def test_sections_built_directly_are_checked():
    """The checks live in each section's __post_init__: a section built in code is checked too."""
    from config import DataConfig, ModelConfig, OptimConfig, TitansConfig, TrainConfig
    for build, message in [(lambda: TrainConfig(log_every=0), r"^train.log_every must be an integer >= 1, got 0$"),
                           (lambda: OptimConfig(beta1=1.0), r"^optim.beta1 must be a finite number in \[0, 1\), got 1.0$"),
                           (lambda: ModelConfig(ffn_multiple_of=0), r"^model.ffn_multiple_of must be an integer >= 1"),
                           (lambda: TitansConfig(memory_depth=True), r"^model.titans.memory_depth must be 1 or 2, got True$"),
                           (lambda: DataConfig(val_fraction=0.0), r"^data.val_fraction must be a finite number in \(0, 1\)")]:
        with pytest.raises(ConfigError, match=message):
            build()
    assert model_config_from({"titans": {"theta_max": 0.5}}).titans.theta_max == 0.5
    with pytest.raises(ConfigError, match=r"^model.titans.theta_max must be a finite number in \(0, 1e\+18\], got nan$"):
        model_config_from({"titans": {"theta_max": float("nan")}})


@pytest.mark.parametrize("override, section, key, expected", [
    ("--logging.run_name=010", "logging", "run_name", "010"),
    ("--train.out_dir=2024_01", "train", "out_dir", "2024_01"),
    ("--train.sample_prompt=0.10", "train", "sample_prompt", "0.10"),
    ("--train.sample_prompt=yes", "train", "sample_prompt", "yes"),
    ("--train.sample_prompt=null", "train", "sample_prompt", "null"),
    ("--train.sample_prompt=[a, b]", "train", "sample_prompt", "[a, b]"),
    ("--train.sample_prompt=key: value", "train", "sample_prompt", "key: value"),
    ("--train.sample_prompt=", "train", "sample_prompt", ""),
    ("--data.hf_data_files=*.json", "data", "hf_data_files", "*.json"),
    ("--train.resume=~/ckpt", "train", "resume", "~/ckpt"),
])
def test_str_overrides_keep_the_text_as_typed(override, section, key, expected):
    """A CLI value for a field declared str is not parsed as YAML (010 would be the octal 8,
    2024_01 the int 202401, yes a bool)."""
    assert getattr(getattr(load_config(None, [override]), section), key) == expected


def test_non_str_overrides_still_parse_as_yaml():
    cfg = load_config(None, ["--train.max_steps=010", "--optim.grad_clip=0.5", "--model.cms.chunk_sizes=[8, null]",
                             "--model.titans.max_grad_norm=null", "--train.compile=yes", "--logging.run-name", "007"])
    assert cfg.train.max_steps == 10 and cfg.optim.grad_clip == 0.5 and cfg.model.cms.chunk_sizes == [8, None]
    assert cfg.model.titans.max_grad_norm is None and cfg.train.compile is True
    assert cfg.logging.run_name == "007"
    with pytest.raises(ConfigError, match="unknown config key 'train.nope'"):
        load_config(None, ["--train.nope=010"])


def test_yaml_str_fields_unchanged(tmp_path):
    """YAML files keep their YAML meaning: an unquoted 010 is the int 10, written as '10'."""
    path = tmp_path / "c.yaml"
    path.write_text("logging:\n  run_name: 010\ntrain:\n  out_dir: '2024_01'\n")
    cfg = load_config(str(path))
    assert cfg.logging.run_name == "10" and cfg.train.out_dir == "2024_01"


@pytest.mark.parametrize("text, value", [("010", 10), ("007", 7), ("10_000", 10000), ("0o17", 15), ("0x1F", 31),
                                         ("-0x10", -16), ("+7", 7), ("-5", -5)])
def test_integers_read_as_yaml_1_2_reads_them(tmp_path, text, value):
    """PyYAML (YAML 1.1) read 010 as the octal 8 and 1:30 as 90 (base 60): --train.seed=010
    trained with seed 8. Files and overrides read integers as YAML 1.2 does."""
    assert parse_overrides([f"--train.seed={text}"]) == {"train": {"seed": value}}
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  seed: {text}\n")
    assert read_yaml(str(path)) == {"train": {"seed": value}}
    with pytest.raises(ConfigError, match=r"^train.max_steps must be int, got '1:30'$"):
        load_config(None, ["--train.max_steps=1:30"])


@pytest.mark.parametrize("text, message", [
    ("train:\n  max_steps: 2\n  max_steps: 5\n", "has the key 'max_steps' twice (again on line 3)"),
    ("train:\n  lr: 1\ntrain:\n  seq_len: 8\n", "has the key 'train' twice (again on line 3)"),
    ("", "is empty"),
    ("# a comment only\n\n", "is empty"),
    ("- train\n", "must hold a mapping of sections"),
    ("model: [unclosed\n", "is not valid YAML (line 2)"),
])
def test_bad_config_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value) == f"config file {path} {message}"


def test_non_utf8_config_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  sample_prompt: café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value) == f"config file {path} is not UTF-8 text (line 2)"
    bom = tmp_path / "bom.yaml"                  # a UTF-8 byte-order mark is fine
    bom.write_bytes("\ufefftrain:\n  sample_prompt: café\n".encode("utf-8"))
    assert load_config(str(bom)).train.sample_prompt == "café"


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    """`<<: *anchor` then the same key is an override, not a duplicate."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  <<: {lr: 0.5, seq_len: 32}\n  lr: 0.25\n")
    cfg = load_config(str(path))
    assert cfg.train.lr == 0.25 and cfg.train.seq_len == 32


@pytest.mark.parametrize("value", [5, 0, "x", [1]])
def test_non_mapping_section_message(value):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"train": value})
    assert str(e.value) == f"train must be a mapping, got {value!r}"
    with pytest.raises(ConfigError, match=r"^model.titans must be a mapping, got 3$"):
        config_from_dict({"model": {"titans": 3}})
    assert config_from_dict({"train": None}).train.max_steps == Config().train.max_steps


def test_settings_the_architecture_does_not_read_are_named(tmp_path):
    """--model.cms.chunk_sizes on a Transformer++ config loaded and changed nothing;
    unread_settings names such keys (train.py prints a note), per architecture: HOPE-attention
    reads model.cms and model.hope.cms only, HOPE reads hope and cms, Titans titans."""
    from config import config_data, unread_settings
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  arch: transformer\n  titans:\n    chunk_size: 8\n")
    data = config_data(str(path), ["--model.cms.chunk_sizes=[16,null]"])
    assert unread_settings(data, "transformer") == ["model.titans.chunk_size", "model.cms.chunk_sizes"]
    assert unread_settings(data, "titans") == ["model.cms.chunk_sizes"]
    data = config_data(None, ["--model.hope.chunk_mem=8", "--model.hope.cms=false", "--model.cms.inner_lr=0.1"])
    assert unread_settings(data, "hope_attention") == ["model.hope.chunk_mem"]
    assert unread_settings(data, "hope") == []


@pytest.mark.parametrize("config, overrides, notes", [
    ("titans_mac_tiny", ["--model.titans.window_size=8"], ["model.titans.window_size is set, but is not read with "
                                                            "model.titans.variant=mac"]),
    ("titans_mag_tiny", ["--model.titans.segment_size=8"], ["model.titans.segment_size is set, but is not read with "
                                                             "model.titans.variant=mag"]),
    ("titans_lmm_tiny", ["--model.titans.n_persistent=2", "--model.titans.memory_depth=1",
                         "--model.titans.memory_expansion=4"],
     ["model.titans.n_persistent is set, but is not read with model.titans.variant=lmm",
      "model.titans.memory_expansion is set, but is not read with model.titans.memory_depth=1"]),
    ("titans_lmm_tiny", ["--model.titans.inner_lr_fixed=0.1", "--model.titans.theta_max=2"],
     ["model.titans.theta_max is set, but is not read with model.titans.inner_lr_fixed set"]),
    ("hope_tiny", ["--model.hope.inner_lr_fixed=0.1", "--model.hope.eta_max=0.5", "--model.ffn_mult=3"],
     ["model.hope.eta_max is set, but is not read with model.hope.inner_lr_fixed set",
      "model.ffn_mult is set, but is not read with model.hope.cms=true (the CMS chain replaces the FFN)"]),
    ("hope_attention_tiny", ["--model.hope.cms=false", "--model.cms.inner_lr=0.1"],       # the file's too
     ["model.cms.chunk_sizes is set, but is not read with model.hope.cms=false",
      "model.cms.inner_lr is set, but is not read with model.hope.cms=false"]),
    ("hope_tiny", ["--model.hope.cms=false", "--model.ffn_mult=3"],
     ["model.cms.chunk_sizes is set, but is not read with model.hope.cms=false"]),
])
def test_settings_a_variant_or_switch_does_not_read_are_named(config, overrides, notes):
    """Review: settings the architecture reads in general but the config's variant or switches
    do not (a window under MAC, theta_max beside a fixed inner lr, model.cms.* with
    hope.cms=false, ffn_mult beside the CMS chain) loaded and changed nothing, silently.
    train.unread_run_settings notes them (config.unread_by_choice); no shipped config sets one."""
    from config import config_data
    from train import unread_run_settings
    data = config_data(f"{REPO}/configs/{config}.yaml", overrides)
    assert unread_run_settings(data, config_from_dict(data)) == notes
    shipped = config_data(f"{REPO}/configs/{config}.yaml")
    assert unread_run_settings(shipped, config_from_dict(shipped)) == []


def test_an_override_may_not_set_a_whole_section():
    """Review: --model.titans=null reset the file's model.titans to the defaults (a MAC config
    became LMM), silently: refused in one line."""
    for override in ("--model.titans=null", "--train={}", "--model.cms=3"):
        with pytest.raises(ConfigError, match=r"^override '--[a-z.]+=.*' sets the whole section [a-z.]+; set its keys, "
                                              r"e\.g\. --[a-z.]+\.KEY=VALUE$"):
            load_config(f"{REPO}/configs/titans_mac_tiny.yaml", [override])


def test_odd_head_dims_only_where_no_attention_uses_rope():
    """HOPE and Titans-LMM have no attention (no RoPE): an odd head dim is theirs to use."""
    for model in ({"arch": "hope"}, {"arch": "titans", "titans": {"variant": "lmm"}}):
        assert config_from_dict({"model": {**model, "d_model": 30, "n_head": 2}}).model.n_head == 2


@pytest.mark.parametrize("arch,variant", [(a, v) for a in ModelConfig.__dataclass_fields__["arch"].metadata["choices"]
                                          for v in (TitansConfig.__dataclass_fields__["variant"].metadata["choices"]
                                                    if a == "titans" else ["lmm"])])
def test_uses_rope_says_which_built_models_rotate_attention(arch, variant):
    """ModelConfig.uses_rope (validate's even-head-dim rule) matches the modules a model is built
    from, for every architecture and variant config.py offers: a new attention block cannot be
    left out of it."""
    from model import Attention, LanguageModel
    from titans import PersistentAttention
    cfg = config_from_dict({"model": {"arch": arch, "titans": {"variant": variant}, "vocab_size": 16,
                                      "n_layer": 1, "d_model": 16, "n_head": 2}}).model
    model = LanguageModel(cfg)
    assert cfg.uses_rope == any(isinstance(m, (Attention, PersistentAttention)) for m in model.modules())


def test_train_dtype_takes_the_short_spellings_too():
    """distributed.mixed_precision and checkpoint export spell bf16 / fp32; train.dtype=bf16
    was refused ('not one of: auto, float32, bfloat16'). Both spellings now read the same."""
    assert load_config(None, ["--train.dtype=bf16"]).train.dtype == "bfloat16"
    assert load_config(None, ["--train.dtype=fp32"]).train.dtype == "float32"
    assert load_config(None, ["--train.dtype=bfloat16"]).train.computes_in_bf16("cpu")
    with pytest.raises(ConfigError, match="train.dtype='half' is not one of"):
        load_config(None, ["--train.dtype=half"])


def test_text_that_reads_as_an_integer_is_quoted_in_a_saved_config(tmp_path):
    """dump_yaml writes with the loader's YAML 1.2 integers: a run_name of '0o17' (or '1_000')
    came back from a checkpoint's config.yaml as 15 (1000)."""
    from config import dump_yaml
    cfg = load_config(None, ["--logging.run_name=0o17", "--train.out_dir=1_000"])
    path = str(tmp_path / "config.yaml")
    dump_yaml(cfg, path)
    again = load_config(path)
    assert (again.logging.run_name, again.train.out_dir) == ("0o17", "1_000")
