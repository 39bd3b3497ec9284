"""Compile, on a machine without a GPU, the Triton kernels that bench/gpu_check.sh launches on
an H100, into the packed cache the check starts from (GPU_CHECK_CACHE_IN, default
.triton_cache.tgz). Compiling dominated every GPU check so far (BENCHMARKS.md: ~80 s for one
MLP-memory backward variant; a cold Titans step did not finish in 150 s), each device machine
starts bare, and the compilers (LLVM, ptxas) need no GPU.

    PYTHONPATH=/tmp/t36site python bench/precompile.py --target-wheel triton-3.6.0-cp312-*.whl
    python bench/precompile.py --stages 'step_titans_*' --out /tmp/cache.tgz

How: Triton keys its on-disk cache on the kernel's source, its specialisation (argument
dtypes, 16-byte-aligned pointers, integers equal to 1 or divisible by 16), the constexprs, the
compile options, the target (cuda, sm_90), ptxas' version and Triton's own files
(triton_key). Here a stand-in driver answers for the GPU (OfflineCuda) and every launch is
turned into a warm-up (compile, do not run; an autotuned launch compiles every config it
would time), so gpu_check.sh's own commands (read from
GPU_CHECK_LIST=1) run on CPU tensors, each in a fresh process as on the GPU (run_stage says
why), and compile exactly the variants the GPU asks for: its
step runs with model.kernels=triton, at one block (--model.n_layer=1: every block launches
the same kernels) for one step, in bf16 autocast with TF32 fp32 matmuls as on the GPU
(train.setup_precision); its kernel bench once, fused rows only (--repeats 1 --impls triton
--no-errors). No kernel runs, so the printed numbers mean nothing; only the launches count.
Not compiled: the pytest stages (their cases need a CUDA device), fla's own kernels (the fla
stage compiles our rows only) and steps without model.kernels=triton ("auto" resolves to
PyTorch on CPU).

The cache matches the GPU's only for the same Triton release (the GPU image runs 3.6.0: put
that release first on PYTHONPATH, e.g. pip install --no-deps --target /tmp/t36site
triton==3.6.0) and the same libtriton.so, which Triton hashes into every key and which is built
per Python version (the image runs Python 3.12; .library/device/KINDS.md). --target-wheel names
the GPU's wheel (pip download --no-deps --only-binary=:all: --python-version 3.12
triton==3.6.0): its libtriton.so's hash stands in for the local one's, after a check that the
wheel's release and Python files are the local ones. gpu_check.sh prints how many kernels it
found cached and how many it compiled itself, so a key that still differs shows there.
"""
import argparse
import contextlib
import datetime
import fnmatch
import functools
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.common import report_error  # noqa: E402
from cli import OneLineArgumentParser, check_output_file, write_atomic  # noqa: E402

# What the compile-only runs add to gpu_check's commands (later flags win).
STEP_OVERRIDES = ["--device", "cpu", "--steps", "1", "--warmup", "0", "--profile-rows", "0",
                  "--model.n_layer=1", "--train.dtype=bfloat16"]
# (--dtype stays the stage's: the scans part's bf16 on the GPU; the other parts take fp32)
KERNEL_BENCH_OVERRIDES = ["--repeats", "1", "--impls", "triton", "--no-errors"]


def gpu_check_commands(env=None):
    """[(stage name, argv)] of gpu_check.sh's stages on the GPU (GPU_CHECK_LIST=1)."""
    env = dict(os.environ if env is None else env, GPU_CHECK_LIST="1", GPU_CHECK_DRY="0")
    out = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh")], env=env,
                         capture_output=True, text=True, check=True).stdout
    return [(name, cmd.split()) for name, cmd in (line.split("\t", 1) for line in out.splitlines())]


def compile_only_argv(argv):
    """(script, argv to run it with) for a stage whose kernels can be compiled here, else
    (None, why not). The step runs with model.kernels=triton and the kernel bench qualify;
    pytest and fla do not."""
    if "bench/step.py" in argv:
        if "--model.kernels=triton" not in argv:   # "auto" resolves by device: per-chunk on CPU
            return None, "without --model.kernels=triton its kernels would resolve to PyTorch on CPU"
        return "step", argv[argv.index("bench/step.py") + 1:] + STEP_OVERRIDES
    if "bench/kernels.py" in argv:       # also the fla stage: its own rows (fla is not compiled)
        args = argv[argv.index("bench/kernels.py") + 1:]
        if "--json" in args:                         # gpu_check's output file: not written here
            i = args.index("--json")
            del args[i:i + 2]
        return "kernels", args + KERNEL_BENCH_OVERRIDES
    return None, ("its cases need a CUDA device" if "pytest" in argv else
                  "neither a step with model.kernels=triton nor a kernel bench")


