import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

POOLS = Path(__file__).parent / "pools"


def pytest_addoption(parser):
    parser.addoption("--zoo-size", default=os.environ.get("DIOE_ZOO_SIZE", "small"), choices=["small", "full"],
                     help="size of zoo models in model-wide tests: small (CI) or full")


def pytest_configure(config):
    config.addinivalue_line("markers", "models: model-wide checks over the zoo (CI runs them with --zoo-size small)")
    warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def zoo_size(request):
    return request.config.getoption("--zoo-size")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Compiled artifacts go to a per-session folder, so tests never read a stale cache."""
    os.environ["DIOE_CACHE_DIR"] = str(tmp_path_factory.mktemp("dioe-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def pool():
    import dioe

    return dioe.ResourcePool.discover()


@pytest.fixture(scope="session")
def cpu(pool):
    return pool.reference


@pytest.fixture(scope="session")
def standin_pool():
    import dioe

    return dioe.ResourcePool.discover(POOLS / "standin.yaml")


@pytest.fixture(scope="session")
def tiny_bert_on_standins(standin_pool):
    """tiny-bert optimized for the stand-in pool: (model, inputs, optimized). One optimize shared by the tests of
    the pipeline and of the runtime; a test that breaks one of its engines puts that engine back."""
    import dioe

    model, inputs = dioe.zoo.load("tiny-bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dioe.optimize(model, inputs, hardware=standin_pool, backends=["torch", "onnxruntime"], precision="fp32")
    return model, inputs, opt
