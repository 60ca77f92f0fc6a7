"""Two model pools in one run: an MoE pool and a sliding-window dense pool (tiny random
checkpoints), requests routed by document length and by stage; every chunk and merge entry
names the pool and model that produced it."""

import pytest

from pipeline.config import RunConfig
from pipeline.output import read_results
from pipeline.service import describe_pools, run_documents
from pipeline.stores import Document, content_hash
from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_swa_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mistral"), "mistral",
                                sliding_window=48)


def _doc(doc_id, words):
    text = " ".join(f"word{i % 37} said{i % 11}." for i in range(words))
    return Document(doc_id, f"mem/{doc_id}", text, content_hash(text), {"kind": doc_id})


def _config(moe, swa, routes, **kw):
    return RunConfig(dtype="float32", use_ray=False, chunk_tokens=96, overlap=8,
                     max_summary_tokens=5, routes=routes,
                     pools=[{"name": "moe", "model": str(moe)}, {"name": "swa", "model": str(swa)}],
                     **kw)


def test_route_by_length(tiny_moe_dir, tiny_swa_dir, tmp_path):
    config = _config(tiny_moe_dir, tiny_swa_dir, ["tokens >= 300 -> swa"])
    models = {name: info.model_id for name, info in describe_pools(config).items()}
    out = tmp_path / "o.parquet"
    stats, replicas = run_documents(config, [_doc("long", 200), _doc("short", 20)], out)
    rows = {r["doc_id"]: r for r in read_results(out)}
    assert stats.num_ok == 2, stats.errors
    long, short = rows["long"], rows["short"]
    assert long["num_tokens"] >= 300 > short["num_tokens"]
    assert len(long["chunks"]) > 2 and long["merges"]
    assert {(c["pool"], c["model"]) for c in long["chunks"]} == {("swa", models["swa"])}
    assert {(m["pool"], m["model"]) for m in long["merges"]} == {("swa", models["swa"])}
    assert {(c["pool"], c["model"]) for c in short["chunks"]} == {("moe", models["moe"])}
    assert long["model"] == models["swa"] and short["model"] == models["moe"]
    assert short["expert_tokens"] is not None and long["expert_tokens"] is None  # MoE vs dense
    assert sorted(r["pool"] for r in replicas) == ["moe", "swa"]


def test_route_by_stage(tiny_moe_dir, tiny_swa_dir, tmp_path):
    config = _config(tiny_moe_dir, tiny_swa_dir, ["stage == reduce -> swa"],
                     strategy="overlap-summary")
    models = {name: info.model_id for name, info in describe_pools(config).items()}
    out = tmp_path / "o.parquet"
    stats, _ = run_documents(config, [_doc("long", 200)], out)
    (row,) = read_results(out)
    assert stats.num_ok == 1, stats.errors
    assert {c["pool"] for c in row["chunks"]} == {"moe"}
    assert row["merges"] and {m["pool"] for m in row["merges"]} == {"swa"}
    # merge entries say which chunks they cover: the last level covers them all
    assert sorted(row["merges"][-1]["sources"]) == list(range(len(row["chunks"])))
    assert row["model"] == models["swa"]  # the summary is the last merge's


def test_fingerprint_follows_the_rules(tiny_moe_dir, tiny_swa_dir, tmp_path):
    a = _config(tiny_moe_dir, tiny_swa_dir, ["tokens >= 300 -> swa"])
    b = _config(tiny_moe_dir, tiny_swa_dir, ["tokens >= 301 -> swa"])
    out_a, out_b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    run_documents(a, [_doc("short", 20)], out_a)
    run_documents(b, [_doc("short", 20)], out_b)
    (ra,), (rb,) = read_results(out_a), read_results(out_b)
    assert ra["config_fingerprint"] != rb["config_fingerprint"]


