import os

import pytest
import torch

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
