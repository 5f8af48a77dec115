"""The declared dependencies (pyproject.toml) and the pinned CPU set (requirements.txt) agree: every runtime and test
requirement is satisfied by the environment `make test` installs, and the `gpu` extra pins the versions whose
resolution the README records."""
from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement

from conftest import ROOT


def test_installed_environment_satisfies_the_declared_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    problems = []
    for text in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(text)
        try:
            have = version(req.name)
        except PackageNotFoundError:
            problems.append(f"{req.name}: not installed")
            continue
        if not req.specifier.contains(have.split("+")[0], prereleases=True):
            problems.append(f"{req}: installed {have}")
    assert not problems, problems
    gpu = {Requirement(t).name: str(Requirement(t).specifier) for t in project["optional-dependencies"]["gpu"]}
    assert gpu == {"torch": "==2.14.0", "vllm": "==0.33.0"}
    readme = (ROOT / "README.md").read_text()
    assert "make install-gpu" in readme and "vllm 0.33.0" in readme.lower()