def test_overlap_summary_reuses_each_chunks_prefix(tiny_model_dir, tmp_path):
    """A chunk's map prompt and the next chunk's context prompt begin with the chunk text: the
    second is served from the prefix cache (whole 512-token units under batch invariance),
    and the rows equal a run without prefix caching."""
    text = " ".join(f"Sentence {i} tells of the whale and the sea." for i in range(900))
    doc = Document("d", "mem/d", text, content_hash(text))
    common = dict(model=str(tiny_model_dir), dtype="float32", use_ray=False, chunk_tokens=400,
                  overlap=0, max_summary_tokens=4, max_num_batched_tokens=1024)
    stats, replicas = run_documents(RunConfig(strategy="overlap-summary", **common), [doc],
                                    tmp_path / "o.parquet")
    (row,) = read_results(tmp_path / "o.parquet")
    num_chunks = row["num_chunks"]
    assert num_chunks >= 4
    # every chunk but the last is read twice (its map, the next chunk's context): the second
    # read hits at least one 512-token unit
    assert stats.cached_tokens >= 512 * (num_chunks - 1), (stats.cached_tokens, num_chunks)
    plain, _ = run_documents(RunConfig(strategy="map-reduce", **common), [doc],
                             tmp_path / "m.parquet")
    assert plain.cached_tokens == 0  # map prompts share less than one unit


def test_params_per_token_counts_the_model(tiny_model_dir, tiny_moe_dir):
    from models import load_model
    from pipeline.accounting import params_per_token

    dense = load_model(str(tiny_model_dir), dtype="float32")
    p = params_per_token(dense.config)
    assert p.active == p.dense
    moe = load_model(str(tiny_moe_dir), dtype="float32")
    q = params_per_token(moe.config)
    c = moe.config
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    assert q.dense - q.active == c.num_hidden_layers * (c.num_local_experts - c.num_experts_per_tok) * expert
    # the dense equivalent is every weight of the model (experts, router, head; tied or not)
    for loaded, params in ((dense, p), (moe, q)):
        total = sum(w.numel() for n, w in loaded.model.named_parameters()
                    if w.dim() >= 2 and "embed" not in n)
        if loaded.model.lm_head is None:  # tied: the embedding is the head
            total += loaded.model.embed_tokens.numel()
        assert params.dense == total


def test_moe_chunks_carry_tokens_per_expert_and_rows_their_flops(tiny_moe_dir, tiny_swa_dir, tmp_path):
    config = _config(tiny_moe_dir, tiny_swa_dir, ["tokens >= 300 -> swa"])
    out = tmp_path / "o.parquet"
    run_documents(config, [_doc("long", 200), _doc("short", 20)], out)
    rows = {r["doc_id"]: r for r in read_results(out)}
    short, long = rows["short"], rows["long"]
    for c in short["chunks"]:
        assert len(c["expert_tokens"]) == 4 and sum(c["expert_tokens"]) > 0
    per_expert = [sum(x) for x in zip(*(c["expert_tokens"] for c in short["chunks"]))]
    assert all(a <= b for a, b in zip(per_expert, short["expert_tokens"], strict=True))
    assert all(c["expert_tokens"] is None for c in long["chunks"])
    assert 0 < short["active_flops"] < short["dense_flops"]  # top-2 of 4 experts
    assert 0 < long["active_flops"] == long["dense_flops"]


@pytest.mark.parametrize("per_layer", [False, True])
def test_expert_tokens_per_layer_when_asked(tiny_moe_dir, tiny_swa_dir, tmp_path, per_layer):
    from models import load_model

    config = _config(tiny_moe_dir, tiny_swa_dir, [], expert_tokens_per_layer=per_layer)
    out = tmp_path / "o.parquet"
    run_documents(config, [_doc("short", 20)], out)
    (row,) = read_results(out)
    cfg = load_model(str(tiny_moe_dir), dtype="float32").config
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    for c in row["chunks"]:
        layers = c["expert_tokens_per_layer"]
        if not per_layer:
            assert layers is None
            continue
        assert len(layers) == moe_layers and all(len(r) == 4 for r in layers)
        # every layer routes each token to K experts; summed over layers: expert_tokens
        assert len({sum(r) for r in layers}) == 1 and sum(layers[0]) % cfg.num_experts_per_tok == 0
        assert [sum(col) for col in zip(*layers)] == c["expert_tokens"]


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_params_per_token_counts_an_mla_model(q_lora_rank):
    """DeepSeek-V3's attention is MLA: its projections (q LoRA or q, the kv down- and
    up-projections, o) are counted, not GQA's formula over head_dim."""
    import dataclasses

    from models.config import tiny_config
    from models.transformer import TransformerLM
    from pipeline.accounting import params_per_token

    config = dataclasses.replace(tiny_config("deepseek_v3"), q_lora_rank=q_lora_rank)
    model = TransformerLM(config)
    total = sum(w.numel() for n, w in model.named_parameters()
                if w.dim() >= 2 and "embed" not in n)
    if model.lm_head is None:
        total += model.embed_tokens.numel()
    assert params_per_token(config).dense == total
