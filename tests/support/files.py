"""Files the tests give the proxy."""

from __future__ import annotations

import textwrap
from pathlib import Path


def write_clients(directory: Path, text: str, name: str = "clients.toml") -> str:
    """A clients file (or any TOML the proxy reads) in `directory`, dedented; its path."""
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return str(path)
