"""ic diff / graph_diff: per-layer numbers checked against hand counts from the tiny configs."""

import json
import re

import pytest
import torch

from ic_compile.tools.graph_diff import SCHEMA_VERSION, graph_diff, node_layers
from ic_compile.tools.models import load_model
from ic_compile.plan import PlanError
from ic_compile.rewrite import NoIndexerFoundError
from tiny_models import HF_TINY, glm, random_ids

L = 1024  # sequence length the FLOPs are counted at


def hand_flops(L, H, D, q_lora, hidden):
    """One indexer layer: causal q·k (L²/2·H·D·2) + q, k, head-weight projections (2·L·in·out each)."""
    return L * L // 2 * H * D * 2 + 2 * L * (q_lora * H * D + hidden * D + hidden * H)


@pytest.fixture(scope="module")
def hf_diff():
    pytest.importorskip("transformers")
    torch._dynamo.reset()
    return graph_diff(glm(), {"input_ids": random_ids(), "use_cache": False}, plan="FSFS", seq_len=L)


@pytest.fixture(scope="module")
def ref_diff():
    torch._dynamo.reset()
    return graph_diff(load_model("dsa:tiny"), {"idx": random_ids(seq=24, vocab=256)}, plan="FSSF", seq_len=L)


def test_json_schema_is_stable(hf_diff):
    data = json.loads(json.dumps(hf_diff.to_dict()))
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert set(data) == {"schema_version", "plan", "seq_len", "nodes_before", "nodes_after", "layers", "totals",
                         "nodes", "notes"}
    assert data["plan"] == "FSFS" and data["seq_len"] == L
    assert set(data["layers"][0]) == {
        "layer", "role", "source", "module", "heads", "head_dim", "indexer_flops", "flops_removed", "removed_nodes",
        "rewired_nodes", "weight_bytes_freed", "freed_parameters", "key_cache_bytes_per_token_freed",
        "key_cache_write_removed"}
    assert set(data["totals"]) == {"indexer_flops", "flops_removed", "flops_removed_fraction", "removed_nodes",
                                   "rewired_nodes", "added_nodes", "weight_bytes_freed",
                                   "key_cache_bytes_per_token_freed"}
    assert {n["change"] for n in data["nodes"]} <= {"removed", "added", "rewired"}
    assert set(data["nodes"][0]) == {"change", "name", "op", "module", "layer", "inputs_before", "inputs_after",
                                     "attribution"}


def test_hf_numbers_match_hand_count(hf_diff):
    c = HF_TINY
    H, D = c["index_n_heads"], c["index_head_dim"]
    per_layer = hand_flops(L, H, D, c["q_lora_rank"], c["hidden_size"])
    assert [(l.layer, l.role, l.source, l.heads, l.head_dim) for l in hf_diff.layers] == [
        (0, "F", 0, H, D), (1, "S", 0, H, D), (2, "F", 2, H, D), (3, "S", 2, H, D)]
    assert all(l.indexer_flops == per_layer for l in hf_diff.layers)
    assert [l.flops_removed for l in hf_diff.layers] == [0, per_layer, 0, per_layer]
    t = hf_diff.totals
    assert t["flops_removed"] == 2 * per_layer and t["flops_removed_fraction"] == 0.5
    # wq_b [H·D, q_lora], wk [D, hidden], k_norm weight + bias [D], weights_proj [H, hidden]; fp32
    weights = (H * D * c["q_lora_rank"] + D * c["hidden_size"] + 2 * D + H * c["hidden_size"]) * 4
    assert [l.weight_bytes_freed for l in hf_diff.layers] == [0, weights, 0, weights]
    # captured without a cache: no key-cache write exists to remove, so none is counted (and a note says so)
    assert [l.key_cache_write_removed for l in hf_diff.layers] == [None] * 4
    assert [l.key_cache_bytes_per_token_freed for l in hf_diff.layers] == [0] * 4
    assert t["weight_bytes_freed"] == 2 * weights and t["key_cache_bytes_per_token_freed"] == 0
    assert any("S layers [1, 3]: this graph writes no indexer key cache" in n for n in hf_diff.notes)
    assert all(".indexer" in p for l in hf_diff.layers for p in l.freed_parameters)


