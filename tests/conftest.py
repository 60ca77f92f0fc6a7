import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Native kernels (models/native.py) build into a folder of this test session, not the user's
# cache: every run checks the build itself. Set before any test (and Ray worker) starts.
if "DOCPIPE_CACHE_DIR" not in os.environ:
    os.environ["DOCPIPE_CACHE_DIR"] = tempfile.mkdtemp(prefix="docpipe-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DOCPIPE_CACHE_DIR"], ignore_errors=True)

# Two cores: keep intra-op threads fixed so tests are repeatable and do not oversubscribe.
torch.set_num_threads(int(os.environ.get("DOCPIPE_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def smollm2_gguf():
    from models.registry import SMOLLM2_NAME, embedded_model_path

    return embedded_model_path(SMOLLM2_NAME)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
