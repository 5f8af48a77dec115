"""The training loop waits for the device only at logging steps. Run on the meta device, where every tensor has a
shape and no data: any `.item()`, `.tolist()`, `float(t)` or `if t` on a computed tensor raises there, as it would
stall the host on a GPU. The loop (batches, padded or packed, log-probs, the DPO / improve / forget objectives,
metric means) runs 8 steps with log_every 4 and reaches the host exactly twice, through `reduce_steps`, which the
test stands in for.
DeepSpeed and the model are stand-ins (a tiny embedding model): this checks allo's own code."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

import allo.train
from allo.config import DPOConfig, ForgetConfig, ImproveConfig, TrainConfig
from allo.stages import objectives
from allo.train import Stage, Trainer

META = torch.device("meta")


class Model(torch.nn.Module):
    def __init__(self, vocab: int = 50):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))


class Strategy:
    """DeepSpeed's side, without DeepSpeed: one rank on the meta device."""
    device, world, rank, is_rank0, grad_accum = META, 1, 0, True, 2

    def __init__(self, model, norm_device=META):
        self.model, self.norm_device = model, norm_device

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.model.zero_grad(set_to_none=True)

    def all_reduce(self, tensor, op="mean"):
        assert tensor.device.type == "cpu", "only host values are reduced every step"
        return tensor

    def grad_norm_tensor(self):  # on the device, or on the CPU as DeepSpeed's offloaded norms are
        return torch.ones((), device=self.norm_device)

    def barrier(self):
        pass


def _examples(n: int, slots: int, arrays: tuple[str, ...]) -> list[dict]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        responses = [[rng.randrange(3, 50) for _ in range(rng.randint(2, 6))] for _ in range(slots)]
        ex = {"index": i, "prompt_ids": [rng.randrange(3, 50) for _ in range(rng.randint(1, 4))],
              "responses": responses}
        for name in arrays:
            ex[name] = [[rng.random() for _ in r] for r in responses]
        out.append(ex)
    return out


@pytest.mark.parametrize("name,objective,slots,arrays", [
    ("dpo", objectives.preference(DPOConfig()), 2, ("ref_logps",)),
    ("improve", objectives.improve(ImproveConfig()), 2, ("ref_logps",)),
    ("forget", objectives.forget(ForgetConfig()), 1, ("ref_logps", "keep_probs")),
])
@pytest.mark.parametrize("norm_device", ["meta", "cpu"])
@pytest.mark.parametrize("packing", [False, True])
def test_no_host_sync_outside_logging(tmp_path, monkeypatch, name, objective, slots, arrays, norm_device, packing):
    model = Model().to(META)
    strategy = Strategy(model, torch.device(norm_device))
    stage = Stage(name, _examples(16, slots, arrays), objective, token_arrays=arrays)
    cfg = TrainConfig(global_batch_size=4, micro_batch_size=2, max_steps=8, log_every=4, report_to=[],
                      packing=packing)
    trainer = Trainer(strategy, model, SimpleNamespace(pad_token_id=0), stage, cfg, tmp_path, group="g")
    trainer.engine = _Engine(model)
    trainer.optimizer = SimpleNamespace(state_bytes=lambda: 0)
    trainer.metrics = allo.train.MetricLogger(tmp_path, enabled=False)
    trainer.trace = []
    trainer.packing_checked = True  # the packed run's one-off start-up check reads its result (tests/test_packing.py)
    reached: list[int] = []

    def reduce_steps(s, steps):  # the one device-to-host point, in place of the real one
        reached.append(len(steps))
        assert all(t.device == META for step in steps for t in step.values())
        return [{k: 0.5 for k in step} for step in steps]

    monkeypatch.setattr(allo.train, "reduce_steps", reduce_steps)
    trainer.train()
    assert reached == [4, 4] and len(trainer.trace) == 8


class _Engine:
    def __init__(self, model):
        self.module = model

    def __call__(self, **kw):
        return self.module(**kw)

    def get_lr(self):
        return [1e-3]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_the_real_engine_waits_for_the_device_only_at_logging(tmp_path, tiny_model, pairs_file, nproc):
    """Through the real DeepSpeed engine (one rank: the one-GPU engine; two: ZeRO-3), every call of the
    accelerator's synchronize is counted (tests/sync_count/sitecustomize.py): 6 steps make as many as 2, so a
    step outside logging makes none (DeepSpeed's throughput timer would make two per micro-batch). Likewise every
    `.item()`, `.tolist()`, `.cpu()`, `float()`, `int()` or `bool()` of a tensor that DeepSpeed's code makes."""
    import os
    from collections import Counter

    from conftest import ENV, ROOT, torchrun, write_recipe

    counts = {}
    for steps in (2, 6):
        recipe = write_recipe(tmp_path / f"r{steps}.yaml", tiny_model, pairs_file, tmp_path / f"run{steps}",
                              "train: {log_every: 1000, max_steps: %d}" % steps)
        stem = tmp_path / f"syncs{steps}"
        env = dict(ENV, ALLO_TEST_SYNC_COUNT=str(stem),
                   PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "sync_count"), ENV.get("PYTHONPATH", "")]))
        torchrun(["dpo", str(recipe)], nproc=nproc, env=env)
        lines = [x for f in tmp_path.glob(f"syncs{steps}.*") for x in f.read_text().splitlines()]
        counts[steps] = (lines.count("sync"), Counter(x for x in lines if x.startswith("read ")))
    assert counts[6][0] == counts[2][0], counts
    # host reads of a tensor's value from inside DeepSpeed: as many in 6 steps as in 2 (start-up, checkpoint), none
    # per step (ZeRO-3's own NaN check, a bool() of the norm, is left to allo's optimizer on the device); the
    # difference names the file and line that reads
    assert counts[6][1] == counts[2][1], counts[6][1] - counts[2][1]
