"""bench/precompile.py: compiling gpu_check.sh's Triton kernels without a GPU into a packed
cache that the check unpacks (BENCHMARKS.md). The compile runs in a subprocess without
TRITON_INTERPRET (conftest.py sets it for the test session), on the step budget's small kernel."""
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest

from bench import precompile
from test_triton_compile import _backend_missing_cached

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILING_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # conftest sets it


def test_the_compile_runs_are_gpu_checks_own_commands():
    stages = dict(precompile.gpu_check_commands())
    assert {"step_titans_lmm_760m_fused", "step_hope_760m_fused", "kernels", "cuda_tests",
            "step_titans_lmm_760m_fused_ac8", "step_hope_760m_fused_ac8"} <= set(stages)
    script, argv = precompile.compile_only_argv(stages["step_hope_760m_fused_ac8"])   # the configs' own setting
    assert script == "step" and "--train.batch_size=8" in argv
    assert "--distributed.activation_checkpointing=true" in argv
    script, argv = precompile.compile_only_argv(stages["step_hope_760m_fused"])
    assert script == "step" and argv[0] == "configs/hope_760m.yaml"
    assert "--model.kernels=triton" in argv and argv[-len(precompile.STEP_OVERRIDES):] == precompile.STEP_OVERRIDES
    script, argv = precompile.compile_only_argv(stages["kernels"])
    assert script == "kernels" and "--json" not in argv and "--parts" in argv
    assert precompile.compile_only_argv(stages["cuda_tests"]) == (None, "its cases need a CUDA device")
    fla = ["env", "PYTHONPATH=/repo/.fla/site", "python", "bench/kernels.py", "--parts", "scans"]   # listed with .fla/site
    assert precompile.compile_only_argv(fla) == ("kernels", ["--parts", "scans"] + precompile.KERNEL_BENCH_OVERRIDES)
    assert precompile.compile_only_argv(stages["step_transformer_760m"])[0] is None     # no Triton kernels


def test_unpacking_points_each_kernel_at_its_new_folder(tmp_path):
    """Triton counts a hit only if the files its group file lists exist, by absolute path."""
    packed = tmp_path / "src" / "ABC"
    packed.mkdir(parents=True)
    (packed / "k.cubin").write_bytes(b"\0")
    (packed / "__grp__k.json").write_text(json.dumps(
        {"child_paths": {"k.cubin": "/elsewhere/ABC/k.cubin"}}))
    with tarfile.open(tmp_path / "cache.tgz", "w:gz") as tar:
        tar.add(tmp_path / "src", arcname=".")
    precompile.unpack_cache(str(tmp_path / "cache.tgz"), str(tmp_path / "dst"))
    group = json.loads((tmp_path / "dst" / "ABC" / "__grp__k.json").read_text())
    assert group["child_paths"] == {"k.cubin": str(tmp_path / "dst" / "ABC" / "k.cubin")}
    with pytest.raises(ValueError, match="not a packed Triton cache"):
        precompile.unpack_cache(str(packed / "k.cubin"), str(tmp_path / "other"))


def _fake_wheel(path, version, module_text, lib=b"lib"):
    import triton
    local = os.path.join(os.path.dirname(triton.__file__), "runtime", "cache.py")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"triton-{version}.dist-info/METADATA", "")
        z.writestr("triton/runtime/cache.py", module_text if module_text is not None else open(local).read())
        z.writestr("triton/_C/libtriton.so", lib)
    return str(path)


def test_the_target_wheels_library_hash(tmp_path):
    import hashlib

    import triton
    wheel = _fake_wheel(tmp_path / "ok.whl", triton.__version__, None)
    assert precompile.wheel_libtriton_hash(wheel) == hashlib.sha256(b"lib").hexdigest()
    for name, version, text, match in [("old.whl", "0.0.1", None, "is not triton"),
                                       ("edited.whl", triton.__version__, "x = 1\n", "differs from")]:
        with pytest.raises(ValueError, match=match):
            precompile.wheel_libtriton_hash(_fake_wheel(tmp_path / name, version, text))
    with pytest.raises(ValueError, match="not a readable wheel"):
        precompile.wheel_libtriton_hash(str(tmp_path / "missing.whl"))


