"""The ```python blocks of docs/outputs.md run, in order, in one namespace, in a scratch folder."""
import os

import pytest


def test_docs_code_runs(tmp_path, monkeypatch, run_doc):
    pytest.importorskip("h5py")
    pytest.importorskip("fabio")
    monkeypatch.setattr("nbfunc.compile.COMPILE_AFTER", 1 << 62)  # small renders: eager
    monkeypatch.chdir(tmp_path)
    run_doc("outputs.md", 2)
    assert sorted(os.listdir(tmp_path)) == ["series.h5", "shot.cbf"]
