"""Skip, or fail under CI: for tests that need something of the machine (a system tool,
root, a Debian mirror, a container that boots).

On a developer's machine such a test skips and says why. With CI=true in the environment
it fails with the same reason instead: the .deb and container tests are the only
end-to-end proof of the service, so a green CI run must mean they ran."""

from __future__ import annotations

import os
import shutil
from typing import Mapping, NoReturn

import pytest


def in_ci(env: Mapping[str, str] | None = None) -> bool:
    """CI=true (GitHub Actions, GitLab CI and most others set it; 1 and yes count too)."""
    env = os.environ if env is None else env
    return env.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(reason: str, env: Mapping[str, str] | None = None) -> NoReturn:
    if in_ci(env):
        pytest.fail(f"{reason} (CI=true: a test that cannot run fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def require_tools(*tools: str, hint: str = "`make test-deps` installs them") -> None:
    """Skips (fails under CI) unless every command in `tools` is on PATH."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        skip_or_fail(f"{', '.join(missing)} not installed ({hint})")
