"""``spmd-moe bench``: placeholder until its issue lands."""
from __future__ import annotations

from .errors import ConfigError


def add_parser(commands) -> None:
    parser = commands.add_parser("bench", help="(not built yet)")
    parser.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    raise ConfigError("bench", "not built yet")
