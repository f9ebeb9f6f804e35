"""The house keeps its floors: the README's map gives each package and loose module of ``backend/`` a
floor, and a module imports only from its own floor or the floors below it.

The map is the one place the floors are written; these tests read them from it, so a newcomer who
moves a module changes the map and sees at once which import now runs the wrong way.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

from tests.test_readme import README, REPO_ROOT, code_blocks

BACKEND = REPO_ROOT / "backend"
MAX_LOOSE_MODULES = 6
MAX_FUNCTION_LINES = 80


def floors_from_map() -> dict[str, int]:
    """``{"pipeline": 1, "cli": 8, ...}``: each room of the README's map and the floor it names."""
    map_block = next(block for block in code_blocks(README.read_text()) if block.startswith("backend/"))
    floors = {}
    for line in map_block.splitlines():
        found = re.match(r"^  ([\w]+)(?:/|\.py)\s+floor (\d+):", line)
        if found:
            floors[found.group(1)] = int(found.group(2))
    return floors


def room_of(module: str) -> str:
    """``backend.storage.feature_cache`` -> ``storage``; ``backend.cli`` -> ``cli``."""
    return module.split(".")[1]


def backend_modules() -> dict[str, Path]:
    modules = {}
    for path in BACKEND.rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "backend":
            modules[name] = path
    return modules


def imported_modules(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The backend modules ``module`` imports, at any depth of its code (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known and target != module)
    return found


def import_arrows() -> list[tuple[str, str]]:
    known = backend_modules()
    return [(module, target) for module, path in known.items() for target in imported_modules(module, path, known)]


def test_every_room_has_a_floor_in_the_map():
    floors = floors_from_map()
    rooms = {room_of(module) for module in backend_modules()}
    assert not rooms - floors.keys(), f"README.md's map gives no floor to {sorted(rooms - floors.keys())}"


def test_no_module_imports_from_a_floor_above_its_own():
    floors = floors_from_map()
    upward = sorted(f"{module} (floor {floors[room_of(module)]}) imports {target} (floor {floors[room_of(target)]})"
                    for module, target in import_arrows()
                    if floors[room_of(target)] > floors[room_of(module)])
    assert not upward, "imports that run up the floors:\n" + "\n".join(upward)


def test_no_two_rooms_import_each_other():
    arrows = {(room_of(module), room_of(target)) for module, target in import_arrows()
              if room_of(module) != room_of(target)}
    mutual = sorted(f"{a} <-> {b}" for a, b in arrows if (b, a) in arrows and a < b)
    assert not mutual, f"rooms that import each other: {mutual}"


@pytest.mark.parametrize("room, forbidden", [("pipeline", ("models", "settings", "storage", "net", "labelstudio",
                                                           "server", "jobs")),
                                             ("settings", ("pipeline",))])
def test_the_ground_floors_import_nothing_above_them(room, forbidden):
    arrows = sorted(f"{module} imports {target}" for module, target in import_arrows()
                    if room_of(module) == room and room_of(target) in forbidden)
    assert not arrows, "\n".join(arrows)


def test_the_root_holds_at_most_six_loose_modules():
    loose = sorted(path.name for path in BACKEND.glob("*.py") if path.name != "__init__.py")
    assert len(loose) <= MAX_LOOSE_MODULES, f"{len(loose)} loose modules in backend/: {loose}"


def test_no_function_is_longer_than_80_lines():
    long_ones = defaultdict(int)
    for path in BACKEND.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_ones[f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name}"] = lines
    assert not long_ones, f"functions over {MAX_FUNCTION_LINES} lines: {dict(long_ones)}"


def test_no_file_name_appears_twice():
    names = defaultdict(list)
    for path in BACKEND.rglob("*.py"):
        if path.name != "__init__.py":
            names[path.name].append(str(path.relative_to(BACKEND)))
    twice = {name: paths for name, paths in names.items() if len(paths) > 1}
    assert not twice, f"file names used twice in backend/: {twice}"
