"""Imported at start-up by every Python process of a test that puts this folder on PYTHONPATH with
ALLO_TEST_SYNC_COUNT set. Appends a line to that file plus the process id for
- each call of DeepSpeed's accelerator.synchronize ("sync");
- each read of a tensor's value on the host from inside DeepSpeed's code (`.item()`, `.tolist()`, `.cpu()`,
  `float(t)`, `int(t)`, `bool(t)`: "read FILE:LINE"), which on a GPU waits for the device. allo's own loop is
  checked on the meta device (tests/test_host_syncs.py); these are the engine's.
tests/test_host_syncs.py counts them through the real engine."""
import os
import sys

if os.environ.get("ALLO_TEST_SYNC_COUNT"):
    def _count() -> None:
        import torch
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        path = f"{os.environ['ALLO_TEST_SYNC_COUNT']}.{os.getpid()}"
        original = CPU_Accelerator.synchronize

        def synchronize(self, device_index=None):
            with open(path, "a") as f:
                f.write("sync\n")
            return original(self, device_index)

        CPU_Accelerator.synchronize = synchronize

        def caller_in_deepspeed():
            """FILE:LINE (within DeepSpeed) of the code that asked, when it is DeepSpeed's: the first frame outside
            torch's own Python code decides (a read inside the model's forward is the model's, not the engine's)."""
            frame = sys._getframe(2)
            while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
                frame = frame.f_back
            name = frame.f_code.co_filename if frame is not None else ""
            if f"{os.sep}deepspeed{os.sep}" not in name:
                return None
            return f"{name.split(os.sep + 'deepspeed' + os.sep)[-1]}:{frame.f_lineno}"

        def counted(method):
            def read(self, *args, **kwargs):
                where = caller_in_deepspeed()
                if where is not None:
                    with open(path, "a") as f:
                        f.write(f"read {where}\n")
                return method(self, *args, **kwargs)
            return read

        for name in ("item", "tolist", "cpu", "__float__", "__int__", "__bool__"):
            setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))

    _count()
