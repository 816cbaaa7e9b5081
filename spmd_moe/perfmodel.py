"""``spmd-moe plan --predict``: placeholder until its issue lands."""
from __future__ import annotations

from .errors import ConfigError


def add_arguments(parser) -> None:
    parser.add_argument("--predict", action="store_true", help="(not built yet)")


def cmd_predict(args, config) -> int:
    raise ConfigError("--predict", "not built yet")