def test_reference_model_numbers_match_hand_count(ref_diff):
    from ic_compile import dsa_model
    a = dsa_model.ModelArgs.tiny()
    per_layer = hand_flops(L, a.index_n_heads, a.index_head_dim, a.q_lora_rank, a.dim)
    assert [l.role for l in ref_diff.layers] == list("FSSF")
    assert [l.source for l in ref_diff.layers] == [0, 0, 0, 3]
    assert [l.flops_removed for l in ref_diff.layers] == [0, per_layer, per_layer, 0]
    assert ref_diff.totals["key_cache_bytes_per_token_freed"] == 0  # no cache in a prefill without one


def test_reference_model_static_cache_writes_counted(tmp_path):
    """With static caches the S layers' index_copy_ into their key buffers is in the graph: counted as
    removed only because those nodes are absent from the rewritten graph."""
    from ic_compile import dsa_model
    model = load_model("dsa:tiny")
    model.setup_caches(2, 24)
    diff = graph_diff(model, {"idx": random_ids(seq=24, vocab=256), "input_pos": torch.arange(24)}, plan="FSSF")
    D = dsa_model.ModelArgs.tiny().index_head_dim
    assert [l.key_cache_write_removed for l in diff.layers] == [None, True, True, None]
    assert [l.key_cache_bytes_per_token_freed for l in diff.layers] == [0, D * 4, D * 4, 0]
    after = {n.name for n in diff.result.gm.graph.nodes}
    for cache in diff.result.caches:  # the count's evidence: each S layer's writes, absent after the rewrite
        assert cache.writers and not {w.name for w in cache.writers} & after
    assert diff.notes == []


def test_hf_static_cache_writes_counted_from_the_graph():
    """HF StaticCache: the S layers' key-cache index_copy_ nodes disappear from the rewritten graph;
    the diff and explain count that, and the S indexers' length counters (indexer_cumulative_length) go too."""
    import ic_compile
    model = glm()
    inputs = {"input_ids": random_ids(batch=1), "use_cache": True,
              "past_key_values": ic_compile.static_cache(model, 1, 32)}
    diff = graph_diff(model, inputs, plan="FSSF")
    after = {n.name for n in diff.result.gm.graph.nodes}
    written = {c.layer: [w.name for w in c.writers] for c in diff.result.caches}
    assert set(written) == {1, 2} and all(w and not set(w) & after for w in written.values())
    assert [l.key_cache_write_removed for l in diff.layers] == [None, True, True, None]
    assert [l.key_cache_bytes_per_token_freed for l in diff.layers] == [0, 64, 64, 0]
    assert [c.dropped for c in diff.result.caches] == [True, True]
    assert not [n for n in diff.result.gm.graph.nodes if "layers_1_indexer_cumulative_length" in n.name and n.users]
    torch._dynamo.reset()
    inputs["past_key_values"] = ic_compile.static_cache(model, 1, 32)
    report = ic_compile.explain(model, inputs, plan="FSSF")
    assert report.key_cache_dropped == [1, 2] and report.key_cache_kept == []
    assert "indexer key-cache writes removed for S layers [1, 2]" in str(report)


def test_deepseek_v32_rope_nodes_are_attributed_to_their_layer():
    """HF DeepseekV32's indexer rope runs in a module-level function (apply_rotary_pos_emb): the
    innermost nn_module_stack entry has no layer number, the one above it does."""
    diff = graph_diff(load_model("hf-tiny:deepseek_v32"), {"input_ids": random_ids(), "use_cache": False},
                      plan="FSSF")
    removed = [n for n in diff.nodes if n.change == "removed"]
    rope = [n for n in removed if "apply_rotary_pos_emb" in n.module]
    assert len(rope) >= 16 and {n.layer for n in rope} == {1, 2}
    assert all(n.layer is not None for n in removed)
    assert sum(l.removed_nodes for l in diff.layers) == len(removed)
    assert "no single layer" not in str(diff)


def test_node_diff_matches_rewrite_and_rewires_to_source(hf_diff):
    removed_by_rewrite = hf_diff.result.removed  # what `explain` counts too
    assert hf_diff.totals["removed_nodes"] == len(removed_by_rewrite) > 0
    assert hf_diff.nodes_before - hf_diff.nodes_after == len(removed_by_rewrite)
    removed = [n for n in hf_diff.nodes if n.change == "removed"]
    assert {n.layer for n in removed} == {1, 3}
    assert sum(n.op == "topk" for n in removed) == 2
    # each S layer's rewired nodes now read what its F source computed (the top-k, or its cast)
    layer_of = node_layers(hf_diff.result.original)
    for layer, source in ((1, 0), (3, 2)):
        rewired = [n for n in hf_diff.nodes if n.change == "rewired" and n.layer == layer]
        gained = {x for n in rewired for x in n.inputs_after if x not in n.inputs_before}
        assert rewired and gained and {layer_of[x] for x in gained} == {source}
    assert sum(l.removed_nodes for l in hf_diff.layers) == len(removed)


