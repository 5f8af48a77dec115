"""Device bugs that only a GPU used to meet, caught on the CPU.

- masks, indices and the masked AdamW step on (fake) CUDA tensors: the masks are built on the optimizer
  partition's device, and GradMasker masks ZeRO-3's gradients in place with the optimizer's own masks (the
  GPU's flat gradient buffer, or the offloaded fp32 gradients and their norms) without a host sync per parameter;
- collectives through a communicator that rejects what NCCL rejects (CPU tensors, objects pickled through the
  GPU), with two ranks emulated by threads: locate from partitions and the fp32 export still give the offline
  results;
- DeepSpeed's accelerator and torch must agree on the device, or the run stops with one sentence;
- each stage of one process reports its own peak memory;
- bench/gpu.py shows a failing child's stderr and log.
"""
from __future__ import annotations

import itertools
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fake_cuda import CUDA, FakeCuda, cuda, fake_cuda, real
from test_select import zero3_slices
from thread_ranks import Exchange, run_threads
from allo.comm import Communicator
from allo.masks.apply import GradMasker, Piece, build_masks
from allo.masks.io import save_masks
from allo.optim import MaskedAdamW


def _mask_file(tmp_path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> tuple[Path, dict]:
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(s, generator=g) < 0.3 for n, s in shapes.items()}
    path = tmp_path / "n2.safetensors"
    save_masks(path, masks, {"counts": {n: int(m.sum()) for n, m in masks.items()}})
    return path, masks


