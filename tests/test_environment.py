"""The pinned environment: requirements.txt, environment.yml and pyproject.toml agree, and the
pinned trio is what is installed."""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib

import yaml

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)$")


def _pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = PIN.match(line)
        assert m, f"not an exact pin: {line!r}"
        out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def requirements(repo_root) -> dict[str, str]:
    return _pins((repo_root / "requirements.txt").read_text().splitlines())


def test_environment_yml_mirrors_requirements(repo_root):
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert _pins(pip) == requirements(repo_root)


def test_pyproject_pins_are_the_requirements(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        listed += extra
    assert _pins(listed) == requirements(repo_root)
    assert project["requires-python"].startswith(">=3.11")


def test_torch_trio_is_pinned_and_installed(repo_root):
    reqs = requirements(repo_root)
    trio = {"torch": "2.14.1", "torchvision": "0.29.1", "timm": "1.0.31"}
    assert {k: reqs[k] for k in trio} == trio
    for name, version in trio.items():
        assert md.version(name).split("+")[0] == version
    assert reqs["jupyter-book"].startswith("1.")  # 2.x cannot build offline


def test_ci_runs_the_readme_test_command(repo_root):
    assert "make test" in (repo_root / ".ci" / "run").read_text()
    readme = (repo_root / "README.md").read_text()
    assert "make test" in readme and "make book" in readme
