"""The ```python blocks of docs/outputs.md run, in order, in one namespace, in a scratch folder."""
import os
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "outputs.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def test_docs_code_runs(tmp_path, monkeypatch):
    pytest.importorskip("h5py")
    pytest.importorskip("fabio")
    monkeypatch.setattr("nbfunc.compile.COMPILE_AFTER", 1 << 62)  # small renders: eager
    blocks = BLOCK.findall(DOC.read_text())
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_outputs"}
    for i, source in enumerate(blocks):
        try:
            exec(compile(source, f"{DOC.name}[block {i}]", "exec"), namespace)
        except Exception as err:  # name the failing block
            pytest.fail(f"block {i} of {DOC.name} failed: {type(err).__name__}: {err}\n{source}")
    assert sorted(os.listdir(tmp_path)) == ["series.h5", "shot.cbf"]
