"""Fixtures of the command-line tests: each reference case rendered once per session, and the
comparison functions of ../shared/tools/golden_check.py."""
import importlib.util
import shutil
from pathlib import Path

import pytest

from _cli_support import GOLDEN, GOLDEN_CHECK, golden_argv, run_cli


@pytest.fixture(scope="session")
def golden_run(tmp_path_factory):
    """``golden_run(case)`` -> (folder, stdout): the CLI run on a copy of the case folder,
    as golden_check.py runs it; each case is rendered once per session."""
    done: dict[str, tuple[Path, str]] = {}

    def run(case: str) -> tuple[Path, str]:
        if case not in done:
            folder = tmp_path_factory.mktemp("golden") / case
            shutil.copytree(GOLDEN / case, folder)
            for name in ("float.bin", "int.img", "noise.img"):
                (folder / name).unlink(missing_ok=True)
            status, out, err = run_cli(golden_argv(case), folder)
            assert status == 0, err
            done[case] = (folder, out)
        return done[case]

    return run


@pytest.fixture(scope="session")
def golden_check():
    """The module ../shared/tools/golden_check.py (its comparison functions and thresholds)."""
    if not GOLDEN_CHECK.exists():
        pytest.skip(f"{GOLDEN_CHECK} not found")
    spec = importlib.util.spec_from_file_location("golden_check", GOLDEN_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
