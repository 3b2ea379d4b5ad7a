"""The command line: ``python -m devec_core decompose|inspect``.

    decompose INPUT... --out DIR [--tau 0.85] [--mode joint|pairwise|isolate] [--target NAME]
              [--rank R | --energy E] [--base MODEL] [--compress] [--alpha A | --config adapter_config.json]
        Writes in DIR: ``unique-<name>.safetensors`` (or PEFT folder ``unique-<name>/``) per input,
        ``shared.safetensors`` (or ``shared/``), and ``report.json``. Served from the cache when
        the same inputs and options were decomposed before (any τ).
    inspect INPUT... [--base MODEL]
        Format, base model guess, modules, ranks, norms, pairwise overlap.

Every argument (τ, mode, target, names, ``--out``, ranks, energies, device) is checked before any
tensor is read. DIR is replaced atomically: the outputs are written in a sibling temp folder that
is then swapped in, so DIR holds the old run's files or the new run's, never a mix; temp folders
left by killed runs are removed by the next run. DIR must be new, empty, or an earlier output
(its report.json lists everything in it): nothing else is ever replaced.

Exit codes: 0 success; 1 bad input or failure (one line ``error: <input>: <reason>``, nothing
left in DIR); 2 usage error (one line ``error: <argument>: <reason>``); 3 internal error (add
``--debug`` for the traceback).
"""

from __future__ import annotations

import sys

from . import decompose, inspect, mix
from .common import EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, UsageError, _Parser
from .decompose import make_report, run_decompose
from .inspect import describe, run_inspect
from .mix import run_mix

__all__ = ["EXIT_INPUT", "EXIT_INTERNAL", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "describe", "main",
           "make_report", "run_decompose", "run_inspect", "run_mix"]


def build_parser() -> _Parser:
    p = _Parser(prog="python -m devec_core", description="DeVec: split task vectors into shared and unique parts.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    decompose.add_parser(sub)
    inspect.add_parser(sub)
    mix.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    run = {"decompose": run_decompose, "inspect": run_inspect, "mix": run_mix}[args.command]
    try:
        return run(args)
    except UsageError as e:
        if args.debug:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as e:  # FormatError is a ValueError
        if args.debug:
            raise
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INPUT
    except Exception as e:  # noqa: BLE001 — the last resort on purpose: a bug is one line and exit 3, not a traceback
        if args.debug:
            raise
        print(f"error: internal {type(e).__name__}: {' '.join(str(e).split())[:300]} (rerun with --debug)", file=sys.stderr)
        return EXIT_INTERNAL
