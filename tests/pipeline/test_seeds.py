"""Sampling per request: seeds derived from the run seed and the request id; the
repetition penalty over generated tokens only."""

from pipeline.config import RunConfig
from pipeline.runner import request_seed
from pipeline.service import run_documents
from pipeline.stores import Document, content_hash
from tests.fakes import EchoPool

TEXT = "The whale surfaced near the ship, and the crew watched in silence. " * 40


class SeedPool(EchoPool):
    def __init__(self) -> None:
        super().__init__()
        self.seeds: dict[str, int | None] = {}
        self.sampling: list[dict] = []

    def submit(self, requests) -> None:
        for r in requests:
            self.seeds[r.request_id] = r.sampling["seed"]
            self.sampling.append(r.sampling)
        super().submit(requests)


def seeds(model_dir, tmp_path, **kw):
    config = RunConfig(model=str(model_dir), dtype="float32", use_ray=False, chunk_tokens=128,
                       overlap=16, max_summary_tokens=8, **kw)
    docs = [Document(d, f"mem:{d}", TEXT + d, content_hash(TEXT + d)) for d in ("a", "b")]
    pool = SeedPool()
    run_documents(config, docs, tmp_path / "o.parquet", pool=pool)
    seeds.last_pool = pool
    return pool.seeds


def test_per_request_seeds_are_reproducible_and_distinct(tiny_model_dir, tmp_path):
    first = seeds(tiny_model_dir, tmp_path, temperature=0.7, seed=5)
    assert len(first) > 10
    values = list(first.values())
    assert len(set(values)) == len(values)  # no two requests share a stream
    assert all(isinstance(v, int) and 0 <= v < 2**63 for v in values)
    assert seeds(tiny_model_dir, tmp_path, temperature=0.7, seed=5) == first
    other = seeds(tiny_model_dir, tmp_path, temperature=0.7, seed=6)
    assert not set(other.values()) & set(values)  # (the seed is in the fingerprint, so ids differ too)
    rid = next(iter(first))
    assert request_seed(5, rid) != request_seed(6, rid)
    assert first == {rid: request_seed(5, rid) for rid in first}
    # greedy decoding needs no seed
    assert set(seeds(tiny_model_dir, tmp_path).values()) == {None}


def test_repetition_penalty_spares_the_prompt_unless_asked(tiny_model_dir, tmp_path):
    """By default (a model without a recommendation) the source's words are not penalized:
    every request carries the run's penalty with penalize_prompt off, which the engine
    honours (tests/models/engine/test_sampling.py); penalize_prompt=True reaches every
    request too."""
    from models.engine.sampling import SamplingParams

    for asked, want in ((None, False), (True, True)):
        seeds(tiny_model_dir, tmp_path, repetition_penalty=1.3, penalize_prompt=asked)
        sampling = seeds.last_pool.sampling
        assert sampling and all(s["repetition_penalty"] == 1.3 for s in sampling)
        assert all(SamplingParams(**s).penalize_prompt is want for s in sampling)
