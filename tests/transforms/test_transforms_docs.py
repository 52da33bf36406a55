"""The ```python blocks of docs/transforms.md run, in order, in one namespace."""
from __future__ import annotations

import pathlib
import re

import pytest

from _transforms_support import eager_mode

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "transforms.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    """Source of every fenced ```python block, in document order."""
    return BLOCK.findall(text)


def test_extracts_blocks():
    assert python_blocks("a\n```python\nx = 1\n```\n```text\ny\n```\n```python\nz = 2\n```\n") == \
        ["x = 1\n", "z = 2\n"]


def test_docs_code_runs():
    """Eager renders: the blocks check the results of transforms, not compiled kernels
    (``test_compile.py`` compares compiled and eager)."""
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 8
    namespace: dict = {"__name__": "docs_transforms"}
    with eager_mode():
        for i, source in enumerate(blocks):
            try:
                exec(compile(source, f"{DOC.name}[block {i}]", "exec"), namespace)
            except Exception as err:  # name the failing block
                pytest.fail(f"block {i} of {DOC.name} failed: {type(err).__name__}: {err}\n{source}")
