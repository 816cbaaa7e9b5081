"""``spmd-moe compare``: placeholder until its issue lands."""
from __future__ import annotations

from .errors import ConfigError


def add_parser(commands) -> None:
    parser = commands.add_parser("compare", help="(not built yet)")
    parser.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    raise ConfigError("compare", "not built yet")
