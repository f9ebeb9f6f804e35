"""scripts/gpu-kit.sh: the wheels the lent GPU machine lacks, for its Python, small enough to travel in one call."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 56 * 1024 * 1024
# What that machine has (torch, transformers and CUDA's packages are big and pinned to its driver) or what the
# kit leaves out on purpose (spaCy: the bench there runs with FREESEG_NOUNS=words).
NEVER_CARRIED = re.compile(r"^(torch|torchvision|transformers|nvidia_|triton|numpy|spacy|en_core_web)", re.IGNORECASE)


def for_that_machine(wheel: str) -> bool:
    """Whether CPython 3.12 on linux x86_64 installs ``wheel`` (its python, ABI and platform tags)."""
    python, abi, platform = wheel.removesuffix(".whl").split("-")[-3:]
    pure = "py3" in python.split(".") and abi == "none" and platform == "any"
    built = (python, abi) == ("cp312", "cp312") or (abi == "abi3" and python.startswith("cp3"))
    return pure or (built and "manylinux" in platform and platform.endswith("x86_64"))


@pytest.mark.slow
def test_the_kit_holds_what_the_bench_needs_for_cpython_312_and_stays_under_the_limit(tmp_path):
    kit = tmp_path / "kit"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-kit.sh"), str(kit)], capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(path.name for path in kit.iterdir())
    assert sum(path.stat().st_size for path in kit.iterdir()) <= LIMIT_BYTES
    assert not [name for name in names if NEVER_CARRIED.match(name)]
    wheels = [name for name in names if name.endswith(".whl")]
    assert [name for name in names if not name.endswith(".whl")] == [next(n for n in names if n.startswith(
        "pydensecrf2-"))]  # the one source: its build needs that machine's Cython
    assert [name for name in wheels if not for_that_machine(name)] == []
    for needed in ("diffusers", "open_clip_torch", "pydantic_settings", "redis", "label_studio_sdk", "smart_open"):
        assert any(name.startswith(f"{needed}-") for name in wheels), needed
