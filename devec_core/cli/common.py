"""What every subcommand shares: exit codes, usage errors, the parser class, progress bars,
input names and paths, ``--tau`` / ``--config`` / ``--alpha`` handling."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..algorithm import check_tau
from ..formats import FormatError, default_name, read_adapter_config, resolve_source

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class UsageError(ValueError):
    """A bad argument: exit 2 with one line naming the argument and the value."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: …``) and exit 2."""

    def error(self, message):
        print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class _Bars:
    """progress(done, total, stage) → one tqdm bar per stage (stderr)."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar, self.stage = enabled, None, None

    def __call__(self, done: int, total: int, stage: str) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            self.bar, self.stage = tqdm(total=total, desc=f"{stage:>10}", unit="mod", leave=False, file=sys.stderr), stage
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.stage = None


def _alpha_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="ADAPTER_CONFIG_JSON",
                   help="adapter_config.json for PEFT adapter files/folders that have none beside them (alpha, rsLoRA, patterns)")
    p.add_argument("--alpha", type=float,
                   help="lora_alpha for PEFT adapter files/folders that have no adapter_config.json (scale = alpha / r)")


def check_tau_arg(tau: float) -> None:
    """``--tau`` in (0, 1] (UsageError naming the flag and the value)."""
    try:
        check_tau(tau)
    except ValueError as e:
        raise UsageError(f"--tau: must be a number in (0, 1]; got {tau!r}") from e


def _names_for(inputs: list[str], names_arg: str | None) -> list[str]:
    if names_arg is not None:
        names = [n.strip() for n in names_arg.split(",")]
        if len(names) != len(inputs):
            raise UsageError(f"--names: {len(names)} names for {len(inputs)} inputs")
        if not all(names):
            raise UsageError(f"--names: empty name in {names_arg!r}")
        if len(set(names)) != len(names):
            raise UsageError(f"--names: must be unique; got {names}")
        return names
    names: list[str] = []
    for s in inputs:
        n = default_name(s, resolve_source(s))
        k, cand = 2, n
        while cand in names:
            cand, k = f"{n}-{k}", k + 1
        names.append(cand)
    return names


def _check_duplicate_paths(inputs: list[str]) -> list[Path]:
    if not inputs:
        raise FormatError("empty pool: give at least one input")
    paths, seen = [], {}
    for s in inputs:
        p = resolve_source(s)
        key = str(p.resolve())
        if key in seen:
            raise FormatError(f"{s!r}: duplicate input (same file as {seen[key]!r})")
        seen[key] = s
        paths.append(p)
    return paths


def _config_arg(args) -> dict | None:
    """--config, parsed once (a broken file is an input error naming it)."""
    if args.config is None:
        return None
    if not args.config.is_file():
        raise ValueError(f"--config {str(args.config)!r}: no such file")
    return read_adapter_config(args.config)
