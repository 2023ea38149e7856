"""The YAML files a command is given, read with errors that name the file and the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def config_files(words: list[str]) -> list[Path]:
    """The paths given to ``--config`` / ``-c`` / ``--config=`` in command-line ``words``."""
    files = [Path(words[i + 1]) for i, word in enumerate(words[:-1]) if word in ("--config", "-c")]
    return files + [Path(word.split("=", 1)[1]) for word in words if word.startswith("--config=")]


def load_yaml(path: str | Path) -> Any:
    """``yaml.safe_load`` of the file; a syntax error is a ``ValueError`` naming the file, the
    line and column, and the problem (PyYAML names ``<unicode string>``)."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None
