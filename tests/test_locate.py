"""Exact streaming top-k: agreement with torch.topk on the concatenated scores (ties included), scopes, bands,
bottom selection, sharded checkpoints and the errors of bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from allo.masks.io import load_masks, mask_counts
from allo.masks.locate import LocateError, locate

SHAPES = {"model.embed_tokens.weight": (50, 7), "model.layers.0.mlp.up_proj.weight": (13, 11),
          "model.layers.0.input_layernorm.weight": (11,), "model.layers.1.mlp.up_proj.weight": (13, 11),
          "lm_head.weight": (50, 7)}


def make_pair(tmp_path, seed=0, ties=False, shard=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in SHAPES.items()}
    tuned = {}
    for n, w in base.items():
        delta = torch.randn(w.shape, generator=g) * 1e-3
        if ties:  # many exactly equal scores: quantise the changes to a few levels
            delta = torch.round(delta * 2e3) / 2e3
        tuned[n] = (w.float() + delta).to(dtype)
    for name, weights in (("base", base), ("tuned", tuned)):
        d = tmp_path / name
        d.mkdir()
        if shard:
            names = sorted(weights)
            parts = {"a.safetensors": names[:2], "b.safetensors": names[2:]}
            for f, ns in parts.items():
                save_file({n: weights[n] for n in ns}, str(d / f))
            (d / "model.safetensors.index.json").write_text(json.dumps(
                {"weight_map": {n: f for f, ns in parts.items() for n in ns}}))
        else:
            save_file(weights, str(d / "model.safetensors"))
    return base, tuned


def reference(base, tuned, k, bottom=False, names=None):
    """torch.topk over the concatenated scores with the same tie order (earlier tensor, lower index first)."""
    names = names or sorted(base)
    scores = torch.cat([(tuned[n].float() - base[n].float()).abs().flatten() for n in names])
    order_key = -scores if not bottom else scores
    # stable sort: among equal scores the earlier position wins, as in locate
    idx = torch.argsort(order_key, stable=True)[:k]
    flat = torch.zeros(len(scores), dtype=torch.bool)
    flat[idx] = True
    out, start = {}, 0
    for n in names:
        out[n] = flat[start:start + base[n].numel()].view(base[n].shape)
        start += base[n].numel()
    return out


@pytest.mark.parametrize("ties,shard,bin_bits,cap", [(False, False, 20, None), (True, False, 20, None),
                                                     (True, True, 8, None), (False, True, 6, None),
                                                     (True, False, 8, 0), (False, True, 6, 0)])
def test_global_topk_matches_torch(tmp_path, ties, shard, bin_bits, cap):
    """cap 0: every threshold bin takes the big-bin path (low-bits pass, exact key, ties in order)."""
    base, tuned = make_pair(tmp_path, ties=ties, shard=shard)
    total = sum(w.numel() for w in base.values())
    res = locate(tmp_path / "base", tmp_path / "tuned", 1e-6, {"n1": 5, "n2": 10}, tmp_path / "masks",
                 bin_bits=bin_bits, collect_cap=cap)
    for label, r in (("n1", 5), ("n2", 10)):
        got = load_masks(res.paths[label])
        want = reference(base, tuned, int(total * r / 100))
        for n in SHAPES:
            assert torch.equal(got[n], want[n]), f"{label} {n}"
        meta = json.loads((tmp_path / "masks" / f"{label}.json").read_text())
        assert meta["selected"] == int(total * r / 100) and meta["counts"] == mask_counts(res.paths[label])


def test_bf16_checkpoints(tmp_path):
    """bf16 weights (the usual HF export) go through the mixed-dtype scoring path and still match torch.topk."""
    base, tuned = make_pair(tmp_path, dtype=torch.bfloat16, shard=True)
    total = sum(w.numel() for w in base.values())
    res = locate(tmp_path / "base", tmp_path / "tuned", 1e-6, {"n2": 10}, tmp_path / "masks")
    got, want = load_masks(res.paths["n2"]), reference(base, tuned, int(total * 0.10))
    for n in SHAPES:
        assert torch.equal(got[n], want[n]), n


@pytest.mark.parametrize("cap", [None, 0])
def test_bottom_and_band(tmp_path, cap):
    base, tuned = make_pair(tmp_path, ties=True)
    total = sum(w.numel() for w in base.values())
    res = locate(tmp_path / "base", tmp_path / "tuned", 1e-6, {"b": 10}, tmp_path / "bottom", bottom=True,
                 collect_cap=cap)
    want = reference(base, tuned, int(total * 0.10), bottom=True)
    got = load_masks(res.paths["b"])
    assert all(torch.equal(got[n], want[n]) for n in SHAPES)
    res = locate(tmp_path / "base", tmp_path / "tuned", 1e-6, {"band": 15}, tmp_path / "band", band_start=5,
                 bin_bits=10, collect_cap=cap)
    top15, top5 = reference(base, tuned, int(total * .15)), reference(base, tuned, int(total * .05))
    got = load_masks(res.paths["band"])
    assert all(torch.equal(got[n], top15[n] & ~top5[n]) for n in SHAPES)


@pytest.mark.parametrize("scope", ["per_tensor", "per_layer"])
def test_scopes(tmp_path, scope):
    base, tuned = make_pair(tmp_path, ties=True)
    res = locate(tmp_path / "base", tmp_path / "tuned", 1e-6, {"m": 10}, tmp_path / "m", scope=scope, bin_bits=12)
    got = load_masks(res.paths["m"])
    groups = ([[n] for n in sorted(SHAPES)] if scope == "per_tensor" else
              [[n for n in sorted(SHAPES) if ".layers.0." in n], [n for n in sorted(SHAPES) if ".layers.1." in n],
               [n for n in sorted(SHAPES) if ".layers." not in n]])
    for names in groups:
        k = int(sum(base[n].numel() for n in names) * 0.10)
        want = reference(base, tuned, k, names=names)
        assert all(torch.equal(got[n], want[n]) for n in names), names


def test_bad_input(tmp_path):
    base, tuned = make_pair(tmp_path)
    with pytest.raises(LocateError, match="outside"):
        locate(tmp_path / "base", tmp_path / "tuned", 1e-6, {"x": 0}, tmp_path / "o")
    with pytest.raises(LocateError, match="identical"):
        locate(tmp_path / "base", tmp_path / "base", 1e-6, {"x": 5}, tmp_path / "o")
    bad = dict(tuned)
    bad["model.layers.0.input_layernorm.weight"] = torch.full((11,), float("nan"))
    bad["extra.weight"] = torch.zeros(2)
    bad["lm_head.weight"] = torch.zeros(49, 7)
    (tmp_path / "bad").mkdir()
    save_file(bad, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(LocateError, match=r"only in tuned: extra.weight.*lm_head.weight: base \[50, 7\]"):
        locate(tmp_path / "base", tmp_path / "bad", 1e-6, {"x": 5}, tmp_path / "o")
    del bad["extra.weight"]
    bad["lm_head.weight"] = tuned["lm_head.weight"]
    save_file(bad, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(LocateError, match="input_layernorm.weight: NaN or Inf"):
        locate(tmp_path / "base", tmp_path / "bad", 1e-6, {"x": 5}, tmp_path / "o")
    bad["model.layers.0.input_layernorm.weight"] = torch.full((11,), float("inf"))
    save_file(bad, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(LocateError, match="input_layernorm.weight: NaN or Inf"):
        locate(tmp_path / "base", tmp_path / "bad", 1e-6, {"x": 5}, tmp_path / "o", bottom=True)


@pytest.mark.parametrize("bin_bits,cap", [(20, None), (6, None), (6, 0)])
def test_chunked_scoring_matches_torch(tmp_path, monkeypatch, bin_bits, cap):
    """Tensors scored in many small row chunks (ties and impure threshold bins across chunk borders)."""
    import allo.masks.locate as loc

    monkeypatch.setattr(loc, "CHUNK", 24)  # chunks are whole bytes of the packed mask
    base, tuned = make_pair(tmp_path, ties=True)
    total = sum(w.numel() for w in base.values())
    res = locate(tmp_path / "base", tmp_path / "tuned", 1e-6, {"n": 10}, tmp_path / "m", band_start=0,
                 bin_bits=bin_bits, collect_cap=cap)
    got, want = load_masks(res.paths["n"]), reference(base, tuned, int(total * 0.10))
    assert all(torch.equal(got[n], want[n]) for n in SHAPES)
    res = locate(tmp_path / "base", tmp_path / "tuned", 1e-6, {"b": 12}, tmp_path / "b", band_start=4,
                 bin_bits=bin_bits, collect_cap=cap)
    top12, top4 = reference(base, tuned, int(total * .12)), reference(base, tuned, int(total * .04))
    got = load_masks(res.paths["b"])
    assert all(torch.equal(got[n], top12[n] & ~top4[n]) for n in SHAPES)


def test_source_hashes_are_of_the_weights(tmp_path):
    """The same weights hash the same whether sharded or not; a changed weight changes the hash."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    make_pair(tmp_path / "a", seed=3)
    base, tuned = make_pair(tmp_path / "b", seed=3, shard=True)
    ma = locate(tmp_path / "a" / "base", tmp_path / "a" / "tuned", 1e-6, {"n": 5}, tmp_path / "ma")
    mb = locate(tmp_path / "b" / "base", tmp_path / "b" / "tuned", 1e-6, {"n": 5}, tmp_path / "mb")
    meta_a = json.loads((tmp_path / "ma" / "n.json").read_text())
    meta_b = json.loads((tmp_path / "mb" / "n.json").read_text())
    assert meta_a["base_hash"] == meta_b["base_hash"] and meta_a["tuned_hash"] == meta_b["tuned_hash"]
    assert meta_a["base_hash"] != meta_a["tuned_hash"]
    import xxhash

    want = xxhash.xxh3_128()  # the documented definition: every tensor's bytes, tensors in sorted-name order
    for n in sorted(base):
        want.update(base[n].contiguous().view(torch.uint8).numpy().tobytes())
    assert meta_a["base_hash"] == want.hexdigest()
    tuned["lm_head.weight"][0, 0] += 1.0
    (tmp_path / "c").mkdir()
    save_file(tuned, str(tmp_path / "c" / "model.safetensors"))
    locate(tmp_path / "a" / "base", tmp_path / "c", 1e-6, {"n": 5}, tmp_path / "mc")
    assert json.loads((tmp_path / "mc" / "n.json").read_text())["tuned_hash"] != meta_a["tuned_hash"]
    assert ma.paths and mb.paths