def wheel_libtriton_hash(wheel):
    """sha256 of the libtriton.so in a Triton wheel, after checking that the wheel's release and
    Python files are the imported Triton's (so only the Python-version-specific library
    differs in the cache key). One-line ValueError otherwise."""
    import triton
    local = os.path.dirname(triton.__file__)
    try:
        z = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"--target-wheel {wheel}: not a readable wheel ({e})") from None
    with z:
        names = z.namelist()
        if not any(n.startswith(f"triton-{triton.__version__}.dist-info/") for n in names):
            raise ValueError(f"--target-wheel {wheel} is not triton {triton.__version__}, the "
                             f"release imported here ({local})")
        for name in (n for n in names if n.startswith("triton/") and n.endswith(".py")):
            path = os.path.join(local, name[len("triton/"):])
            if not os.path.exists(path):
                raise ValueError(f"--target-wheel {wheel}: {name} has no counterpart {path}")
            with open(path, "rb") as f:
                if f.read() != z.read(name):
                    raise ValueError(f"--target-wheel {wheel}: {name} differs from {path}")
        lib = [n for n in names if n.startswith("triton/_C/libtriton.") and n.endswith(".so")]
        if not lib:
            raise ValueError(f"--target-wheel {wheel} holds no triton/_C/libtriton.so")
        with z.open(lib[0]) as f:
            return _sha256(f)


def local_libtriton_hash():
    """sha256 of the imported Triton's libtriton.so (what its cache keys hash)."""
    import triton
    with open(os.path.join(os.path.dirname(triton.__file__), "_C", "libtriton.so"), "rb") as f:
        return _sha256(f)


def _sha256(f):
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


class OfflineCuda:
    """What Triton's JIT asks its driver for before compiling, answered for a CUDA GPU of the
    given compute capability (90: H100, H200) on a machine that has none. The kernels see
    CPU tensors: their pointers' alignment and dtypes specialise them as CUDA tensors would."""

    def __init__(self, capability):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")


@contextlib.contextmanager
def compiling_offline(capability=90, libtriton_hash=None, log=print):
    """Within: every Triton launch compiles its kernel for the GPU into TRITON_CACHE_DIR and
    runs nothing (outputs stay unwritten); the kernels' host checks accept CPU tensors; fp32
    matmuls are "high" (TF32, as train.setup_precision sets on CUDA, which the kernels'
    tl.dot precision follows). With libtriton_hash, Triton's cache key takes that hash of
    libtriton.so instead of the local one's. Logs each kernel compiled (or found cached)."""
    import kernels.checks
    if kernels.checks.interpreting():
        raise ValueError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    os.environ["TRITON_INTERPRET"] = "0"      # bench/kernels.py would set it on a CPU machine
    import torch
    import triton.runtime.cache as triton_cache
    from triton.compiler import ASTSource
    from triton.runtime import Autotuner, driver
    from triton.runtime.jit import JITFunction

    key_fn, run, do_compile = triton_cache.triton_key, JITFunction.run, JITFunction._do_compile
    tune = Autotuner.run
    source_to_ir, active_driver = ASTSource.make_ir, driver._active
    precision = torch.get_float32_matmul_precision()

    def warmup_run(self, *args, grid, warmup, **kw):
        return run(self, *args, grid=grid, warmup=True, **kw)

    def compile_every_config(self, *args, **kw):
        """An autotuned kernel (kernels.triton_delta._autotuned: the scans and their gradient
        kernels): every config the GPU will time, compiled (Autotuner.warmup), none timed."""
        kw.pop("warmup")         # the launch's warmup=False; Autotuner.warmup sets its own
        return self.warmup(*args, **kw)

    lowered = []       # ASTSource.make_ir calls: Triton lowers a kernel's source only on a cache miss

    def make_ir(self, *args, **kw):
        lowered.append(self)
        return source_to_ir(self, *args, **kw)

    def timed_compile(self, *args, **kw):
        misses, t0 = len(lowered), time.time()
        kernel = do_compile(self, *args, **kw)
        log(f"  {self.fn.__name__}: {'compiled' if len(lowered) > misses else 'cached'} "
            f"({time.time() - t0:.1f} s)")
        return kernel

    if libtriton_hash:
        local = local_libtriton_hash()
        if local not in key_fn():
            raise ValueError("this Triton's cache key does not hash its libtriton.so: "
                             "--target-wheel cannot stand in for it")
        target_key = key_fn().replace(local, libtriton_hash)
        triton_cache.triton_key = functools.lru_cache()(lambda: target_key)
    driver.set_active(OfflineCuda(capability))
    JITFunction.run, JITFunction._do_compile, ASTSource.make_ir = warmup_run, timed_compile, make_ir
    Autotuner.run = compile_every_config
    kernels.checks.COMPILING_OFFLINE = True
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        triton_cache.triton_key, JITFunction.run, JITFunction._do_compile = key_fn, run, do_compile
        ASTSource.make_ir, driver._active, Autotuner.run = source_to_ir, active_driver, tune
        kernels.checks.COMPILING_OFFLINE = False
        torch.set_float32_matmul_precision(precision)


