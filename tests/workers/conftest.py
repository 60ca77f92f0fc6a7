import os
import shutil
import tempfile

import pytest

from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session, in its own temp dir and HOME, shut down after.

    Ray writes ~/.ray and /tmp/ray/session_*; both go under a private directory here."""
    ray = pytest.importorskip("ray")
    root = tempfile.mkdtemp(prefix="docpipe-ray-")
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = root
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=os.path.join(root, "ray"),
             log_to_driver=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
        if old_home is not None:
            os.environ["HOME"] = old_home
        shutil.rmtree(root, ignore_errors=True)
