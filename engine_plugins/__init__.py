"""The vLLM side of the gateway: Fireworks sampling extensions as vLLM logits processors,
the worker launcher that loads them, and model preparation.

Importing this package must stay light: vLLM imports processor modules in its frontend and
in every worker, under a guard that forbids touching CUDA at import time.
"""
