"""System tools the end-to-end tests need: under CI a missing one is a failure, elsewhere a skip."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(command: str, package: str) -> str:
    path = shutil.which(command)
    if path:
        return path
    why = f"{command} is not installed (Debian package {package}; `make test-deps` installs it)"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)
