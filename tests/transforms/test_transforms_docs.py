"""The ```python blocks of docs/transforms.md run, in order, in one namespace."""
from __future__ import annotations

from _transforms_support import eager_mode


def test_extracts_blocks(run_doc):
    assert run_doc.blocks("a\n```python\nx = 1\n```\n```text\ny\n```\n```python\nz = 2\n```\n") == \
        ["x = 1\n", "z = 2\n"]


def test_docs_code_runs(run_doc):
    """Eager renders: the blocks check the results of transforms, not compiled kernels
    (``test_compile.py`` compares compiled and eager)."""
    with eager_mode():
        run_doc("transforms.md", 11)
