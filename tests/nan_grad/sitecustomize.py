"""Imported at start-up by every Python process of a test that puts this folder on PYTHONPATH with
ALLO_TEST_NAN_STEPS set (comma-separated optimizer steps, from 1): at those steps one selected element's gradient
becomes NaN, as a bad batch would leave it (tests/test_guards.py). Where: ALLO_TEST_NAN_AT=optimizer (default) in
MaskedAdamW's gradients, after the engine took the norm (the one-rank engine, where the optimizer clips); =gradients
in rank 0's ZeRO-3 gradient partition right after the gradient masker, before DeepSpeed takes the global norm."""
import os

if os.environ.get("ALLO_TEST_NAN_STEPS"):
    def _inject() -> None:
        steps, calls = {int(s) for s in os.environ["ALLO_TEST_NAN_STEPS"].split(",")}, [0]
        if os.environ.get("ALLO_TEST_NAN_AT", "optimizer") == "gradients":
            from allo.masks.apply import GradMasker

            before_step = GradMasker.before_step

            def masked_then_poisoned(self):
                before_step(self)
                if not self.engine.is_gradient_accumulation_boundary():
                    return
                calls[0] += 1
                if calls[0] in steps and os.environ.get("RANK", "0") == "0":
                    z = next(z for z in self.zero3 if z.keep.any())
                    buffer = self.engine.optimizer.grad_partitions_flat_buffer
                    buffer[z.start + int(z.keep.nonzero()[0])] = float("nan")

            GradMasker.before_step = masked_then_poisoned
            return
        from allo.optim import MaskedAdamW

        original = MaskedAdamW.step

        def step(self, closure=None):
            if self._masks:  # a real step of a masked stage (not DeepSpeed's state-creating one)
                calls[0] += 1
                if calls[0] in steps:
                    for group in self.param_groups:
                        for p in group["params"]:
                            keep = self._masks.get(id(p))
                            if keep is not None and keep.any() and p.grad is not None:
                                p.grad.view(-1)[int(keep.nonzero()[0])] = float("nan")
                                return original(self, closure)
            return original(self, closure)

        MaskedAdamW.step = step

    _inject()
