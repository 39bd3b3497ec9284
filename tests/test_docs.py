"""The docs name only things that exist: the tests docs/FIDELITY.md cites for each equation,
the files, the config keys in example commands, and the functions and classes they point a
reader to. A rename that forgets a doc fails here, naming the doc and the stale name."""
import ast
import functools
import glob
import os
import re

import pytest

from config import _declared_type

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "BENCHMARKS.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))
# what example commands live in besides the docs
COMMAND_FILES = DOCS + sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/bench/*.sh"))
CONFIG_SECTIONS = "model|data|optim|train|logging|distributed|eval"
EXTERNAL = ("torch.", "triton.", "F.", "np.", "tl.")          # other projects' names
FILE_SUFFIXES = {"py", "yaml", "md", "json", "jsonl", "sh", "txt", "bin", "bpe", "npy", "pt",
                 "safetensors"}


def _read(rel: str) -> str:
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
        return f.read()


@functools.cache
def _test_names() -> dict[str, set[str]]:
    """tests/test_x.py -> the test functions it defines."""
    return {os.path.relpath(p, REPO): set(re.findall(r"^\s*def (test_\w+)", _read(os.path.relpath(p, REPO)), re.M))
            for p in glob.glob(f"{REPO}/tests/test_*.py")}


@functools.cache
def _defined_names() -> set[str]:
    """Every function, class, and assigned name or attribute in the repo's own Python files."""
    names = set()
    for path in glob.glob(f"{REPO}/**/*.py", recursive=True):
        rel = os.path.relpath(path, REPO)
        if rel.startswith("."):                                # .venv, .fla
            continue
        for node in ast.walk(ast.parse(_read(rel))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        names.add(target.id)
                    elif isinstance(target, ast.Attribute):
                        names.add(target.attr)
    return names


@pytest.mark.parametrize("doc", DOCS)
def test_cited_tests_exist(doc):
    tests = _test_names()
    every_test = set().union(*tests.values())
    text = _read(doc)
    stale = [f"{f}::{t}" for f, t in re.findall(r"(tests/test_\w+\.py)::(test_\w+)", text)
             if t not in tests.get(f, ())]
    for name in set(re.findall(r"\b(test_\w+)", text)):
        if name.endswith("_"):                                 # a family: test_streaming_*
            known = any(t.startswith(name) for t in every_test) or any(
                os.path.basename(f).startswith(name) for f in tests)
        else:
            known = name in every_test or f"tests/{name}.py" in tests
        if not known:
            stale.append(name)
    assert not stale, f"{doc} cites tests that do not exist: {sorted(set(stale))}"


@pytest.mark.parametrize("doc", DOCS)
def test_named_files_exist(doc):
    paths = set(re.findall(r"\b((?:kernels|bench|configs|tests|eval|data|docs)/[\w./-]*\w\.(?:py|yaml|sh|md))",
                           _read(doc)))
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(REPO, p)))
    assert not missing, f"{doc} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", COMMAND_FILES)
def test_config_keys_in_commands_exist(doc):
    """--section.key overrides and section.key=value settings, as written in examples."""
    pattern = rf"--((?:{CONFIG_SECTIONS})(?:\.[\w-]+)+)|\b((?:{CONFIG_SECTIONS})(?:\.\w+)+)="
    keys = {flag or setting for flag, setting in re.findall(pattern, _read(doc))}
    unknown = sorted(k for k in keys if _declared_type(k.replace("-", "_")) is None)
    assert not unknown, f"{doc} uses config keys that do not exist: {unknown}"


@pytest.mark.parametrize("doc", DOCS)
def test_named_code_exists(doc):
    """`module.name` / `Class.method` in backticks: a module file of that path, or a last
    part that the repo defines somewhere."""
    defined = _defined_names()
    stale = []
    for name in set(re.findall(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(\))?`", _read(doc))):
        parts = name.split(".")
        if name.startswith(EXTERNAL) or FILE_SUFFIXES & set(parts):
            continue
        as_module = os.path.join(REPO, *parts)
        if os.path.exists(as_module + ".py") or os.path.isdir(as_module) or parts[-1] in defined:
            continue
        stale.append(name)
    assert not stale, f"{doc} names code that does not exist: {sorted(stale)}"
