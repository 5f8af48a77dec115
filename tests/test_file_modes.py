"""Files allo writes honour the umask: teammates and eval jobs under other accounts read the run's models."""
from __future__ import annotations

import os
import stat

import pytest

from allo.io import atomic_write_text, write_jsonl


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_atomic_writes_honour_the_umask(tmp_path, umask):
    atomic_write_text(tmp_path / "a.txt", "x")
    write_jsonl(tmp_path / "b.jsonl", [{"a": 1}])
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "b.jsonl").stat().st_mode) == 0o666 & ~umask


def test_an_exported_model_honours_the_umask(tmp_path, umask, tiny_model):
    """save_pretrained's safetensors file is created 0600 by the safetensors library; the export fixes it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from allo.model import save_pretrained

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    save_pretrained(model, model.state_dict(), AutoTokenizer.from_pretrained(str(tiny_model)), tmp_path / "m")
    got = modes(tmp_path / "m")
    assert "model.safetensors" in got
    assert got == {k: (0o777 if (tmp_path / "m" / k).is_dir() else 0o666) & ~umask for k in got}, got