@pytest.mark.parametrize("clip", [0.0, 0.05])
@pytest.mark.parametrize("sparse", [False, True])
def test_masked_step_on_cuda_partitions(tmp_path, sparse, clip):
    """A flat ZeRO-style fp32 partition on the GPU holding two parameters: the masks land on its device and the
    masked step moves exactly the selected elements; clipping inside the step keeps its norm and scale there."""
    shapes = {"a.weight": (5, 7), "b.weight": (11,)}
    path, masks = _mask_file(tmp_path, shapes)
    start = torch.randn(46, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(46, generator=torch.Generator().manual_seed(2))
    with fake_cuda():
        flat = cuda(start)
        flat.grad = cuda(grad)
        params = {n: SimpleNamespace() for n in shapes}
        pieces = [Piece("a.weight", params["a.weight"], flat, 0, 0, 35),
                  Piece("b.weight", params["b.weight"], flat, 35, 0, 11)]
        target_masks = build_masks(str(path), pieces)
        assert all(isinstance(m, FakeCuda) for m in target_masks.values())
        opt = MaskedAdamW([flat], lr=0.1, weight_decay=0.1, sparse_state=sparse, max_grad_norm=clip)
        opt.attach_masks(target_masks)
        for _ in range(2):
            opt.step()
        assert all(isinstance(t, FakeCuda) for t in opt.state[flat].values() if t.dim())
        assert isinstance(opt.grad_norm, FakeCuda) if clip else opt.grad_norm is None
    keep = torch.cat([masks["a.weight"].flatten(), masks["b.weight"]])
    moved = real(flat) != start
    assert not (moved & ~keep).any() and moved[keep].all()


def test_optimizer_refuses_a_mask_on_another_device():
    with fake_cuda():
        flat = cuda(torch.zeros(4))
        opt = MaskedAdamW([flat], lr=0.1)
        with pytest.raises(ValueError, match="build masks on the device"):
            opt.attach_masks({id(flat): torch.ones(4, dtype=torch.bool)})


class _Stream:
    """A device stream that counts how often the host waits for it and how often another stream waits on it."""

    def __init__(self) -> None:
        self.host_waits = 0
        self.device_waits = 0

    def synchronize(self) -> None:
        self.host_waits += 1

    def wait_stream(self, other: "_Stream") -> None:
        other.device_waits += 1


class _Accelerator:
    """DeepSpeed's CUDA accelerator as the masker sees it: streams that do not resolve data dependencies."""

    def __init__(self) -> None:
        self.stream = _Stream()

    def resolves_data_dependency(self) -> bool:
        return False

    def current_stream(self) -> _Stream:
        return self.stream


class _Param(SimpleNamespace):
    def partition_numel(self) -> int:
        return self.n


def _zero3_optimizer(offload: bool, grads: torch.Tensor, sizes: list[list[int]]) -> SimpleNamespace:
    """DeepSpeed's ZeRO-3 optimizer as far as the masker reads it: parameters in sub-groups, each sub-group's fp32
    partition (on the GPU, or on the CPU with its .grad under offload), the flat buffer of gradient partitions (every
    sub-group's in order) and the reduce stream."""
    groups, flats, position, ids, at = [], [], {}, {}, 0
    for g, group in enumerate(sizes):
        params = [_Param(n=n) for n in group]
        for offset, p in zip(itertools.accumulate([0] + group[:-1]), params):
            ids[id(p)] = len(ids)
            position[ids[id(p)]] = (g, offset, p.n)
        total = sum(group)
        flat = torch.zeros(total) if offload else cuda(torch.zeros(total))
        if offload:
            flat.grad = grads[at:at + total].clone()
        groups.append(params)
        flats.append(flat)
        at += total
    return SimpleNamespace(fp16_groups=groups, fp32_partitioned_groups_flat=flats, grad_position=position,
                           get_param_id=lambda p: ids[id(p)], offload_optimizer=offload, swap_optimizer=False,
                           grad_partitions_flat_buffer=grads if offload else cuda(grads),
                           reduce_and_partition_stream=_Stream(),
                           norm_for_param_grads={i: torch.tensor(-1.0) for i in ids.values()} if offload else {})


@pytest.mark.parametrize("offload", [False, True])
def test_grad_masker_zero3_masks_each_subgroup_in_place_without_a_host_sync_per_parameter(tmp_path, monkeypatch,
                                                                                          offload):
    """ZeRO-3: the masker zeroes the masked-out gradient elements of every sub-group where DeepSpeed's step reads
    them (the flat buffer of gradient partitions on the GPU; the fp32 partition's .grad on the CPU under offload,
    with the per-parameter norms clipping reads), with the optimizer's own mask (no copy of its own). The host waits
    for no stream on the GPU path (the current stream waits on the reduce stream, on the device) and once per step
    under offload, however many parameters there are."""
    import deepspeed.accelerator

    accelerator = _Accelerator()
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accelerator)
    shapes = {"a.weight": (5, 7), "b.weight": (11,), "c.weight": (3, 4)}
    path, masks = _mask_file(tmp_path, shapes)
    grads = torch.randn(58, generator=torch.Generator().manual_seed(3))
    with fake_cuda():
        opt = _zero3_optimizer(offload, grads, [[35, 11], [12]])
        a, b, c = (p for group in opt.fp16_groups for p in group)
        pieces = [Piece("a.weight", a, opt.fp32_partitioned_groups_flat[0], 0, 0, 35),
                  Piece("b.weight", b, opt.fp32_partitioned_groups_flat[0], 35, 0, 11),
                  Piece("c.weight", c, opt.fp32_partitioned_groups_flat[1], 0, 0, 12)]
        engine = SimpleNamespace(optimizer=opt, zero_optimization_stage=lambda: 3,
                                 is_gradient_accumulation_boundary=lambda: True)
        masker = GradMasker(engine, pieces, build_masks(str(path), pieces), CUDA)
        assert masker.mask_elements() == 0
        for _ in range(2):
            masker.before_step()
        if offload:
            got = torch.cat([f.grad for f in opt.fp32_partitioned_groups_flat])
        else:
            assert isinstance(opt.grad_partitions_flat_buffer, FakeCuda)
            got = real(opt.grad_partitions_flat_buffer)
    keep = torch.cat([masks[n].flatten() for n in shapes])
    assert torch.equal(got[keep], grads[keep]) and not got[~keep].any()
    stream = opt.reduce_and_partition_stream
    assert (stream.host_waits, stream.device_waits) == ((2, 0) if offload else (0, 2))  # two steps
    if offload:  # fp32 norms of the masked partitions, each summing 35, 11 or 12 products: within 1e-5 relative
        expected = [got[:35].norm(), got[35:46].norm(), got[46:].norm()]
        assert torch.allclose(torch.stack(list(opt.norm_for_param_grads.values())), torch.stack(expected), rtol=1e-5)


