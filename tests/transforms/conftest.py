"""Fixtures for the transform tests: tiny float64 trees, input files, eager mode."""
from __future__ import annotations

import pytest

import nbfunc
from _transforms_support import CONFIGS, HKL_TEXT, SOURCES_TEXT, eager_mode, make_params


@pytest.fixture(scope="session")
def input_files(tmp_path_factory) -> dict[str, str]:
    """Paths of the small HKL file (3 x 3 x 3 grid) and source file (3 sources)."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "tiny.hkl").write_text(HKL_TEXT)
    (folder / "sources.txt").write_text(SOURCES_TEXT)
    return {"hkl": str(folder / "tiny.hkl"), "sources": str(folder / "sources.txt")}


@pytest.fixture(scope="session")
def configs(input_files) -> dict[str, nbfunc.Params]:
    """Every tree of ``CONFIGS``, built once per session."""
    return {name: make_params(extra, input_files) for name, (extra, _) in CONFIGS.items()}


@pytest.fixture(scope="session")
def tiny() -> nbfunc.Params:
    """The base triclinic tree: 6 x 6 pixels, one source, one phi step, one mosaic domain."""
    return make_params()


@pytest.fixture
def eager():
    """Run the test with torch.compile'd functions forced eager (see `eager_mode`)."""
    with eager_mode():
        yield