def test_masks_show_table_and_heatmap(tmp_path, capsys):
    from allo.cli import main
    from allo.masks.io import save_masks
    from allo.masks.show import fractions

    masks = {"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 5, dtype=torch.bool),
             "model.layers.1.mlp.up_proj.weight": torch.ones(4, 5, dtype=torch.bool),
             "model.layers.1.self_attn.q_proj.weight": torch.zeros(2, 5, dtype=torch.bool),
             "lm_head.weight": torch.zeros(10, dtype=torch.bool)}
    masks["model.layers.0.mlp.up_proj.weight"][0, :2] = True
    masks["lm_head.weight"][:5] = True
    path = tmp_path / "m.safetensors"
    save_masks(path, masks, {"ratio": 10})  # no sidecar: counts come from the file itself
    table, other, overall = fractions(path)
    assert table == {0: {"mlp.up_proj": 0.1}, 1: {"mlp.up_proj": 1.0, "self_attn.q_proj": 0.0}}
    assert other == {"lm_head.weight": 0.5} and overall == pytest.approx(27 / 60)
    assert main(["masks", "show", str(path), "--png", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "45.000% of elements selected (ratio 10" in out and "100.00%" in out and "lm_head.weight: 50.00%" in out
    assert (tmp_path / "h.png").stat().st_size > 5000


def test_thread_count_setting(monkeypatch):
    from allo.masks.select import LocateError, scoring_threads

    monkeypatch.setenv("ALLO_LOCATE_THREADS", "3")
    assert scoring_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("ALLO_LOCATE_THREADS", bad)
        with pytest.raises(LocateError, match="ALLO_LOCATE_THREADS"):
            scoring_threads()
    monkeypatch.delenv("ALLO_LOCATE_THREADS")
    assert 1 <= scoring_threads() <= 8


@pytest.mark.parametrize("cap", [None, 0])
def test_same_masks_whatever_the_thread_count(tmp_path, monkeypatch, cap):
    """Chunks are scored side by side but ties are shared out in chunk order: 1 and 4 threads, byte-identical."""
    import allo.masks.locate as loc

    monkeypatch.setattr(loc, "CHUNK", 16)
    base, tuned = make_pair(tmp_path, ties=True)
    files = {}
    for threads in ("1", "4"):
        monkeypatch.setenv("ALLO_LOCATE_THREADS", threads)
        res = locate(tmp_path / "base", tmp_path / "tuned", 1e-6, {"n": 10, "b": 12}, tmp_path / f"m{threads}",
                     band_start=4, bin_bits=6, collect_cap=cap)
        files[threads] = {k: p.read_bytes() for k, p in res.paths.items()}
    assert files["1"] == files["4"]


def test_an_error_mid_pass_stops_the_threads(tmp_path):
    """A NaN raises while chunks are in flight; the scoring and read-ahead threads stop and torch's thread count is
    restored before the error reaches the caller."""
    import threading

    base, tuned = make_pair(tmp_path)
    bad = dict(tuned)
    bad["lm_head.weight"] = bad["lm_head.weight"].clone()
    bad["lm_head.weight"][0, 0] = float("nan")
    (tmp_path / "bad").mkdir()
    save_file(bad, str(tmp_path / "bad" / "model.safetensors"))
    before = torch.get_num_threads()
    with pytest.raises(LocateError, match="NaN"):
        locate(tmp_path / "base", tmp_path / "bad", 1e-6, {"n": 10}, tmp_path / "m")
    assert torch.get_num_threads() == before
    assert not [t for t in threading.enumerate() if t.name.startswith(("locate-score", "locate-read-ahead"))]