# ------------------------------------------------------------------------------------------ collectives
class NcclLike:
    """torch.distributed for `world` threads: the main group behaves like NCCL (GPU tensors only; no object
    collectives, which would pickle through the GPU), the side group like gloo (anything on the CPU)."""
    GLOO = "gloo-side-group"
    ReduceOp = SimpleNamespace(SUM="sum", MAX="max")

    def __init__(self, world: int) -> None:
        self.exchange = Exchange(world)
        self.rank_of: dict[int, int] = {}  # thread -> rank: torch.distributed's calls do not name the rank

    def _exchange(self, value):
        return self.exchange(self.rank_of[threading.get_ident()], value)

    def _check(self, what: str, group, tensor=None) -> None:
        if group == self.GLOO:
            if tensor is not None and isinstance(tensor, FakeCuda):
                raise RuntimeError("gloo: a CUDA tensor in a CPU group")
            return
        if tensor is None:
            raise RuntimeError(f"{what} on the NCCL group pickles through the GPU of every rank")
        if not isinstance(tensor, FakeCuda):
            raise RuntimeError("NCCL: No backend type associated with device type cpu")

    def all_reduce(self, tensor, op="sum", group=None):
        self._check("all_reduce", group, tensor)
        parts = self._exchange(real(tensor).clone())
        stacked = torch.stack(parts)
        real(tensor).copy_(stacked.amax(0) if op == "max" else stacked.sum(0))

    def all_gather_object(self, out, obj, group=None):
        self._check("all_gather_object", group)
        out[:] = self._exchange(obj)

    def gather_object(self, obj, out, dst=0, group=None):
        self._check("gather_object", group)
        got = self._exchange(obj)
        if out is not None:
            out[:] = got

    def barrier(self, group=None):
        self.exchange.barrier.wait()


def run_ranks(world: int, fn) -> list:
    """fn(rank, Communicator) on `world` threads, each rank's Communicator a GPU rank's over NcclLike."""
    dist = NcclLike(world)

    def body(rank: int):
        dist.rank_of[threading.get_ident()] = rank
        return fn(rank, Communicator(dist, rank, world, CUDA, cpu_group=NcclLike.GLOO))

    return run_threads(world, body, dist.exchange)


def test_communicator_routes_each_tensor_to_a_group_that_accepts_it():
    def fn(rank, comm):
        with fake_cuda():
            on_gpu = comm.all_reduce(cuda(torch.tensor([1.0 + rank])), "sum")
            host = comm.all_reduce(torch.tensor([rank], dtype=torch.int64), "sum")
            return float(real(on_gpu)), int(host), comm.all_gather_object({"rank": rank}), comm.gather_object(rank)

    (g0, h0, objs, gathered), (g1, h1, _, none) = run_ranks(2, fn)
    assert (g0, h0, g1, h1) == (3.0, 1, 3.0, 1)
    assert objs == [{"rank": 0}, {"rank": 1}] and gathered == [0, 1] and none is None


def test_the_side_group_takes_the_recipes_timeout(monkeypatch):
    """The gloo side group waits as long as the main group (distributed.timeout_minutes), not torch's 30 min."""
    from datetime import timedelta

    import torch.distributed as dist

    from allo import comm

    made = []
    monkeypatch.setattr(dist, "new_group", lambda **kw: made.append(kw) or "group")
    try:
        for minutes, want in ((7, {"backend": "gloo", "timeout": timedelta(minutes=7)}), (None, {"backend": "gloo"})):
            comm.set_timeout(minutes)
            comm._side_group.cache_clear()
            assert comm._side_group() == "group" and made[-1] == want
    finally:
        comm.set_timeout(None)
        comm._side_group.cache_clear()


