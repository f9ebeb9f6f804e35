"""The locks: every declared dependency is locked at a version its range allows, and the environments
that the setup scripts build are exactly what the locks say (scripts/lock.sh refreshes the locks)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCKS = REPO_ROOT / "locks"
REFRESH = "run scripts/lock.sh and commit locks/ (docs/development.md, 'Dependencies and locks')"
LOCK_APPLIES = sys.platform == "linux" and platform.machine() == "x86_64" and sys.version_info[:2] == (3, 11)


def locked_versions(lock: Path) -> dict[str, str]:
    """Package name (canonical) -> version, from a `name==version \\` line of a hashed lock."""
    versions = {}
    for line in lock.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            versions[canonicalize_name(name)] = version.split()[0].rstrip("\\").strip()
    return versions


def declared(lines: list[str]) -> list[Requirement]:
    return [Requirement(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return declared(project["dependencies"] + project["optional-dependencies"]["test"])


def unmet(requirements: list[Requirement], versions: dict[str, str]) -> list[str]:
    """What a lock lacks or locks outside the declared range, one line each."""
    problems = []
    for requirement in requirements:
        version = versions.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement.name} is not locked")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name} is locked at {version}, outside {requirement.specifier}")
    return problems


def mismatches(installed: dict[str, str], versions: dict[str, str]) -> list[str]:
    return [f"{name} is {installed.get(name, 'not installed')}, the lock says {version}"
            for name, version in sorted(versions.items()) if installed.get(name) != version]


def test_every_dependency_of_pyproject_is_locked_in_its_range() -> None:
    problems = unmet(pyproject_requirements(), locked_versions(LOCKS / "backend.txt"))
    assert not problems, f"locks/backend.txt does not match pyproject.toml ({'; '.join(problems)}): {REFRESH}"


def test_label_studio_lock_holds_its_inputs_and_the_torch_pair_holds() -> None:
    inputs = declared((LOCKS / "labelstudio.in").read_text().splitlines())
    problems = unmet(inputs, locked_versions(LOCKS / "labelstudio.txt"))
    assert not problems, f"locks/labelstudio.txt does not match locks/labelstudio.in ({'; '.join(problems)}): {REFRESH}"
    pairs = declared((LOCKS / "constraints.txt").read_text().splitlines())
    problems = unmet(pairs, locked_versions(LOCKS / "backend.txt"))
    assert not problems, f"locks/backend.txt breaks locks/constraints.txt ({'; '.join(problems)}): {REFRESH}"


def test_the_check_names_a_package_added_to_pyproject_without_a_new_lock() -> None:
    added = pyproject_requirements() + [Requirement("rich>=13")]
    versions = locked_versions(LOCKS / "backend.txt")
    versions.pop("rich", None)
    assert unmet(added, versions) == ["rich is not locked"]
    versions["rich"] = "12.0.0"
    assert unmet(added, versions) == ["rich is locked at 12.0.0, outside >=13"]


@pytest.mark.skipif(not LOCK_APPLIES, reason="the locks are for CPython 3.11 on Linux x86_64")
def test_this_environment_is_exactly_the_backend_lock() -> None:
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    problems = mismatches(installed, locked_versions(LOCKS / "backend.txt"))
    assert not problems, f"{sys.prefix} differs from locks/backend.txt: {'; '.join(problems)}; run scripts/setup.sh"


@pytest.mark.skipif(not LOCK_APPLIES, reason="the locks are for CPython 3.11 on Linux x86_64")
def test_label_studio_environment_is_exactly_its_lock() -> None:
    python = REPO_ROOT / ".venv-labelstudio" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-labelstudio: scripts/setup-labelstudio.sh installs it")
    listing = subprocess.run(
        [str(python), "-c", "import json, importlib.metadata as m;"
         "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"],
        check=True, capture_output=True, text=True, timeout=60).stdout
    installed = {canonicalize_name(name): version for name, version in json.loads(listing).items()}
    problems = mismatches(installed, locked_versions(LOCKS / "labelstudio.txt"))
    assert not problems, f".venv-labelstudio differs from locks/labelstudio.txt: {'; '.join(problems)}; " \
                         "run scripts/setup-labelstudio.sh"
