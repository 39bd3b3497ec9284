"""Test environment: offline, no wandb, the Triton interpreter when there is no GPU; the
fixtures that several test files share (`corpus`); and, with PYTEST_REPORT_AT_ONCE=1
(bench/gpu_check.sh), each test's outcome and time, and a failure's traceback, printed as
the test ends, so a run cut short by a time limit still says why a test failed."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Offline data for tests and evals (CI lays shared/ beside the checkout). Exported only where
# it is a folder: eval.common.default_data_dir refuses a variable that names none.
SHARED_DATA = os.environ.get("NL_SHARED_DATA") or os.path.join(os.path.dirname(REPO), "shared", "data")
if os.path.isdir(SHARED_DATA):
    os.environ.setdefault("NL_SHARED_DATA", SHARED_DATA)

import torch  # noqa: E402  (torch does not import triton at import time)

# TRITON_INTERPRET must be set before triton is first imported: Triton kernels then run
# on CPU tensors in the interpreter (fp32 only, slow: tests use tiny shapes).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One intra-op thread: the test models are tiny, and extra threads only add spin-wait
# overhead (5-25x slower for the memory layers on a busy 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A prepared byte-level dataset from tiny-shakespeare (first 200 KB split into 400
    documents), made once per session: the training tests only read it."""
    from helpers import prepare_shakespeare
    return prepare_shakespeare(tmp_path_factory.mktemp("corpus"), 200_000, 400)


@pytest.fixture
def tensor_core_tf32(monkeypatch):
    """tf32 products as NVIDIA's tensor cores make them: the low 13 mantissa bits of each fp32
    operand dropped (truncated toward zero; Triton hands the registers over as they are). The
    interpreter computes every tl.dot in fp32, so on CPU its dot is patched to do the same;
    on a GPU the hardware does it."""
    if torch.cuda.is_available():
        return
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    exact_dot = interpreter.InterpreterBuilder.create_dot

    def truncated(x):
        return (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32) if x.dtype == np.float32 else x

    def create_dot(self, a, b, acc, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32:
            a = interpreter.TensorHandle(truncated(a.data), a.dtype.scalar)
            b = interpreter.TensorHandle(truncated(b.data), b.dtype.scalar)
        return exact_dot(self, a, b, acc, input_precision, max_num_imprecise_acc)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def pytest_runtest_logreport(report):
    """PYTEST_REPORT_AT_ONCE=1: one line per test as it ends (outcome, seconds), and a
    failure's traceback at once instead of in the summary that a killed run never prints."""
    if not os.environ.get("PYTEST_REPORT_AT_ONCE") or (report.when != "call" and report.passed):
        return
    if report.when == "call" or report.failed:
        print(f"\n[at once] {report.nodeid} {report.when}: {report.outcome} in {report.duration:.1f} s",
              flush=True)
    if report.failed:
        print(report.longreprtext, flush=True)
