"""bench/: bad count flags stop each CLI with a one-line error (no usage block), as do
--device cuda without CUDA, a config whose model cannot be built and a --json path that
cannot be written (checked before the benchmark runs); tiny real runs of the CPU benchmarks
print their result tables and the command / machine / date lines.
(bench/kernels.py --quick runs in tests/test_triton_memory.py.)"""
import argparse
import io
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

from bench import checks_cpu, hope_cpu, init_grads, kernels_cpu, step, titans_cpu
from bench.common import machine


def _kernels_main(argv):
    from bench import kernels                     # imports the Triton kernels: only when needed
    return kernels.main(argv)


BAD_FLAGS = [
    (step.main, ["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (step.main, ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (step.main, ["--steps", "two"], "argument --steps: expected an integer >= 1, got 'two'"),
    (step.main, ["--profile-rows", "-1"], "argument --profile-rows: must be >= 0, got -1"),
    (hope_cpu.main, ["--warmup", "-2"], "argument --warmup: must be >= 0, got -2"),
    (hope_cpu.main, ["--profile-rows", "-1"], "argument --profile-rows: must be >= 0, got -1"),
    (hope_cpu.main, ["--d-model", "0"], "argument --d-model: must be >= 1, got 0"),
    (titans_cpu.main, ["--chunk", "0"], "argument --chunk: must be >= 1, got 0"),
    (titans_cpu.main, ["--threads", "1.5"], "argument --threads: expected an integer >= 1, got '1.5'"),
    (titans_cpu.main, ["--step-budget", "0"], "argument --step-budget: must be > 0, got 0"),
    (kernels_cpu.main, ["--ref-repeats", "0"], "argument --ref-repeats: must be >= 1, got 0"),
    (checks_cpu.main, [], "nothing to measure: give configs (the non-finite screen), --doc-mb (data.prepare's "
                          "memory) or both"),
    (init_grads.main, ["configs/transformer_tiny.yaml", "--seq-lens", "128,0"],
     "argument --seq-lens: expected a comma list of integers >= 1, got '128,0'"),
    (init_grads.main, ["configs/transformer_tiny.yaml", "--seq-lens", "8,x"],
     "argument --seq-lens: expected a comma list of integers >= 1, got '8,x'"),
    (init_grads.main, ["configs/transformer_tiny.yaml", "--seq-lens", ","],
     "argument --seq-lens: expected a comma list of integers >= 1, got ','"),
    (init_grads.main, ["configs/transformer_tiny.yaml", "--vocab", "-1"], "argument --vocab: must be >= 0, got -1"),
    (init_grads.main, ["configs/transformer_tiny.yaml", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (init_grads.main, ["configs/transformer_tiny.yaml", "--dtype", "bf16"],
     "argument --dtype: invalid choice: 'bf16' (choose from 'fp32', 'fp64')"),
    (_kernels_main, ["--T", "16", "-3"], "argument --T: must be >= 1, got -3"),
    (_kernels_main, ["--mem-chunk", "0"], "argument --mem-chunk: must be >= 1, got 0"),
    (_kernels_main, ["--repeats", "x"], "argument --repeats: expected an integer >= 1, got 'x'"),
    (_kernels_main, ["--hope-chunk", "32"], "argument --hope-chunk: must be <= 16, got 32"),   # was timed at 16
    (_kernels_main, ["--depths", "3"], "argument --depths: invalid choice: 3 (choose from 1, 2)"),
] + ([(_kernels_main, ["--dtype", "bf16"],     # the interpreter (conftest) computes 16-bit wrongly
       "--dtype bf16 needs a GPU (the Triton interpreter computes 16-bit wrongly); use --dtype fp32")]
     if not torch.cuda.is_available() else [])


@pytest.mark.parametrize("main, argv, message", BAD_FLAGS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_count_flags_give_one_line_error(main, argv, message, capsys):
    """Exit 2 before any work, and the error is one line naming the flag and the value."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.err.strip().splitlines() == [f"error: {message}"], captured.err
    assert captured.out == ""


def _footer_ok(out, script, argv):
    """The command, machine, date and versions under a result (Triton's too: the same kernels
    spilled and ran differently under two releases, and no footer said which)."""
    import triton
    assert f"command: python bench/{script} {' '.join(argv)}" in out
    assert f"machine: {machine()}\n" in out
    assert re.search(rf"date: \d{{4}}-\d\d-\d\d, torch {re.escape(torch.__version__)}, "
                     rf"triton {re.escape(triton.__version__)}\n", out), out


def test_step_bench_tiny_run(capsys):
    argv = ["--steps", "1", "--warmup", "0", "--device", "cpu", "--model.arch=hope", "--model.d_model=32",
            "--model.n_layer=1", "--model.n_head=2", "--model.vocab_size=64", "--train.batch_size=2",
            "--train.seq_len=24", "--train.grad_accum=2"]
    assert step.main(argv) == 0
    out = capsys.readouterr().out
    line = out.splitlines()[0]
    assert line.split("|")[0].strip() == "hope" and "batch 2 x seq 24" in line, line
    assert float(re.search(r"([\d,]+) tok/s", line).group(1).replace(",", "")) > 0
    assert "| kernels: HOPE M_mem x1: per-chunk path (backend 'auto' on cpu" in out   # model.kernel_report
    assert "| model FLOPs (6N + attention): " in out and "memory inner loops" in out    # flops_report
    _footer_ok(out, "step.py", argv)


def test_step_bench_reports_flops_and_mfu_as_train_py(monkeypatch):
    """The step's FLOPs line: model.flops_per_token (6N + attention) x tokens/s, its MFU against
    train.peak_flops where that knows the GPU, and the memories' inner loops apart, outside the
    MFU, as train.py logs them (bench_step counted the FLOPs and printed none)."""
    import train
    r = {"tokens_per_s": 1000.0, "flops_per_token": 2e9, "memory_flops_per_token": 5e8}
    monkeypatch.setattr(train, "peak_flops", lambda device_type: 1e13)
    assert step.flops_report(r, "cuda") == ("model FLOPs (6N + attention): 2 G/token, 2 TFLOP/s, MFU 20.0%; memory "
                                           "inner loops 0.5 G/token more, 0.5 TFLOP/s (+5.0% of peak), not in the MFU")
    monkeypatch.setattr(train, "peak_flops", lambda device_type: None)
    r["memory_flops_per_token"] = 0                  # a Transformer++: no inner loops to report
    assert step.flops_report(r, "cpu") == ("model FLOPs (6N + attention): 2 G/token, 2 TFLOP/s (no MFU: "
                                          f"train.PEAK_FLOPS knows {'/'.join(train.PEAK_FLOPS)} only)")


def test_step_bench_profile_labels_the_parts(capsys):
    """--profile-rows: one more step under torch.profiler, its forward time per part (HOPE's
    two stages among them) and an op table of that many rows."""
    argv = ["--steps", "1", "--warmup", "0", "--device", "cpu", "--model.arch=hope", "--model.d_model=32",
            "--model.n_layer=1", "--model.n_head=2", "--model.vocab_size=64", "--train.batch_size=1",
            "--train.seq_len=24", "--profile-rows", "4"]
    assert step.main(argv) == 0
    out = capsys.readouterr().out
    for part in ("forward: mixer (SelfModifyingTitans)", "forward: mixer stage 1 (projection memories)",
                 "forward: mixer stage 2 (M_mem)", "forward: ffn (ContinuumMemory)", "forward: LM head"):
        assert re.search(re.escape(part) + r" +\d+\.\d ms  \(1 calls\)", out), part
    assert "hope step, top ops by self time" in out and "Self CPU" in out
    _footer_ok(out, "step.py", argv)


def test_step_bench_activation_checkpointing(capsys, monkeypatch):
    """distributed.activation_checkpointing=true: every block's forward runs under
    torch.utils.checkpoint, as in train.py, and the result line says so."""
    import distributed
    wrapped = []
    real = distributed.apply_activation_checkpointing
    monkeypatch.setattr(distributed, "apply_activation_checkpointing",
                        lambda model: wrapped.append(len(model.blocks)) or real(model))
    argv = ["--steps", "1", "--warmup", "0", "--device", "cpu", "--model.d_model=32", "--model.n_layer=2",
            "--model.n_head=2", "--model.vocab_size=64", "--train.batch_size=2", "--train.seq_len=16",
            "--distributed.activation_checkpointing=true"]
    assert step.main(argv) == 0
    assert wrapped == [2]
    assert "batch 2 x seq 16 (AC) |" in capsys.readouterr().out


def test_saved_memory_bench_tiny_run(capsys):
    """bench/saved_memory.py: a HOPE block keeps more per token than a Transformer++ block,
    the per-token growth is listed by place, and the footer is there."""
    from bench import saved_memory
    argv = ["configs/hope_tiny.yaml", "configs/transformer_tiny.yaml", "--T", "16", "32", "--top", "2"]
    assert saved_memory.main(argv) == 0
    out = capsys.readouterr().out
    per_token = {m.group(1): float(m.group(2)) for m in
                 re.finditer(r"^(\w+)\.yaml: one block keeps .*; ([\d.]+) MiB per token$", out, re.M)}
    assert per_token["hope_tiny"] > per_token["transformer_tiny"] > 0, out
    places = re.findall(r"^ +[\d.]+ MiB per token  (\w+\.py):\w+$", out, re.M)
    assert len(places) == 4, out                  # --top 2, each a file of this repository
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert all(os.path.exists(os.path.join(repo, f)) or os.path.exists(os.path.join(repo, "kernels", f))
               for f in places), places
    _footer_ok(out, "saved_memory.py", argv)


def test_saved_memory_bench_bad_inputs_are_one_line(capsys):
    from bench import saved_memory
    with pytest.raises(SystemExit):
        saved_memory.main(["configs/hope_tiny.yaml", "--T", "16"])
    assert capsys.readouterr().err.strip().endswith("--T needs at least two different lengths")
    assert saved_memory.main(["configs/hope_tiny.yaml", "--model.d_modl=8"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown config key 'model.d_modl'")


def test_overrides_with_spaced_values_are_not_config_paths(capsys):
    """--section.key value (config.parse_overrides' other form, as train.py takes it) is an
    override: parse_known_args took "hope" in `step.py --model.arch hope` for the config path,
    and a mistyped option's value too (`--warm 1`: "config file not found: 1")."""
    from bench.common import split_overrides
    assert split_overrides(["c.yaml", "--model.arch", "hope", "--steps", "2", "--train.lr=1", "--model.x", "--y"]) == \
        (["c.yaml", "--steps", "2", "--y"], ["--model.arch", "hope", "--train.lr=1", "--model.x"])
    argv = ["--model.arch", "hope", "--steps", "1", "--warmup", "0", "--device", "cpu", "--model.d_model", "32",
            "--model.n_layer=1", "--model.n_head=2", "--model.vocab_size=64", "--train.batch_size=1",
            "--train.seq_len=8"]
    assert step.main(argv) == 0                                       # the default config, arch hope
    assert capsys.readouterr().out.split("|")[0].strip() == "hope"
    with pytest.raises(SystemExit) as exit_info:
        step.main(["--warm", "1"])
    assert exit_info.value.code == 2
    _one_line(capsys.readouterr().err, "unrecognized arguments: --warm")
    with pytest.raises(SystemExit):
        init_grads.main(["--model.d_model", "32", "configs/transformer_tiny.yaml", "--seq-lenz", "8"])
    _one_line(capsys.readouterr().err, "unrecognized arguments: --seq-lenz 8")    # not "config file not found: 32"


def test_step_bench_bad_config_is_one_line(capsys):
    assert step.main(["--device", "cpu", "--train.max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'train.max_stepz'") and err.count("\n") == 1


def test_hope_cpu_tiny_run_with_profile(capsys):
    argv = ["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--vocab", "64", "--seq-len", "24",
            "--batch-size", "2", "--steps", "1", "--warmup", "0", "--profile-rows", "3"]
    assert hope_cpu.main(argv) == 0
    out = capsys.readouterr().out
    rows = {r.split("|")[1].strip(): r for r in out.splitlines() if r.startswith("| transformer") or r.startswith("| hope")}
    assert set(rows) == {"transformer", "hope"}
    assert re.search(r"HOPE / Transformer\+\+ step time: \d+\.\d\dx", out)
    # the profile labels every part of the HOPE block's forward (label_forwards)
    for part in ("forward: mixer (SelfModifyingTitans)", "forward: mixer stage 1", "forward: mixer stage 2",
                 "forward: LM head"):
        assert part in out, part
    _footer_ok(out, "hope_cpu.py", argv)


def test_titans_cpu_tiny_run(capsys):
    argv = ["--T", "20", "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--vocab", "64", "--chunk", "8",
            "--depth", "1", "--steps", "1"]
    assert titans_cpu.main(argv) == 0
    out = capsys.readouterr().out
    rows = [r.split() for r in out.splitlines() if r.startswith(("Transformer++ ", "Titans-LMM "))]
    assert [r[0] for r in rows[:2]] == ["Transformer++", "Titans-LMM"] and all(float(r[4]) > 0 for r in rows[:2])
    assert re.search(r"Titans-LMM / Transformer\+\+ step time: \d+\.\d\dx", out)
    assert "settings: T=20 batch=1 d_model=32 heads=2 vocab=64 memory depth=1 chunk=8 step budget=None, fp32 eager" in out
    _footer_ok(out, "titans_cpu.py", argv)


def test_init_grads_tiny_run(capsys):
    """bench/init_grads.py: a row per config and length (loss, gradient norm, the three largest
    parameters), then the footer; the numbers repeat with the same seed."""
    argv = ["configs/titans_lmm_tiny.yaml", "configs/transformer_tiny.yaml", "--seq-lens", "8", "--vocab", "61"]
    assert init_grads.main(argv) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(\w+)\.yaml +8 +([\d.]+) +([\d.]+)  (\S+ [\d.]+), (\S+ [\d.]+), (\S+ [\d.]+)$", out, re.M)
    assert [r[0] for r in rows] == ["titans_lmm_tiny", "transformer_tiny"], out
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows), rows
    _footer_ok(out, "init_grads.py", argv)
    assert "settings: seed 0, vocabulary 61, fp32 eager" in out
    from config import load_config
    cfg = load_config("configs/transformer_tiny.yaml", ["--model.vocab_size=61"])
    loss, total, norms = init_grads.init_grads(cfg, 8)
    assert f"{loss:.3f}" == rows[1][1] and f"{total:.3g}" == rows[1][2]
    assert abs(total - sum(v * v for v in norms.values()) ** 0.5) < 1e-9


def test_checks_cpu_tiny_run(capsys):
    """bench/checks_cpu.py: the non-finite screen and the element-wise check timed on a tiny
    config, data.prepare's peak with and without a 1 MB document (bytes), then the footer."""
    argv = ["configs/transformer_tiny.yaml", "--vocab", "61", "--repeats", "1", "--doc-mb", "1",
            "--tokenizer", "bytes"]
    assert checks_cpu.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^transformer_tiny\.yaml: \d+M parameters, non-finite screen [\d.]+ s, "
                     r"isfinite\(p\)\.all\(\) per parameter [\d.]+ s$", out, re.M), out
    base, peak = map(float, re.search(r"peak (\d+) MB on small documents, (\d+) MB with one 1 MB", out).groups())
    assert peak >= base > 0
    _footer_ok(out, "checks_cpu.py", argv)
    assert checks_cpu.main(["configs/missing.yaml"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_checks_cpu_reads_every_config_before_measuring(monkeypatch, capsys):
    """A config that cannot be read stops checks_cpu before data.prepare's measurement (minutes
    at --doc-mb 32): nothing printed but the one line."""
    monkeypatch.setattr(checks_cpu, "prepare_peak_mb", lambda *a: pytest.fail("measured before reading the configs"))
    assert checks_cpu.main(["configs/transformer_tiny.yaml", "configs/missing.yaml", "--doc-mb", "1"]) == 2
    captured = capsys.readouterr()
    _one_line(captured.err, "config file not found: configs/missing.yaml")
    assert captured.out == ""


def test_checks_cpu_model_construction_error_names_the_config(unbuildable, capsys):
    assert checks_cpu.main(["configs/transformer_tiny.yaml", "--vocab", "61", "--repeats", "1"]) == 2
    _one_line(capsys.readouterr().err, "configs/transformer_tiny.yaml: memory chunk sizes")


def test_checks_cpu_prepare_peak_is_the_childs_own():
    """data.prepare's peak is its own: ru_maxrss carried this process's peak (torch imported,
    hundreds of MB) into the child's, so both runs read the same and a 2 MB document cost 0."""
    import resource
    base, peak = checks_cpu.prepare_peak_mb(2, "bytes")
    assert 0 < base < resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 2, base
    assert peak - base > 2 * 2, (base, peak)           # the text, its bytes and uint16 tokens: 4+ bytes a byte


def test_checks_cpu_failed_prepare_is_one_line_with_its_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"^data\.prepare failed \(exit 2\): error: .*nothing"):
        checks_cpu.prepare_child_peak_mb(["--source", f"files:{tmp_path}/nothing*.txt", "--tokenizer", "bytes",
                                          "--out", str(tmp_path / "out"), "--quiet"])


def test_timer_takes_the_median_after_one_untimed_warm_up(monkeypatch):
    """bench.common.timer on CPU: one warm-up call, not timed, then the median of `repeats`."""
    from bench import common
    now, durations = [0.0], iter([100.0, 1.0, 5.0, 3.0])          # the warm-up is the slow one

    def fn():
        now[0] += next(durations)
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    assert common.timer(fn, "cpu", 3) == 3.0


def test_kernels_cpu_times_the_scan_not_the_loss_weights(monkeypatch):
    """run_once's timed region holds the scan and its backward: the test loss's weights are made
    once per shape, by the warm-up (they cost 1-3 % of a chunked fwd+bwd at the default shape)."""
    made = []
    cos = torch.cos
    monkeypatch.setattr(torch, "cos", lambda *a, **kw: made.append(1) or cos(*a, **kw))
    for op in ("delta_rule", "momentum_rule"):
        x = kernels_cpu.make_inputs(op, 1, 5, 1, 4)
        kernels_cpu.run_once(op, x, "torch", 4, True)                     # the warm-up
        seconds, _, grads = kernels_cpu.run_once(op, x, "reference", 4, True, clock=lambda: float(len(made)))
        assert seconds == 0 and len(grads) == len(x)                      # no weights made while timed


def test_kernels_cpu_tiny_run(capsys):
    """T = 11 is not a multiple of the chunk (4): the chunked scans still match the reference."""
    argv = ["--T", "11", "--H", "1", "--d", "4", "--chunk", "4", "--repeats", "1", "--ref-repeats", "1"]
    kernels_cpu.main(argv)
    out = capsys.readouterr().out
    rows = [r.split() for r in out.splitlines() if r.startswith(("delta_rule ", "momentum_rule "))]
    assert [(r[0], r[1]) for r in rows] == [(op, p) for op in ("delta_rule", "momentum_rule")
                                            for p in ("fwd", "fwd+bwd")]
    assert all(float(r[-1]) < 1e-4 for r in rows), rows
    _footer_ok(out, "kernels_cpu.py", argv)


# ----------------------------------------------------------------------------------------
# bad input beyond the count flags: one line, exit 2, before any timing

def _one_line(err, *parts):
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_step_bench_device_cuda_without_cuda_is_one_line(capsys):
    assert step.main(["--device", "cuda", "--model.d_model=32", "--model.n_layer=1"]) == 2
    captured = capsys.readouterr()
    _one_line(captured.err, "argument --device: cuda is not available")
    assert captured.out == ""


@pytest.mark.parametrize("argv, message", [
    (["configs/transformer_tiny.yaml", "configs/no_such.yaml"], "config file not found: configs/no_such.yaml"),
    (["configs/transformer_tiny.yaml", "--model.d_modl=8"], "unknown config key 'model.d_modl'"),
])
def test_init_grads_bad_config_is_one_line(argv, message, capsys):
    """Every config is read before any is measured: nothing printed but the one line."""
    assert init_grads.main(argv + ["--seq-lens", "8"]) == 2
    captured = capsys.readouterr()
    _one_line(captured.err, message)
    assert captured.out == ""


@pytest.fixture
def unbuildable(monkeypatch):
    """model.build_model raising the ValueError of a config it cannot build (as the memory
    layers do for shapes config.py does not check)."""
    import model

    def build_model(cfg):
        raise ValueError("memory chunk sizes must be integers >= 1; got 0")
    monkeypatch.setattr(model, "build_model", build_model)


def test_step_bench_model_construction_error_is_one_line(unbuildable, capsys):
    assert step.main(["--device", "cpu", "--model.d_model=32", "--model.n_layer=1"]) == 2
    captured = capsys.readouterr()
    _one_line(captured.err, "memory chunk sizes must be integers >= 1; got 0")
    assert captured.out == ""


def test_saved_memory_bench_model_construction_error_names_the_config(unbuildable, capsys):
    from bench import saved_memory
    assert saved_memory.main(["configs/transformer_tiny.yaml", "configs/hope_tiny.yaml", "--T", "8", "16"]) == 2
    captured = capsys.readouterr()
    _one_line(captured.err, "configs/transformer_tiny.yaml: memory chunk sizes")
    assert captured.out == ""                       # no config measured before the check


def test_init_grads_model_construction_error_names_the_config(unbuildable, capsys):
    assert init_grads.main(["configs/transformer_tiny.yaml", "configs/hope_tiny.yaml", "--seq-lens", "8"]) == 2
    captured = capsys.readouterr()
    _one_line(captured.err, "configs/transformer_tiny.yaml: memory chunk sizes")
    assert captured.out == ""


def test_hope_and_titans_cpu_model_construction_errors_are_one_line(monkeypatch, unbuildable, capsys):
    assert hope_cpu.main(["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--vocab", "64"]) == 2
    _one_line(capsys.readouterr().err, "memory chunk sizes")
    import model
    monkeypatch.setattr(titans_cpu, "build_model", model.build_model)    # the fake: imported by name there
    assert titans_cpu.main(["--T", "16", "--d-model", "32", "--n-layer", "1", "--n-head", "2"]) == 2
    _one_line(capsys.readouterr().err, "memory chunk sizes")


@pytest.mark.parametrize("flag", ["--model.titans.chunk_size=0", "--model.ffn_multiple_of=0"])
def test_step_bench_bad_model_values_are_one_line(flag, capsys):
    """Whether config.py (ConfigError) or the model (ValueError) rejects them: one line, exit 2,
    no traceback. (ffn_multiple_of=0 was a ZeroDivisionError in the model: config.py checks it.)"""
    assert step.main(["--device", "cpu", "--model.arch=titans", "--model.d_model=32", "--model.n_layer=1",
                      "--model.n_head=2", flag]) == 2
    _one_line(capsys.readouterr().err)


def test_step_bench_triton_kernels_without_cuda_or_interpreter_is_one_line(monkeypatch, capsys):
    """model.kernels=triton on CPU without Triton's interpreter: one line naming the fix, before
    the model is built (it was a traceback from the first step's kernel launch)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert step.main(["configs/titans_lmm_tiny.yaml", "--device", "cpu", "--model.kernels=triton",
                      "--steps", "1", "--warmup", "0"]) == 2
    _one_line(capsys.readouterr().err, "model.kernels=triton needs a CUDA device (or TRITON_INTERPRET=1")


@pytest.mark.parametrize("script", ["saved_memory", "init_grads"])
def test_cpu_benches_refuse_triton_kernels_without_the_interpreter_in_one_line(script, monkeypatch, capsys):
    """saved_memory and init_grads run their forwards on CPU: model.kernels=triton there without
    Triton's interpreter is one line naming the config and the fix, before anything is measured
    (it was a traceback from the first fused launch)."""
    import importlib
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    main = importlib.import_module(f"bench.{script}").main
    assert main(["configs/hope_tiny.yaml", "--T" if script == "saved_memory" else "--seq-lens", "8",
                 *(["16"] if script == "saved_memory" else []), "--model.kernels=triton"]) == 2
    captured = capsys.readouterr()
    _one_line(captured.err, "configs/hope_tiny.yaml: model.kernels=triton needs a CUDA device (or TRITON_INTERPRET=1")
    assert captured.out == ""


@pytest.mark.parametrize("where, problem", [("afile/k.json", "afile is not a folder"),
                                            ("adir", "is a folder; give a file name")])
def test_kernels_bench_json_path_is_checked_before_the_benchmark(where, problem, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    path = str(tmp_path / where)
    with pytest.raises(SystemExit) as exit_info:
        _kernels_main(["--quick", "--parts", "scans", "--json", path])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""           # nothing was measured
    _one_line(captured.err, f"argument --json: {path}", problem)
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile"] and not os.listdir(tmp_path / "adir")


def test_kernel_bench_exits_1_when_a_row_failed(monkeypatch, capsys):
    """bench/kernels.py: a row whose implementation raised (NaN time, the error's first line as
    its note) makes the run exit 1; measured rows exit 0."""
    from bench import kernels

    def fails():
        raise RuntimeError("boom\nsecond line")
    for run, status in ((lambda: (1e-3, 1e-7), 0), (fails, 1)):
        monkeypatch.setattr(kernels, "bench_hope_stage1", lambda args, device, rows, run=run: kernels.add_row(
            args, rows, run, part="hope", op="hope/stage1/C4", impl="torch", pass_="fwd", B=1, T=5, H=1, d=4))
        assert kernels.main(["--quick", "--parts", "hope"]) == status
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("hope/stage1/C4"))
        assert row.endswith("RuntimeError: boom") == (status == 1), row


def test_kernel_bench_times_the_chosen_implementations(capsys):
    """--impls keeps the rows of the implementations named (with their variants: triton/all
    with triton); --no-errors skips the float64 references, so the error column reads nan."""
    for extra, impl, errors in ((["--impls", "triton", "--no-errors"], "triton", False),
                                (["--impls", "torch"], "torch", True)):
        assert _kernels_main(["--quick", "--parts", "budget", *extra]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("budget/")]
        assert [r[1:3] for r in rows] == [[impl, "fwd"], [impl, "fwd+bwd"]]
        assert all((r[-1] != "nan") == errors for r in rows), rows
    from bench import kernels
    rows = []
    for name in ("torch", "triton", "triton/all"):
        kernels.add_row(argparse.Namespace(impls=["triton"]), rows, lambda: (1e-3, 0.0), part="hope", op="op",
                        impl=name, pass_="fwd", B=1, T=1, H=1, d=1)
    assert [r["impl"] for r in rows] == ["triton", "triton/all"]


def test_kernel_bench_times_wide_keys_at_chunk_64(monkeypatch, capsys):
    """Scans at d > 64: impl triton/chunk64 runs the kernels at chunks of 64 tokens
    (kernels.triton_scans.WIDE_KEY_CHUNK, which it restores) where impl triton runs 32; only
    with tf32 products (exact fp32 ones overflow shared memory at chunk 64)."""
    from kernels import triton_scans
    seen, launch = [], triton_scans.delta_forward

    def spy(*args, **kwargs):
        seen.append(args[7])                    # BT
        return launch(*args, **kwargs)
    monkeypatch.setattr(triton_scans, "delta_forward", spy)
    assert _kernels_main(["--parts", "scans", "--ops", "delta_rule", "--impls", "triton", "--no-errors",
                          "--B", "1", "--H", "1", "--d", "72", "--T", "3", "--dtype", "fp32",
                          "--repeats", "1", "--passes", "fwd"]) == 0        # the default chunk, 64
    rows = [line.split()[1:3] for line in capsys.readouterr().out.splitlines() if line.startswith("delta_rule")]
    assert rows == [["triton", "fwd"], ["triton/chunk64", "fwd"]]
    assert set(seen) == {32, 64} and triton_scans.WIDE_KEY_CHUNK == 32
    assert _kernels_main(["--parts", "scans", "--ops", "delta_rule", "--impls", "triton", "--no-errors",
                          "--B", "1", "--H", "1", "--d", "72", "--T", "3", "--dtype", "fp32",
                          "--repeats", "1", "--passes", "fwd", "--fp32-matmul-precision", "highest"]) == 0
    rows = [line.split()[1:3] for line in capsys.readouterr().out.splitlines() if line.startswith("delta_rule")]
    assert rows == [["triton", "fwd"]]          # exact fp32 products: chunk 64 would not fit


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's refusal of 16-bit scans")
def test_kernel_bench_dtype_is_the_scans_own(capsys):
    """--dtype sets the scans' inputs only (the other parts run fp32), so under the interpreter
    only the scans refuse bf16: `--parts budget` ran nothing at the default --dtype bf16."""
    argv = ["--B", "1", "--T", "5", "--H", "1", "--d", "4", "--mem-chunk", "4", "--repeats", "1", "--impls", "torch"]
    assert _kernels_main(["--parts", "budget", *argv]) == 0
    out = capsys.readouterr().out
    assert "scans' dtype bf16;" in out and len([line for line in out.splitlines() if line.startswith("budget/")]) == 2
    import triton
    assert f"; torch {torch.__version__}, triton {triton.__version__}; date " in out     # the header's versions
    with pytest.raises(SystemExit):
        _kernels_main(["--parts", "budget", "scans", *argv])
    _one_line(capsys.readouterr().err, "--dtype bf16 needs a GPU")


def test_kernel_bench_json_says_how_its_rows_were_measured(tmp_path):
    """--json holds what the header prints beside the rows: the command, versions, the scans'
    dtype and the fp32 product precision (it held the device, date and rows only)."""
    import json
    import triton
    path = tmp_path / "k.json"
    argv = ["--parts", "budget", "--B", "1", "--T", "5", "--H", "1", "--d", "4", "--mem-chunk", "4", "--repeats", "1",
            "--impls", "torch", "--fp32-matmul-precision", "highest", "--json", str(path)]
    assert _kernels_main(argv) == 0
    got = json.loads(path.read_text())
    assert got["command"] == "python bench/kernels.py " + " ".join(argv) and got["scans_dtype"] == "bf16"
    assert got["fp32_matmul_precision"] == "highest" and got["versions"].endswith(f"triton {triton.__version__}")
    assert got["date"] and got["device"] and [r["impl"] for r in got["rows"]] == ["torch", "torch"]


def test_kernel_bench_that_times_nothing_fails(capsys):
    """A run without rows is an error, not a pass (exit 0 with an empty table): --impls
    reference times only with --reference, and only the scans."""
    argv = ["--parts", "budget", "--impls", "reference", "--reference", "--B", "1", "--T", "5", "--H", "1",
            "--d", "4", "--mem-chunk", "4", "--repeats", "1", "--dtype", "fp32"]
    assert _kernels_main(argv) == 2
    _one_line(capsys.readouterr().err, "nothing was timed: --impls reference has no rows in --parts budget")


def test_kernel_bench_times_fla_ungated_backward(monkeypatch, capsys):
    """Op delta_rule_ungated, fwd+bwd, against fla's chunk_delta_rule (here a stand-in with fla's
    conventions: h = S^T, v = u / eta, beta = eta): fla reads no alpha, so its alpha gradient is
    None. autograd.grad refused the whole row for that (NaN, exit 1): the one fla backward
    measurable on triton 3.6 never came back. The error column covers the gradients fla has."""
    import kernels
    from bench import kernels as kernel_bench

    def chunk_delta_rule(q, k, v, beta, scale, initial_state, output_final_state):
        o, S = kernels.delta_rule(q, k, v * beta[..., None], torch.ones_like(beta), beta,
                                  initial_state.transpose(-1, -2), backend="torch")
        return scale * o, S.transpose(-1, -2)
    monkeypatch.setattr(kernel_bench, "load_fla", lambda: (
        {"delta_rule_ungated": kernel_bench.fla_ungated_delta_rule(chunk_delta_rule)}, ""))
    assert kernel_bench.main(["--parts", "scans", "--ops", "delta_rule_ungated", "--impls", "torch", "fla",
                              "--B", "1", "--H", "1", "--d", "4", "--T", "9", "--chunk", "4", "--dtype", "fp32",
                              "--repeats", "1", "--passes", "fwd+bwd"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("delta_rule_ungated")]
    assert [r[1:3] for r in rows] == [["torch", "fwd+bwd"], ["fla", "fwd+bwd"]], rows
    assert all(float(r[-2]) > 0 and float(r[-1]) < 1e-5 for r in rows), rows       # ms, rel err


@pytest.mark.parametrize("flag, value", [("--passes", "bwd"), ("--rules", "adam"), ("--impls", "cuda")])
def test_kernel_bench_bad_choice_is_one_line(flag, value, capsys):
    """bench/kernels.py --passes / --rules outside their choices: exit 2, one line naming both."""
    with pytest.raises(SystemExit) as exit_info:
        _kernels_main([flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: argument {flag}: invalid choice: '{value}'"), err


# ----------------------------------------------------------------------------- bench/step.py's device handling

@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("device, message", [
    ("cuda:0", "argument --device: cuda:0 is not available"),
    ("gpu", "argument --device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
])
def test_step_bench_device_names_are_checked_in_one_line(device, message, capsys):
    assert step.main(["--device", device, "--model.d_model=32", "--model.n_layer=1"]) == 2
    _one_line(capsys.readouterr().err, message)


def test_step_device_type_takes_indexed_devices():
    assert step.device_type("cuda:0") == "cuda" and step.device_type("cpu") == "cpu"
    assert step.device_type(torch.device("cuda", 1)) == "cuda"


@pytest.mark.parametrize("clip, max_norm", [(0.5, 0.5), (0, float("inf"))])
def test_step_clips_the_gradients_as_train_py(monkeypatch, clip, max_norm):
    """The timed step clips the global gradient norm at optim.grad_clip between the backward and
    AdamW, as train.py's step does (0: the norm is still computed, for its log); it did not."""
    from config import load_config
    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm_: seen.append(max_norm_) or real(params, max_norm_))
    cfg = load_config(None, ["--model.arch=transformer", "--model.d_model=16", "--model.n_layer=1",
                             "--model.n_head=1", "--model.vocab_size=32", "--train.batch_size=1",
                             "--train.seq_len=4", f"--optim.grad_clip={clip}"])
    model, train_step = step.build_train_step(cfg)
    train_step()
    assert seen == [max_norm]


def test_step_timing_synchronises_the_benched_device(monkeypatch):
    """median_seconds waits for the step's own GPU: torch.cuda.synchronize() without a device
    waits for the current one (cuda:0), so a step on --device cuda:1 was timed at its launches."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    step.median_seconds(lambda: None, steps=2, warmup=1, device="cuda:1")
    assert synced == ["cuda:1"] * 6


def test_profiled_step_total_counts_each_cuda_kernel_once():
    """Kineto reports a kernel as its own CUDA event and also as the self device time of the
    CPU op that launched it; the whole-step total sums the CUDA events only (as torch's own
    table does), not the GPU-side user annotations, and on CPU every event's self CPU time."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(kind, self_device, self_cpu=0, annotation=False):
        return SimpleNamespace(device_type=kind, self_device_time_total=self_device,
                               self_cpu_time_total=self_cpu, is_user_annotation=annotation)
    events = [event(DeviceType.CPU, 300, self_cpu=50),          # aten::mm: its kernel's 300 us
              event(DeviceType.CUDA, 300),                      # the kernel itself
              event(DeviceType.CPU, 20, self_cpu=10),           # aten::add
              event(DeviceType.CUDA, 20),
              event(DeviceType.CUDA, 320, annotation=True)]     # "forward: mixer" on the GPU timeline
    assert step.step_self_time(events, cuda=True) == 320
    assert step.step_self_time(events, cuda=False) == 60


def test_profiled_step_total_on_cpu_matches_the_events(capsys):
    """On CPU, step_self_time over a real profile equals the sum of the events' self CPU time."""
    cfg = step.load_config("configs/transformer_tiny.yaml", ["--model.d_model=32", "--model.n_layer=1",
                                                               "--train.batch_size=1", "--train.seq_len=8"])
    model, train_step = step.build_train_step(cfg, "cpu")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_step()
    table = prof.key_averages()
    assert step.step_self_time(table, cuda=False) == sum(e.self_cpu_time_total for e in table) > 0


# ----------------------------------------------------------------------------- the GPU check's shell scripts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["bench/gpu_check.sh", "bench/device_run.sh", "bench/prepare_gpu_run.sh", "bench/fetch_fla.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", os.path.join(REPO, script)]).returncode == 0


def _script_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "CAP_", "DEVICE_RUN_"))
           and k not in ("OUT", "TRITON_CACHE_DIR")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def test_device_run_without_out_is_one_line():
    r = subprocess.run(["bash", os.path.join(REPO, "bench/device_run.sh")], env=_script_env(),
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    _one_line(r.stderr, "OUT is not set")


def test_gpu_check_lists_unique_stages_with_the_fsdp_runs_fused():
    out = subprocess.run(["bash", os.path.join(REPO, "bench/gpu_check.sh")], capture_output=True, text=True,
                         env=_script_env(GPU_CHECK_LIST="1", GPU_CHECK_FSDP="1"), check=True).stdout
    stages = [line.split("\t", 1) for line in out.splitlines()]
    names = [name for name, _ in stages]
    assert len(names) == len(set(names)) and names[-2:] == ["fsdp_transformer_760m", "fsdp_hope_760m"]
    hope = dict(stages)["fsdp_hope_760m"].split()
    assert "--model.kernels=triton" in hope and "--train.log_every=1" in hope
    assert "--train.max_steps=4" in hope
    tests = dict(stages)["tests"].split()             # node ids, cheapest first
    assert tests.index("tests/test_kernels.py::test_auto_backend_on_cuda_picks_triton_when_it_imports") < \
        tests.index("tests/test_triton_kernels.py::test_cuda_torch_compile_fullgraph_matches_eager")
    assert "wide and cuda_shapes" in dict(stages)["tests_new"]


@pytest.mark.slow
def test_device_run_sends_few_files_and_packs_after_a_timeout(tmp_path):
    """A dry run stopped by device_run.sh's timeout: the running stage is recorded as CUT, the
    summary printed, the logs packed, and the cache split into <= 15 MiB parts: at most 8
    files under $OUT, the device tool's limit."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "blob.bin").write_bytes(os.urandom(20 * 2**20))      # incompressible: two parts
    (tmp_path / "packed.tgz").write_bytes(b"")
    out = tmp_path / "out"
    # a stage that always outlasts the timeout (the dry HOPE step runs in Triton's interpreter:
    # minutes); the pytest stages finished inside 15 s on an idle machine, so no cut came
    env = _script_env(OUT=str(out), GPU_CHECK_DRY="1", GPU_CHECK_STAGES="step_hope_tiny_fused",
                      DEVICE_RUN_TIMEOUT="20", DEVICE_RUN_CACHE="1", TRITON_CACHE_DIR=str(cache),
                      GPU_CHECK_CACHE_IN=str(tmp_path / "packed.tgz"),
                      GPU_CHECK_OUT=str(tmp_path / "gc"), GPU_CHECK_WORK=str(tmp_path / "work"))
    r = subprocess.run(["bash", os.path.join(REPO, "bench/device_run.sh")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 124, r.stdout[-2000:] + r.stderr[-2000:]
    files = sorted(os.listdir(out))
    assert files == ["device_run.log", "gpu_check.tgz", "triton_cache.tgz.part-aa", "triton_cache.tgz.part-ab"]
    assert len(files) <= 8 and all(os.path.getsize(out / f) <= 15 * 2**20 for f in files)
    log = (out / "device_run.log").read_text()
    assert "CUT (check stopped)" in log and "== gpu_check summary" in log
    assert "TRITON_CACHE_DIR is set" in log           # the packed cache was not unpacked over it
    with tarfile.open(out / "gpu_check.tgz") as tar:
        assert "./summary.tsv" in tar.getnames()
    joined = b"".join((out / f).read_bytes() for f in files if f.startswith("triton_cache"))
    with tarfile.open(fileobj=io.BytesIO(joined)) as tar:
        assert "./blob.bin" in tar.getnames()


def test_gpu_check_fsdp_result_takes_the_last_finite_loss(tmp_path):
    """The FSDP stages' summary: median tokens/s of the last half, and the last finite loss (a
    last row may log "loss": null), or a note when no row has tokens/s."""
    text = open(os.path.join(REPO, "bench/gpu_check.sh")).read()
    code = text[text.index("import json, math, sys"):text.index("PYEOF", text.index("import json, math, sys"))]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 5.5, "tokens_per_s": 100}\n{"step": 2, "loss": 5.1, "tokens_per_s": 300}\n'
                       '{"step": 3, "loss": null, "tokens_per_s": 310}\n')
    run = lambda: subprocess.run([sys.executable, "-c", code, str(metrics)], capture_output=True, text=True,  # noqa: E731
                                 check=True).stdout.strip()
    assert run() == "310 tok/s (median of the last half of 3 rows), loss 5.100 at step 2"
    metrics.write_text("")
    assert run() == "no metrics row with tokens/s"


def test_label_scoring_groups_give_the_one_at_a_time_scores(tmp_path, capsys):
    """bench/label_scoring.py at a tiny HOPE: CLINC's 150 labels one per forward and all in one
    group score alike (the grouped scorer, eval.common.continuation_logprobs), a row per batch
    size and the footer; a bad --batch-sizes is one line naming the flag."""
    from bench import label_scoring
    from conftest import SHARED_DATA
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  arch: hope\n  d_model: 16\n  n_layer: 1\n  n_head: 2\ntrain:\n  seq_len: 32\n")
    argv = [str(config), "--device", "cpu", "--batch-sizes", "1,150", "--prefix-tokens", "40", "--repeats", "1",
            "--data-dir", SHARED_DATA]
    assert label_scoring.main(argv) == 0
    out = capsys.readouterr().out
    assert "150 labels of 1-" in out
    rows = {int(r[1]): float(r[4]) for r in (line.split("|") for line in out.splitlines())
            if len(r) == 6 and r[1].strip().isdigit()}
    assert set(rows) == {1, 150} and rows[150] < 1e-4
    _footer_ok(out, "label_scoring.py", argv)
    assert label_scoring.main(["--batch-sizes", "4,0"]) == 2
    assert capsys.readouterr().err == "error: --batch-sizes '4,0': must be >= 1, got 0\n"
