"""Session-wide settings: renders compile only in the tests that test compiling.

Outside ``tests/transforms/test_compile.py`` (which sets `nbfunc.compile.COMPILE_AFTER` and
``COMPILE_AFTER_TRANSFORMS`` to 0) no render is compiled however much eager work the session
has done, so that the suite's
run time does not depend on the order of its tests, and no test waits for a compile it does
not test. The command line's own decision (compile at 50 M evaluations) is unchanged.

`run_doc` runs the ```python blocks of a page of docs/ (each page's test checks their results).
"""
import pathlib
import re

import pytest

import nbfunc.compile

nbfunc.compile.COMPILE_AFTER = nbfunc.compile.COMPILE_AFTER_TRANSFORMS = 1 << 62

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    """Source of every fenced ```python block of a markdown text, in document order."""
    return PYTHON_BLOCK.findall(text)


@pytest.fixture
def run_doc():
    """``run_doc(name, blocks)``: run the ```python blocks of ``docs/name`` in order, in one
    namespace (returned), after checking there are at least ``blocks`` of them; a failing block fails
    the test with its number, its error and its source. ``run_doc.blocks`` is `python_blocks`."""
    def run(name: str, blocks: int) -> dict:
        path = DOCS / name
        sources = python_blocks(path.read_text())
        assert len(sources) >= blocks, f"{name} has {len(sources)} python blocks, fewer than {blocks}"
        namespace: dict = {"__name__": f"docs_{path.stem}"}
        for i, source in enumerate(sources):
            try:
                exec(compile(source, f"{name}[block {i}]", "exec"), namespace)
            except Exception as err:  # name the failing block
                pytest.fail(f"block {i} of {name} failed: {type(err).__name__}: {err}\n{source}")
        return namespace
    run.blocks = python_blocks
    return run
