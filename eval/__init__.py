"""
Evaluations (DESIGN §7). Each module is importable on its own and has its own CLI:

    python -m eval.perplexity --checkpoint out/run   # val loss / bpb, WikiText, LAMBADA

Submodules are not imported here, so `import eval.perplexity` pulls in only what it
needs (no `datasets`, no `lm_eval`).
"""