def test_key_cache_write_removed_with_a_cache():
    from transformers import DynamicCache
    model = glm()
    diff = graph_diff(model, {"input_ids": random_ids(), "use_cache": True, "cache": DynamicCache(config=model.config)},
                      plan="FSSF")
    assert diff.seq_len == 16  # default: the example's key length
    assert [l.key_cache_write_removed for l in diff.layers] == [None, True, True, None]
    assert [l.key_cache_bytes_per_token_freed for l in diff.layers] == [0, 64, 64, 0]
    assert [c.dropped for c in diff.result.caches] == [True, True]
    assert not [n for n in diff.result.gm.graph.nodes if "layers_1_indexer_cumulative_length" in n.name and n.users]
    assert "reads keys_1 (layer 1)" not in str(diff)  # only changed inputs are listed
    output = next(n for n in diff.nodes if n.name == "output")
    assert output.change == "rewired"  # the S layers' cache state is handed back unchanged


def test_terminal_table(hf_diff):
    text = str(hf_diff)
    assert "plan FSFS" in text and "seq_len 1024" in text and "50.0% of indexer FLOPs removed" in text
    for layer in range(4):
        assert f"model.layers.{layer}.self_attn.indexer" in text


def test_html_is_self_contained_and_marks_every_layer(hf_diff, tmp_path):
    page = hf_diff.to_html(tmp_path / "diff.html")
    assert (tmp_path / "diff.html").read_text() == page
    for layer in range(4):
        assert f"<section class='layer' data-layer='{layer}'>" in page
        assert f"<option value='{layer}'>" in page
    removed = {n.name for n in hf_diff.nodes if n.change == "removed"}
    drawn_removed = set(re.findall(r"<g class='n removed' data-name='([^']+)'", page))
    assert drawn_removed == removed
    assert len(re.findall(r"<g class='n rewired'", page)) == sum(n.change == "rewired" for n in hf_diff.nodes) >= 2
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page)  # only the SVG namespace URI


def test_kernels_lowering_shows_added_fused_ops(tmp_path):
    diff = graph_diff(load_model("dsa:tiny"), {"idx": random_ids(seq=24, vocab=256)}, plan="FSSF", seq_len=L,
                      kernels=True)
    added = [n for n in diff.nodes if n.change == "added"]
    assert [(n.layer, n.op) for n in added] == [(0, "lowered_indexer"), (0, "scatter_safe_indices"),
                                                (3, "lowered_indexer"), (3, "scatter_safe_indices")]
    assert [l.flops_removed > 0 for l in diff.layers] == [False, True, True, False]  # F work moved, not removed
    assert [l.removed_nodes > 0 for l in diff.layers] == [True] * 4
    page = diff.to_html()
    assert len(re.findall(r"<g class='n added'", page)) == 4


def test_no_indexer_model_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    with pytest.raises(NoIndexerFoundError, match="no lightning indexer found.*is this a DSA model"):
        graph_diff(model, torch.randn(2, 8), plan="F")


def test_wrong_plan_length_is_a_clear_error():
    with pytest.raises(PlanError, match="plan 'FS' has 2 layers but 4 indexer layers were detected"):
        graph_diff(load_model("dsa:tiny"), {"idx": random_ids(seq=16, vocab=256)}, plan="FS")


def test_cli_json_and_bad_html_path(capsys, tmp_path):
    from ic_compile.cli import main
    html = tmp_path / "d.html"
    assert main(["diff", "--model", "dsa:tiny", "--plan", "FSFS", "--seq", "16", "--seq-len", "2048",
                 "--json", "--html", str(html)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema_version"] == 1 and data["seq_len"] == 2048 and html.exists()
    assert main(["diff", "--plan", "FSFS", "--html", str(tmp_path / "missing" / "d.html")]) == 2
    assert f"--html {tmp_path / 'missing' / 'd.html'}: directory '{tmp_path / 'missing'}' does not exist" in \
        capsys.readouterr().err
