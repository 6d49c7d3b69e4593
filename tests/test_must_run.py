"""The skip-or-fail helper the system tests use: under CI=true nothing they need may be
quietly missing."""

from __future__ import annotations

import pytest

from must_run import in_ci, require_tools, skip_or_fail

FAILED, SKIPPED = pytest.fail.Exception, pytest.skip.Exception


def outcome(call, *args, **kwargs) -> tuple[type, str]:
    """How `call` ended: (FAILED or SKIPPED, its message). A skip must not escape here, or
    a test expecting a failure would end up skipped rather than failed."""
    try:
        call(*args, **kwargs)
    except (FAILED, SKIPPED) as exc:
        return type(exc), str(exc)
    return type(None), ""


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_under_ci_a_missing_requirement_fails_with_its_reason(value):
    kind, message = outcome(skip_or_fail, "debootstrap could not fetch", env={"CI": value})
    assert kind is FAILED and "debootstrap could not fetch" in message


@pytest.mark.parametrize("env", [{}, {"CI": ""}, {"CI": "false"}, {"CI": "0"}])
def test_outside_ci_it_skips_and_says_why(env):
    kind, message = outcome(skip_or_fail, "no nspawn here", env=env)
    assert kind is SKIPPED and "no nspawn here" in message
    assert not in_ci(env)


def test_require_tools_reads_ci_from_the_environment(monkeypatch):
    monkeypatch.setenv("CI", "true")
    kind, message = outcome(require_tools, "sh", "llamad-no-such-tool")
    assert kind is FAILED and "llamad-no-such-tool not installed" in message and "sh," not in message
    assert outcome(require_tools, "sh")[0] is type(None)  # present: nothing happens
    monkeypatch.delenv("CI")
    kind, message = outcome(require_tools, "llamad-no-such-tool")
    assert kind is SKIPPED and "llamad-no-such-tool not installed" in message


@pytest.mark.parametrize("ci", [True, False])
def test_a_debootstrap_that_cannot_fetch_fails_the_container_test_under_ci(tmp_path, monkeypatch, ci):
    """The .deb test's own wiring: a debootstrap that cannot reach a mirror is a failure
    under CI (a skip elsewhere), with debootstrap's message."""
    import test_deb_package

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "debootstrap"
    fake.write_text("#!/bin/sh\necho 'E: Failed getting release file http://deb.debian.org/...' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setattr(test_deb_package, "CHROOT_CACHE", tmp_path / "chroot")
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    kind, message = outcome(test_deb_package._base_chroot)
    assert kind is (FAILED if ci else SKIPPED)
    assert "debootstrap failed" in message and "Failed getting release file" in message
