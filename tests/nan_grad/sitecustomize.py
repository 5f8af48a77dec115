"""Imported at start-up by every Python process of a test that puts this folder on PYTHONPATH with
ALLO_TEST_NAN_STEPS set (comma-separated optimizer steps, from 1): at those steps MaskedAdamW finds a NaN in the
gradient of one selected element, as a bad batch would leave it (tests/test_guards.py)."""
import os

if os.environ.get("ALLO_TEST_NAN_STEPS"):
    def _inject() -> None:
        from allo.optim import MaskedAdamW

        steps, original, calls = {int(s) for s in os.environ["ALLO_TEST_NAN_STEPS"].split(",")}, MaskedAdamW.step, [0]

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