def test_locate_from_partitions_over_nccl_rules_equals_offline(tmp_path, tiny_model, monkeypatch):
    """Each of two GPU ranks scores its half of every tensor (as ZeRO-3 partitions them), with histograms and ties
    reduced through the engine's Strategy; the masks equal the offline exact top-k."""
    import allo.engine
    from allo.comm import Communicator
    from allo.config import TrainConfig
    from safetensors.torch import load_file, save_file

    from allo.masks.io import load_masks
    from allo.masks.locate import locate
    from allo.masks.locate_partitioned import locate_partitioned

    base = load_file(str(tiny_model / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    tuned = {n: w + 1e-3 * torch.randn(w.shape, generator=g) for n, w in base.items()}
    tuned_dir = tmp_path / "tuned"
    tuned_dir.mkdir()
    save_file(tuned, str(tuned_dir / "model.safetensors"))
    shapes = {n: tuple(w.shape) for n, w in base.items()}

    comms: dict[int, Communicator] = {}
    monkeypatch.setattr(allo.engine, "init_distributed", lambda *a: CUDA)
    monkeypatch.setattr(Communicator, "from_process_group",
                        classmethod(lambda cls, device: comms[threading.get_ident()]))

    def fn(rank, comm):
        comms[threading.get_ident()] = comm
        strategy = allo.engine.Strategy("ds_configs/zero3.json", TrainConfig(global_batch_size=2, micro_batch_size=1),
                                        "fp32")
        assert (strategy.rank, strategy.world, strategy.device) == (rank, 2, CUDA)
        return locate_partitioned(zero3_slices(tuned, 2, rank), shapes, tiny_model, 1e-3, {"n1": 10, "n2": 15}, tmp_path / "parts",
                                   strategy, threads=1)

    paths = run_ranks(2, fn)[0]
    ref = locate(tiny_model, tuned_dir, 1e-3, {"n1": 10, "n2": 15}, tmp_path / "offline")
    for label in ("n1", "n2"):
        got, want = load_masks(paths[label]), load_masks(ref.paths[label])
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want), label


def test_fp32_export_gathers_through_the_side_group(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import allo.masks.apply as apply
    from allo.stages import locate as locate_stage

    full = {"a.weight": torch.randn(3, 5), "b.bias": torch.randn(7)}

    monkeypatch.setattr(apply, "fp32_masters", lambda engine, named: zero3_slices(full, 2, engine.rank))
    named = [(n, SimpleNamespace(shape=w.shape)) for n, w in full.items()]
    config = SimpleNamespace(to_json_file=lambda path: Path(path).write_text("{}"))

    def fn(rank, comm):
        strategy = SimpleNamespace(zero_stage=3, is_rank0=rank == 0, gather_object=comm.gather_object,
                                   barrier=comm.barrier)
        engine = SimpleNamespace(rank=rank, module=SimpleNamespace(config=config))
        return locate_stage.export_fp32(strategy, engine, named, tmp_path / "fp32")

    run_ranks(2, fn)
    got = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    for n, w in full.items():
        assert torch.equal(got[n], w)


# -------------------------------------------------------------------------------------- device choice
def test_device_comes_from_deepspeeds_accelerator_and_a_mismatch_is_refused():
    from allo.engine import DeviceMismatch, run_device

    assert run_device("cuda", True, 1) == torch.device("cuda", 1)
    assert run_device("cpu", False, 0) == torch.device("cpu")
    with pytest.raises(DeviceMismatch, match="unset DS_ACCELERATOR to train on the GPU"):
        run_device("cpu", True, 0)
    with pytest.raises(DeviceMismatch, match="sees no GPU"):
        run_device("cuda", False, 0)


def test_a_gpu_host_with_a_cpu_accelerator_stops_before_any_process_group(monkeypatch):
    """What `make demo` did on a GPU host: DS_ACCELERATOR=cpu for DeepSpeed while torch saw the GPU."""
    import deepspeed.comm

    from allo.engine import DeviceMismatch, init_distributed

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(deepspeed.comm, "is_initialized", lambda: False)
    with pytest.raises(DeviceMismatch):
        init_distributed()


def test_device_is_derived_once_when_unset(monkeypatch):
    import os

    from allo.engine import accelerator_name

    for seen, want in ((True, "cuda"), (False, "cpu")):  # a copy of the environment: nothing leaks to later tests
        monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"})
        monkeypatch.setattr(torch.cuda, "is_available", lambda seen=seen: seen)
        assert accelerator_name() == want and os.environ["DS_ACCELERATOR"] == want


def test_no_launcher_forces_the_cpu():
    """The demo, the tests' children and the launchers leave the choice to allo (DS_ACCELERATOR unset)."""
    from conftest import ENV, GPU_ENV, ROOT

    assert "DS_ACCELERATOR" not in ENV and "DS_ACCELERATOR" not in GPU_ENV and ENV["CUDA_VISIBLE_DEVICES"] == ""
    for script in ("recipes/tiny/demo.py", "recipes/run_one_node.sh", "slurm/submit.sh", "Makefile",
                   "bench/gpu.py", "bench/plan_memory.py"):
        text = (ROOT / script).read_text()
        assert "DS_ACCELERATOR=cpu" not in text and '"DS_ACCELERATOR": "cpu"' not in text \
            and 'DS_ACCELERATOR="cpu"' not in text, script


# ------------------------------------------------------------------------------------------ peak memory
def test_peak_memory_resets_between_stages():
    from allo.metrics import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    before = peak_memory_mb(cpu)
    big = torch.ones(64 * 2 ** 20)  # 256 MiB, touched
    high = peak_memory_mb(cpu)
    del big
    reset_peak_memory(cpu)
    assert high - before > 200 and peak_memory_mb(cpu) < high - 200


def test_fake_cuda_refuses_what_cuda_refuses():
    """Each rule of tests/fake_cuda.py against the case torch states for real CUDA (sources in its docstring)."""
    with fake_cuda():
        a, scalar = cuda(torch.ones(3)), torch.tensor(2.0)
        assert torch.equal(real(a * scalar), torch.full((3,), 2.0))  # a CPU scalar in an elementwise op: moved
        with pytest.raises(RuntimeError, match="same device"):
            torch.stack([cuda(torch.tensor(1.0)), scalar])  # ... but not in stack
        with pytest.raises(RuntimeError, match="same device"):
            torch.cat([a, torch.ones(1)])
        p, g, m, v = (cuda(torch.zeros(4)) for _ in range(4))
        with pytest.raises(RuntimeError, match="same device"):  # a fused kernel's step and scale: CPU refused
            torch._fused_adamw_([p], [g], [m], [v], [], [torch.tensor(1.0)], lr=1e-3, beta1=0.9, beta2=0.999,
                                weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                                grad_scale=torch.tensor(1.0))
        torch._fused_adamw_([p], [g], [m], [v], [], [cuda(torch.tensor(1.0))], lr=1e-3, beta1=0.9, beta2=0.999,
                            weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                            grad_scale=cuda(torch.tensor(1.0)))
        idx = torch.tensor([0, 2])
        assert torch.equal(real(a[idx]), torch.ones(2))  # a CUDA tensor takes CPU indices
        with pytest.raises(RuntimeError, match="indices should be either on cpu or on the same device"):
            torch.ones(3)[cuda(idx)]  # a CPU tensor does not take CUDA ones
        other = cuda(torch.ones(3), index=1)
        assert str(other.device) == "cuda:1" and str(torch.zeros(2, device="cuda:1").device) == "cuda:1"
        with pytest.raises(RuntimeError, match="cuda:0 and cuda:1"):
            a + other  # two GPUs do not mix


def test_two_gpu_tests_skip_with_the_reason_where_fewer_are_seen(monkeypatch):
    import conftest

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    items = [SimpleNamespace(keywords={"gpu": 1, "gpu2": 1}, marks=[]), SimpleNamespace(keywords={"gpu": 1}, marks=[])]
    for item in items:
        item.add_marker = item.marks.append
    conftest.pytest_collection_modifyitems(None, items)
    assert [m.kwargs["reason"] for m in items[0].marks] == [
        "needs two CUDA GPUs (torch sees 1): run `make gpu-check` on a node with two"]
    assert items[1].marks == []  # a one-GPU test runs


def test_an_engine_norm_on_the_gpu_skips_the_step_on_the_gpu():
    """Under ZeRO-3 DeepSpeed's global norm (norm_source) lives on the GPU with the fp32 partition: the skip flag the
    fused kernel gets stays there (fake CUDA refuses a CPU tensor as the kernel's found_inf), and a NaN norm leaves
    every element where it was."""
    start = torch.randn(46, generator=torch.Generator().manual_seed(1))
    with fake_cuda():
        flat = cuda(start)
        flat.grad = cuda(torch.randn(46, generator=torch.Generator().manual_seed(2)))
        opt = MaskedAdamW([flat], lr=0.1, weight_decay=0.1)
        opt.attach_masks({id(flat): cuda(torch.rand(46, generator=torch.Generator().manual_seed(3)) < 0.3)})
        opt.norm_source = lambda: cuda(torch.tensor(float("nan")))
        opt.step()
    assert torch.equal(real(flat), start)
