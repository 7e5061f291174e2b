"""Placeholder: replaced by the benchmark module."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run_bench(args: argparse.Namespace) -> int:
    raise SystemExit("bench: not written yet")