@pytest.mark.parametrize("args, env, message", [
    ([], {"TRITON_INTERPRET": "1"}, "TRITON_INTERPRET is set"),
    (["--stages", "nothing*"], {}, "matches no gpu_check.sh stage"),
    (["--target-wheel", "missing.whl"], {}, "not a readable wheel"),
    (["--capability", "75"], {}, "argument --capability"),
    (["--out", "."], {}, "is a folder"),
])
@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path, args, env, message):
    env = {**COMPILING_ENV, **env}
    out = subprocess.run([sys.executable, "bench/precompile.py", "--out", str(tmp_path / "c.tgz"), *args],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c.tgz").exists()


def test_bad_existing_cache_is_one_line(tmp_path):
    (tmp_path / "c.tgz").write_text("not a tarball")
    env = COMPILING_ENV
    out = subprocess.run([sys.executable, "bench/precompile.py", "--out", str(tmp_path / "c.tgz"),
                          "--stages", "kernels"], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 2 and "--out" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert (tmp_path / "c.tgz").read_text() == "not a tarball"          # loses nothing


def test_each_stage_compiles_in_a_fresh_process(tmp_path, monkeypatch):
    """As on the GPU, where gpu_check.sh runs each stage in its own process: Triton's cache
    key of a kernel depends on the kernels hashed before it in the process (run_stage)."""
    stages = [("kernels", ["python", "bench/kernels.py", "--parts", "budget"]),
              ("tests", ["python", "-m", "pytest", "tests/test_x.py"]),
              ("step_x", ["python", "bench/step.py", "configs/x.yaml", "--model.kernels=triton"])]
    calls, real_run = [], subprocess.run

    def run(argv, **kwargs):
        if argv[:2] != [sys.executable, "-c"]:           # write_record's git
            return real_run(argv, **kwargs)
        calls.append((argv, kwargs["env"]))
        return subprocess.CompletedProcess(argv, 0)
    monkeypatch.setattr(precompile, "gpu_check_commands", lambda: stages)
    monkeypatch.setattr(precompile.subprocess, "run", run)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert precompile.main(["--out", str(tmp_path / "c.tgz")]) == 0
    assert [argv[:3] for argv, _ in calls] == [[sys.executable, "-c", precompile.STAGE]] * 2
    assert [argv[3] for argv, _ in calls] == ["kernels", "step"]
    assert calls[0][0][6:] == ["--parts", "budget"] + precompile.KERNEL_BENCH_OVERRIDES
    assert all(env["TRITON_INTERPRET"] == "0" and env["TRITON_CACHE_DIR"] for _, env in calls)


@pytest.mark.slow
def test_a_stage_process_compiles_and_reports_failure(tmp_path):
    """run_stage: the stage's own output muted, the compile log printed; a failing stage
    says so and exits 1."""
    why = _backend_missing_cached()
    if why:
        pytest.skip(why)
    env = {**COMPILING_ENV, "OMP_NUM_THREADS": "1", "TRITON_CACHE_DIR": str(tmp_path)}
    stage = [sys.executable, "-c", precompile.STAGE, "kernels", "90", ""]
    out = subprocess.run(stage + ["--quick", "--parts", "budget"] + precompile.KERNEL_BENCH_OVERRIDES,
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "_budget_fwd_kernel: compiled" in out.stdout and "budget/" not in out.stdout
    out = subprocess.run(stage + ["--parts", "nothing"], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 1 and "FAILED (SystemExit: 2)" in out.stdout


COMPILE_AND_PACK = textwrap.dedent("""
    import os, sys, tarfile, torch
    sys.path.insert(0, os.getcwd())
    from bench import precompile
    archive, cache, libtriton_hash = sys.argv[1:]
    os.environ["TRITON_CACHE_DIR"] = cache
    if os.path.exists(archive):
        precompile.unpack_cache(archive, cache)
    with precompile.compiling_offline(90, libtriton_hash or None):
        from kernels import triton_budget
        w = torch.rand(3, 8)
        e = triton_budget.capped_steps(w, torch.zeros(3, 8), torch.rand(3, 8, 8), 0.5)
        assert e.shape == (3, 8)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cache, arcname=".")
""")


@pytest.mark.slow
def test_compiles_for_the_gpu_and_a_packed_cache_hits_elsewhere(tmp_path):
    """The first process compiles the kernel for sm_90 (a cubin in the cache) and runs
    nothing; a second one, unpacking the archive into another folder, finds it cached; a
    third, keyed with another libtriton.so's hash (--target-wheel), compiles it again."""
    why = _backend_missing_cached()
    if why:
        pytest.skip(why)
    env = {**COMPILING_ENV, "OMP_NUM_THREADS": "1"}
    archive = str(tmp_path / "cache.tgz")
    logs = []
    for run, libtriton_hash in (("first", ""), ("second", ""), ("third", "0" * 64)):
        out = subprocess.run([sys.executable, "-c", COMPILE_AND_PACK, archive, str(tmp_path / run), libtriton_hash],
                             capture_output=True, text=True, cwd=REPO, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        logs.append(out.stdout)
    assert "_budget_fwd_kernel: compiled" in logs[0]
    assert "_budget_fwd_kernel: cached" in logs[1]
    assert "_budget_fwd_kernel: compiled" in logs[2]
    with tarfile.open(archive) as tar:
        assert any(n.endswith("_budget_fwd_kernel.cubin") for n in tar.getnames())


def test_the_record_says_whether_this_triton_is_the_one_compiled_for(tmp_path):
    """gpu_check.sh prints precompiled_note after unpacking: a mismatch shows before the compiles."""
    assert precompile.precompiled_note(str(tmp_path)) == ""               # not from precompile.py
    here = precompile.local_libtriton_hash()
    precompile.write_record(str(tmp_path), here, 90)
    note = precompile.precompiled_note(str(tmp_path))
    assert note.endswith("matches") and "sm_90" in note, note
    precompile.write_record(str(tmp_path), "0" * 64, 90)
    assert "DIFFERS" in precompile.precompiled_note(str(tmp_path))


ANY_LENGTH = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, os.getcwd())
    from bench import precompile
    os.environ["TRITON_CACHE_DIR"] = sys.argv[1]
    with precompile.compiling_offline(90):
        import kernels
        for T in (37, 64, 1000):
            print(f"T={T}", flush=True)
            q, k, u = torch.rand(1, T, 2, 16), torch.rand(1, T, 2, 16), torch.rand(1, T, 2, 32)
            kernels.delta_rule(q, k, u, torch.rand(1, T, 2), torch.rand(1, T, 2), chunk_size=16, backend="triton")
""")


@pytest.mark.slow
def test_one_compiled_kernel_serves_every_length(tmp_path):
    """kernels.triton_delta.LENGTH_ARGS are not specialised: T = 37, 64 (divisible by 16)
    and 1000 launch the delta rule's forward kernels compiled for the first. The autotuned
    scan compiles every config the GPU would time: at V = 32, V-blocks of 16 and 32 at 4
    and 8 warps."""
    why = _backend_missing_cached()
    if why:
        pytest.skip(why)
    env = {**COMPILING_ENV, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", ANY_LENGTH, str(tmp_path)], capture_output=True,
                         text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    first, later = out.stdout.split("T=64")
    assert first.count(": compiled") >= 2 and ": compiled" not in later, out.stdout
    assert first.count("_delta_fwd_scan_kernel: compiled") == 4, out.stdout


def test_every_kernel_entry_takes_any_length():
    """Every Triton kernel entry in kernels/ leaves its sequence-length arguments unspecialised."""
    import importlib

    import triton

    from kernels.triton_delta import LENGTH_ARGS
    seen = 0
    for name in ("budget", "cms", "delta", "hope", "memory", "mlp_memory", "momentum"):
        module = importlib.import_module(f"kernels.triton_{name}")
        for attr, fn in vars(module).items():
            if attr.endswith("_kernel") and isinstance(fn, triton.runtime.KernelInterface):
                seen += 1
                while isinstance(fn, triton.runtime.Autotuner):     # the scans (autotune_scan)
                    fn = fn.fn
                args = set(fn.arg_names) & set(LENGTH_ARGS)
                unspecialised = (fn.kwargs["do_not_specialize"] if hasattr(fn, "kwargs")    # interpreter
                                 else fn.do_not_specialize) or ()
                assert args <= set(unspecialised), attr
    assert seen == 25


def test_cpu_tensors_pass_the_kernels_checks_only_interpreted_or_compiling_offline(monkeypatch):
    """kernels.checks.interpreting() means the interpreter alone (bench/kernels.py refuses
    16-bit inputs by it); precompile's compile-only launches take CPU tensors through
    COMPILING_OFFLINE instead."""
    import torch

    from kernels import checks
    x = {"q": torch.zeros(2)}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not checks.interpreting() and not checks.cpu_tensors_allowed()
    with pytest.raises(ValueError, match="the Triton kernels need CUDA tensors"):
        checks.check_tensors(x, "q", kernels="the Triton kernels")
    monkeypatch.setattr(checks, "COMPILING_OFFLINE", True)
    checks.check_tensors(x, "q", kernels="the Triton kernels")
    assert not checks.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(checks, "COMPILING_OFFLINE", False)
    assert checks.interpreting() and checks.cpu_tensors_allowed()
