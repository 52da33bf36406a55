"""Fixtures for the uncertainty tests."""
from __future__ import annotations

import pytest

from _uncertainty_support import eager_mode, tree


@pytest.fixture(scope="session")
def tiny():
    """6 x 6 pixels, triclinic, water background."""
    return tree()


@pytest.fixture
def eager():
    """Run torch.compile'd functions eagerly during the test."""
    with eager_mode():
        yield
