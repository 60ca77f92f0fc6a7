import pytest

from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mixtral"), "mixtral")


@pytest.fixture(scope="session")
def tiny_small_ctx_dir(tmp_path_factory):
    """A context of 1,024 tokens: merges must span several levels."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ctx"), "llama",
                                max_position_embeddings=1024)


@pytest.fixture(scope="session")
def long_text():
    """About 100K cl100k tokens of real prose (the W100K benchmark document)."""
    from pathlib import Path

    return (Path(__file__).parents[2] / "benchmarks" / "data" / "moby-dick-100k.txt").read_text()
