import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
if not Path("/dev/nvidia0").exists():
    # Triton's interpreter runs the real kernels on CPU tensors; it must be chosen before triton is imported,
    # and any test may import it first (kernels.available_backends)
    os.environ.setdefault("TRITON_INTERPRET", "1")
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """../shared/data beside the repository, or skip (the product never needs it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def default_data_cache(tmp_path_factory):
    """One copy of the embedded data set for the whole session, used through data.cache_dir."""
    path = tmp_path_factory.mktemp("default_data")
    import data
    data.default_dataset(str(path))
    return str(path)
