"""The one selection routine (`allo.masks.select.select_masks`) run as several ranks in one process: every rank
holds ZeRO-3-like slices (each tensor cut at rank-dependent, odd offsets), and the masks must equal the offline
ones bit for bit, massive ties included; and the tie warning names the remedy."""
from __future__ import annotations

import logging

import pytest
import torch

from allo.masks.io import load_masks
from allo.masks.locate import locate
from allo.masks.locate_partitioned import locate_partitioned
from test_locate import SHAPES, make_pair, reference
from thread_ranks import Exchange, run_threads


class RankComm:
    """Collectives between threads: what the engine's Strategy does between processes."""

    def __init__(self, exchange: Exchange, rank: int):
        self.exchange, self.rank, self.world = exchange, rank, exchange.world

    def _exchange(self, obj):
        return self.exchange(self.rank, obj)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        parts = self._exchange(tensor.clone())
        tensor.copy_(torch.stack(parts).sum(0))
        return tensor

    def all_gather_object(self, obj):
        return self._exchange(obj)

    def gather_object(self, obj):
        out = self._exchange(obj)
        return out if self.rank == 0 else None


def zero3_slices(tuned: dict, world: int, rank: int) -> list:
    """Each tensor flattened, padded to a multiple of `world` and cut into equal partitions, as ZeRO-3 does."""
    out = []
    for name, w in tuned.items():
        flat = w.float().flatten()
        part = -(-flat.numel() // world)
        start = rank * part
        piece = flat[start:start + part]
        if piece.numel():
            out.append((name, start, piece))
    return out


def run_ranks(world: int, fn) -> list:
    exchange = Exchange(world)
    return run_threads(world, lambda r: fn(RankComm(exchange, r), r), exchange)


@pytest.mark.parametrize("world,cap,bin_bits,scope,band", [(2, None, 20, "global", 0), (3, 0, 6, "global", 4),
                                                           (2, 0, 8, "per_layer", 3), (3, None, 6, "per_tensor", 0)])
def test_ranks_select_what_one_process_selects(tmp_path, world, cap, bin_bits, scope, band):
    """Quantised changes make huge tie groups at the threshold (cap 0: every threshold bin takes the exact-key pass
    and the ties are shared out across ranks in global order)."""
    base, tuned = make_pair(tmp_path, ties=True)
    ratios = {"n1": 10, "n2": 15}
    ref = locate(tmp_path / "base", tmp_path / "tuned", 1e-3, ratios, tmp_path / "offline", scope=scope,
                 band_start=band, bin_bits=bin_bits, collect_cap=cap)
    shapes = {n: tuple(w.shape) for n, w in tuned.items()}

    def one_rank(comm, rank):
        return locate_partitioned(zero3_slices(tuned, world, rank), shapes, tmp_path / "base", 1e-3, ratios,
                                  tmp_path / "ranks", comm, scope=scope, band_start=band, bin_bits=bin_bits,
                                  collect_cap=cap, threads=2)

    paths = run_ranks(world, one_rank)[0]
    for label in ratios:
        got, want = load_masks(paths[label]), load_masks(ref.paths[label])
        assert set(got) == set(SHAPES)
        for name in SHAPES:
            assert torch.equal(got[name], want[name]), (label, name)
    if scope == "global" and band == 0:  # and both equal torch.topk with the same tie order
        total = sum(w.numel() for w in base.values())
        want = reference(base, tuned, int(total * 0.10))
        got = load_masks(paths["n1"])
        assert all(torch.equal(got[n], want[n]) for n in SHAPES)


def test_an_error_on_one_rank_stops_every_rank(tmp_path):
    base, tuned = make_pair(tmp_path)
    shapes = {n: tuple(w.shape) for n, w in tuned.items()}
    bad = dict(tuned)
    bad["lm_head.weight"] = bad["lm_head.weight"].clone()
    bad["lm_head.weight"][-1, -1] = float("nan")  # in the last rank's partition only

    def one_rank(comm, rank):
        with pytest.raises(ValueError, match="lm_head.weight: NaN or Inf"):
            locate_partitioned(zero3_slices(bad, 2, rank), shapes, tmp_path / "base", 1e-3, {"n": 10},
                               tmp_path / "m", comm)
        return True

    assert run_ranks(2, one_rank) == [True, True]


def test_bf16_ties_warn_and_name_the_remedy(tmp_path, caplog):
    """Two bf16 checkpoints at a tiny learning rate: most elements did not move at all in bf16, the threshold falls
    in a huge tie group, and locate says so with the remedy; fp32 drift of the same run does not warn."""
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    tuned = {n: w + torch.randn(w.shape, generator=g) * 1e-5 for n, w in base.items()}
    from safetensors.torch import save_file

    for name, weights in (("b16", {n: w.bfloat16() for n, w in base.items()}),
                          ("t16", {n: w.bfloat16() for n, w in tuned.items()}),
                          ("b32", base), ("t32", tuned)):
        (tmp_path / name).mkdir()
        save_file(weights, str(tmp_path / name / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="allo.masks.select"):
        res = locate(tmp_path / "b16", tmp_path / "t16", 1e-6, {"n1": 10}, tmp_path / "m16")
    assert res.summary["threshold_ties"]["n1"] > 0.2 * res.summary["elements"] * 0.10
    assert "tie at the threshold" in caplog.text and "locate.from_partitions: true" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="allo.masks.select"):
        res = locate(tmp_path / "b32", tmp_path / "t32", 1e-6, {"n1": 10}, tmp_path / "m32")
    assert "tie at the threshold" not in caplog.text
    assert res.summary["threshold_ties"]["n1"] < 0.05 * res.summary["elements"] * 0.10


def test_fp32_partition_ties_advise_a_longer_warmup_not_from_partitions(tmp_path, caplog):
    """Ties in the fp32 master weights (the run already has locate.from_partitions: true): the warning advises
    more warm-up, never the setting the run already has."""
    base, tuned = make_pair(tmp_path, ties=True)
    shapes = {n: tuple(w.shape) for n, w in tuned.items()}
    with caplog.at_level(logging.WARNING, logger="allo.masks.select"):
        run_ranks(1, lambda comm, rank: locate_partitioned(zero3_slices(tuned, 1, 0), shapes, tmp_path / "base",
                                                           1e-3, {"n1": 10}, tmp_path / "m", comm))
    assert "tie at the threshold" in caplog.text and "warmup.train.lr" in caplog.text
    assert "from_partitions" not in caplog.text


def test_auto_checkpointing_is_one_decision_for_every_rank():
    """Mixed GPUs: the rank whose memory needs checkpointing turns it on for all (a collective over the ranks)."""
    from allo.stages.runner import agree_on_checkpointing

    got = run_ranks(3, lambda comm, rank: agree_on_checkpointing(comm, rank == 1, f"rank {rank}'s plan"))
    assert [c for c, _ in got] == [True, True, True]
    assert got[1][1] == "rank 1's plan" and got[0][1] == "another rank's GPU needs it (auto)"
    assert [c for c, _ in run_ranks(2, lambda comm, rank: agree_on_checkpointing(comm, False, "x"))] == [False, False]
