"""Checks that requirements.lock pins every dependency pyproject.toml declares (the package's own
and those of each extra), at a version the declaration allows. Prints what is missing or out of
range, one line each, and exits 1; nothing and 0 when the lock fits. scripts/bootstrap.sh runs
it after installing from the lock, and tests/unit/test_packaging.py runs it too.

`--runtime` prints the package's own dependencies instead, a requirement a line (what a wheel
built from this tree pulls with no extra): bootstrap downloads their wheels for the wheel test.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def declared(pyproject: dict[str, object]) -> list[Requirement]:
    """Every requirement of the project and of its extras, without the project itself (an extra
    such as `dev` may pull another one of ours: `session-manager[sdk]`)."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    own = canonicalize_name(project["name"])
    lists = [project.get("dependencies", []), *project.get("optional-dependencies", {}).values()]
    requirements = [Requirement(line) for entries in lists for line in entries]
    return [r for r in requirements if canonicalize_name(r.name) != own]


def pinned(lock_text: str) -> dict[str, list[str]]:
    """Name -> the versions the lock pins it at (a universal lock may pin two, under markers)."""
    pins: dict[str, list[str]] = {}
    for line in lock_text.splitlines():
        if not line or line[0] in " #-":  # comments, "# via" lines, options
            continue
        requirement = Requirement(line)
        match = re.fullmatch(r"==\s*(\S+)", str(requirement.specifier))
        if match is None:
            raise ValueError(f"not a pin: {line!r}")
        pins.setdefault(canonicalize_name(requirement.name), []).append(match.group(1))
    return pins


def problems(pyproject_path: Path, lock_path: Path) -> list[str]:
    pyproject = tomllib.loads(pyproject_path.read_text(encoding="utf-8"))
    pins = pinned(lock_path.read_text(encoding="utf-8"))
    found = []
    for requirement in declared(pyproject):
        versions = pins.get(canonicalize_name(requirement.name))
        if not versions:
            found.append(f"{requirement.name}: declared ({requirement}) but not in the lock")
            continue
        for version in versions:
            if not requirement.specifier.contains(version, prereleases=True):
                found.append(f"{requirement.name}: the lock pins {version}, declared {requirement}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    parser.add_argument("--runtime", action="store_true", help="print the runtime requirements")
    args = parser.parse_args(argv)
    if args.runtime:
        project = tomllib.loads(args.pyproject.read_text(encoding="utf-8"))["project"]
        print("\n".join(project["dependencies"]))
        return 0
    found = problems(args.pyproject, args.lock)
    for line in found:
        print(f"check_lock: {line}", file=sys.stderr)
    if found:
        print(f"check_lock: {args.lock.name} is stale: run bash scripts/lock.sh", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
