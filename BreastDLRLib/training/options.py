"""Command-line options generated from a training config dataclass (one flag per field)."""
from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, Type, TypeVar

T = TypeVar("T")

_KINDS = {"bool": lambda v: str(v).lower() in ("1", "true", "yes"), "int": int, "float": float, "str": str,
          "Optional[int]": int, "Optional[float]": float, "Optional[str]": str}


def add_config_arguments(parser: argparse.ArgumentParser, cls: Type[Any]) -> None:
    """``--field-name`` for every field of the dataclass ``cls``, typed and defaulted like the field."""
    for f in fields(cls):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=_KINDS[str(f.type)], default=f.default,
                            help=f"(default: {f.default})")


def config_from_arguments(args: argparse.Namespace, cls: Type[T]) -> T:
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