def unpack_cache(archive, cache_dir):
    """Unpack a packed Triton cache into cache_dir. Each kernel's group file
    (__grp__NAME.json) lists its files by absolute path, which Triton checks before it
    counts a hit: they are rewritten to where the files now are, so a cache packed on
    another machine or under another folder still hits. One-line ValueError if unreadable."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(cache_dir, filter="data")
    except (OSError, tarfile.TarError) as e:
        raise ValueError(f"{archive} is not a packed Triton cache: {e}") from None
    for folder, _, files in os.walk(cache_dir):
        for name in (f for f in files if f.startswith("__grp__") and f.endswith(".json")):
            path = os.path.join(folder, name)
            with open(path) as f:
                group = json.load(f)
            group["child_paths"] = {child: os.path.join(os.path.abspath(folder), child)
                                    for child in group.get("child_paths", {})}
            with open(path, "w") as f:
                json.dump(group, f)


RECORD = "PRECOMPILED.json"      # in the cache's root, beside the kernels' folders (Triton ignores it)


def precompiled_note(cache_dir):
    """One line on a cache that precompile packed (its RECORD): for which Triton and
    libtriton.so, at which commit, and whether this machine's libtriton.so is that one (else
    every kernel compiles again). "" for a cache without a record."""
    path = os.path.join(cache_dir, RECORD)
    if not os.path.exists(path):
        return ""
    import triton
    with open(path) as f:
        r = json.load(f)
    here = local_libtriton_hash()
    same = (r["triton"], r["libtriton_sha256"]) == (triton.__version__, here)
    return (f"precompiled at commit {r['commit'][:10]} on {r['date']} for triton {r['triton']} (libtriton "
            f"sha256 {r['libtriton_sha256'][:12]}), sm_{r['capability']}: this machine's triton "
            f"{triton.__version__} (libtriton {here[:12]}) "
            + ("matches" if same else "DIFFERS: its kernels will compile again"))


def cached_kernels():
    """How many compiled kernels TRITON_CACHE_DIR holds (one group file each)."""
    root = os.environ["TRITON_CACHE_DIR"]
    return sum(1 for _, _, files in os.walk(root) for f in files if f.startswith("__grp__"))


def write_record(cache_dir, libtriton_hash, capability):
    """RECORD: what the cache was compiled for (precompiled_note reads it on the GPU)."""
    import triton
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    with open(os.path.join(cache_dir, RECORD), "w") as f:
        json.dump({"triton": triton.__version__, "libtriton_sha256": libtriton_hash,
                   "capability": capability, "commit": git.stdout.strip() if git.returncode == 0 else "",
                   "date": datetime.date.today().isoformat()}, f)


STAGE = "import sys; from bench.precompile import run_stage; sys.exit(run_stage(sys.argv[1:]))"


def run_stage(argv):
    """One stage's compiles, in the process that runs it (precompile.main starts one per
    stage): argv = [script ("step" or "kernels"), capability, libtriton hash or "", the
    script's arguments...]. Its own output is muted, the compile log printed. Each stage
    gets a fresh process because Triton 3.6's cache key of a kernel depends on the kernels
    hashed before it in the same process: JITFunction.cache_key merges each callee's recorded
    constexpr globals before hashing that callee (DependenciesFinder._update_hash), so a
    helper first hashed inside another kernel adds them, and one hashed for the first time
    does not. gpu_check.sh runs each stage in its own process, so the keys match only in the
    same order from a fresh start (measured: _delta_prep_kernel's key differs after the
    HOPE step's kernels were hashed)."""
    script, capability, libtriton_hash, run_argv = argv[0], int(argv[1]), argv[2] or None, argv[3:]
    log = functools.partial(print, file=sys.stdout, flush=True)   # bound before the run's output is muted
    try:
        with compiling_offline(capability, libtriton_hash, log), \
                open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            if script == "step":       # imported here: bench/kernels.py sets TRITON_INTERPRET on CPU
                from bench.step import main as run
            else:
                from bench.kernels import main as run
            rc = run(run_argv)         # its numbers mean nothing
    except (Exception, SystemExit) as e:     # noqa: BLE001  (reported; the other stages go on)
        rc = f"{type(e).__name__}: {e}".splitlines()[0]
    if rc not in (0, None):
        print(f"  FAILED ({rc})", flush=True)
        return 1
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, ".triton_cache.tgz"),
                   help="the packed cache (default: the repo's .triton_cache.tgz, gpu_check.sh's "
                        "GPU_CHECK_CACHE_IN); an existing one is unpacked first and added to")
    p.add_argument("--stages", nargs="+", default=["*"],
                   help="shell patterns of gpu_check.sh's stages to compile (default: every one "
                        "that can be compiled here)")
    p.add_argument("--target-wheel", default="",
                   help="the GPU's Triton wheel, whose libtriton.so enters the cache key (above)")
    p.add_argument("--capability", type=int, choices=(80, 90), default=90,
                   help="the GPU's compute capability (90: H100 and H200)")
    args = p.parse_args(argv)
    from kernels.checks import interpreting
    if interpreting():
        return report_error("TRITON_INTERPRET is set: the interpreter compiles nothing; unset it")
    try:
        out = check_output_file(args.out)
        libtriton_hash = wheel_libtriton_hash(args.target_wheel) if args.target_wheel else None
    except ValueError as e:
        return report_error(e)
    stages = [(n, a) for n, a in gpu_check_commands()
              if any(fnmatch.fnmatchcase(n, s) for s in args.stages)]
    if not stages:
        return report_error(f"--stages {' '.join(args.stages)} matches no gpu_check.sh stage")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        if os.path.exists(out):
            try:
                unpack_cache(out, cache)
            except ValueError as e:
                return report_error(f"--out: {e}")
        start, failed = cached_kernels(), []
        print(f"triton cache: {start} kernels from {out}" if start else "triton cache: empty")
        for name, cmd in stages:
            script, run_argv = compile_only_argv(cmd)
            if script is None:
                print(f"{name}: skipped ({run_argv})")
                continue
            print(f"{name}: python bench/{script}.py {' '.join(run_argv)}", flush=True)
            t0 = time.time()
            # A fresh process per stage, as on the GPU: Triton's cache key of a kernel depends on
            # which kernels this process hashed before it (run_stage).
            env = dict(os.environ, TRITON_CACHE_DIR=cache, TRITON_INTERPRET="0")
            rc = subprocess.run([sys.executable, "-c", STAGE, script, str(args.capability),
                                 libtriton_hash or "", *run_argv], env=env, cwd=REPO).returncode
            if rc != 0:
                failed.append(name)
            print(f"{name}: {'done' if rc == 0 else 'FAILED'} in {time.time() - t0:.0f} s")
        total = cached_kernels()
        write_record(cache, libtriton_hash or local_libtriton_hash(), args.capability)
        def pack(path):
            with tarfile.open(path, "w:gz") as tar:
                tar.add(cache, arcname=".")
        write_atomic(out, pack)
    print(f"triton cache: {total} kernels ({total - start} new) -> {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
