"""Fixtures for the end-to-end tests: a real Label Studio server for the whole session.

The tests need what ``scripts/setup-labelstudio.sh`` installs (``.venv-labelstudio``, ``/usr/bin/chromium``)
and Python's ``playwright`` in the project's environment. Where a piece is missing they are skipped with
the reason, except when the environment variable ``CI`` is set (to anything but ``""``, ``0``, ``false``,
``no``): there a missing piece is an error, so that CI cannot pass by skipping them.
Run them alone with ``pytest -m e2e``, or leave them out with ``pytest -m "not e2e"``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest
from labelstudio import CHROMIUM, LABEL_STUDIO_BIN, LabelStudioServer, free_port, start_label_studio


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "e2e: end-to-end test with a real Label Studio server and headless Chromium "
        "(needs scripts/setup-labelstudio.sh; slow)",
    )


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_pieces() -> list[str]:
    """What the end-to-end tests need and this machine lacks, in words."""
    missing = []
    if not LABEL_STUDIO_BIN.exists():
        missing.append(f"Label Studio ({LABEL_STUDIO_BIN})")
    if not CHROMIUM.exists():
        missing.append(f"Chromium ({CHROMIUM})")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the Python package playwright")
    return missing


def require_e2e_tools() -> None:
    """Skips the calling test (fails it under CI) when something the end-to-end tests need is missing."""
    missing = missing_pieces()
    if not missing:
        return
    reason = f"end-to-end tools missing: {', '.join(missing)}; run scripts/setup-labelstudio.sh"
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A Label Studio 1.23.2 server on a free loopback port, its data in a fresh temporary folder, with an
    admin user, the legacy API token enabled and local ML backends allowed. Stopped at the end."""
    require_e2e_tools()
    server = start_label_studio(tmp_path_factory.mktemp("label-studio"), free_port())
    try:
        yield server
    finally:
        server.stop()
