"""Static checks of constraints.txt, the lock every install and CI run is built from.

.ci/run fails when a fresh venv differs from the lock; these checks say why sooner,
and on any machine: each requirement of pyproject.toml is pinned there, at a version
pyproject.toml accepts.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "constraints.txt"
PYPROJECT = ROOT / "pyproject.toml"


def locked_versions(text: str) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt: {raw!r} is not an exact NAME==VERSION pin"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    groups = [project["dependencies"], *project["optional-dependencies"].values()]
    own = canonicalize_name(project["name"])
    # The extras refer to each other through the project's own name; that is no package to pin.
    return [
        req
        for group in groups
        for req in map(Requirement, group)
        if canonicalize_name(req.name) != own
    ]


def test_lock_holds_exact_pins_only() -> None:
    pins = locked_versions(LOCK.read_text())
    assert pins, "constraints.txt pins nothing"
    assert "likeness" not in pins, "the project itself is installed editable, never pinned"


def test_every_requirement_is_locked_at_a_version_pyproject_accepts() -> None:
    pins = locked_versions(LOCK.read_text())
    unlocked, refused = [], []
    for req in project_requirements():
        version = pins.get(canonicalize_name(req.name))
        if version is None:
            unlocked.append(req.name)
        elif not req.specifier.contains(version, prereleases=True):
            refused.append(f"{req.name} {version} (pyproject: {req.specifier})")
    assert not unlocked, f"not in constraints.txt (run .ci/lock): {unlocked}"
    assert not refused, f"locked versions pyproject.toml refuses (run .ci/lock): {refused}"


def test_pins_are_read_exactly() -> None:
    pins = locked_versions("# header\nTorch==2.14.1\nfacenet_pytorch==2.5.3  # why\n\n")
    assert pins == {"torch": Version("2.14.1"), "facenet-pytorch": Version("2.5.3")}
