"""docs/uncertainty.md: its ```python blocks run, in order, in one namespace."""
from __future__ import annotations

import warnings

import pytest

from _uncertainty_support import eager_mode


def test_python_blocks_run(tmp_path, monkeypatch, run_doc):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)              # the figures of the example land here
    with eager_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        namespace = run_doc("uncertainty.md", 5)
    assert namespace["result"].status.converged
