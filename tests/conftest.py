"""Offline by construction: these variables are set before anything imports transformers."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-hub", action="store_true", default=False, help="run tests that push to the real Hub")


def pytest_collection_modifyitems(config, items):
    skip_hub = pytest.mark.skip(reason="needs --run-hub and HF_TOKEN")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "hub" in item.keywords and not (config.getoption("--run-hub") and os.environ.get("HF_TOKEN")):
            item.add_marker(skip_hub)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole test module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models
    gain nothing from more, and on a loaded CPU the thread hand-offs cost ~100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
