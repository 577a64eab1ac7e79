"""Fixtures shared by the test modules; pytest finds them here, so no test imports a fixture.

The training data behind them is core_data.py's: a small IDX directory (real Fashion-MNIST images
when Debian's package is installed, random ones otherwise) and a parse cache of the session's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core_data import write_core_data_dir
from enshuffle import dataset as ds


@pytest.fixture(scope="session")
def core_cache(tmp_path_factory) -> Path:
    """A parse cache of our own for the whole session, so no test writes into the user's ~/.cache."""
    path = tmp_path_factory.mktemp("enshuffle-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENSHUFFLE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def core_data_dir(tmp_path_factory, core_cache) -> Path:
    return write_core_data_dir(tmp_path_factory.mktemp("core-data"))


@pytest.fixture(scope="session")
def core_dataset(core_data_dir) -> ds.Dataset:
    return ds.load_idx_dir(core_data_dir)
