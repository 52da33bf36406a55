"""docs/uncertainty.md: its ```python blocks run, in order, in one namespace."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from _uncertainty_support import eager_mode

DOC = Path(__file__).resolve().parents[2] / "docs" / "uncertainty.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_python_blocks_are_found():
    assert len(python_blocks(DOC.read_text())) >= 3


def test_python_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)              # the figures of the example land here
    namespace: dict = {"__name__": "docs_uncertainty"}
    with eager_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for i, block in enumerate(python_blocks(DOC.read_text())):
            exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
    assert namespace["result"].status.converged
