"""Imported at start-up by every Python process of a test that puts this folder on PYTHONPATH with
ALLO_TEST_SYNC_COUNT set: each call of DeepSpeed's accelerator.synchronize appends a line to that file plus the
process id (tests/test_host_syncs.py counts them through the real engine)."""
import os

if os.environ.get("ALLO_TEST_SYNC_COUNT"):
    def _count() -> None:
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        original, path = CPU_Accelerator.synchronize, f"{os.environ['ALLO_TEST_SYNC_COUNT']}.{os.getpid()}"

        def synchronize(self, device_index=None):
            with open(path, "a") as f:
                f.write("sync\n")
            return original(self, device_index)

        CPU_Accelerator.synchronize = synchronize

    _count()
