"""`make chromium` installs only what is missing, never upgrades installed packages unasked, and QROAR_SKIP_BROWSER=1
skips it and the browser tests. The recipe runs for real against a stand-in apt-get that logs its calls."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="no make on this machine")

NEW = "Inst chromium (1.0 Debian:12/stable [amd64])\nInst chromium-common (1.0 Debian:12/stable [amd64])\n"
UPGRADE = "Inst libfoo1 [0.9] (1.0 Debian:12/stable [amd64])\n"
APT = """#!/bin/sh
echo "apt-get $*" >> "{log}"
case "$*" in *" -s"*) printf '%s' "$QROAR_TEST_PLAN";; esac
"""


def run_chromium(tmp_path, plan="", **variables):
    """`make chromium` as root on a PATH with apt-get (a stand-in) and no chromium; (output, apt-get calls)."""
    bin_, log = tmp_path / "bin", tmp_path / "apt.log"
    bin_.mkdir(exist_ok=True)
    log.write_text("")
    (bin_ / "apt-get").write_text(APT.format(log=log))
    (bin_ / "id").write_text("#!/bin/sh\necho 0\n")
    for tool in ("apt-get", "id"):
        (bin_ / tool).chmod(0o755)
    for tool in ("awk", "wc"):
        if not (bin_ / tool).exists():
            (bin_ / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_), "QROAR_TEST_PLAN": plan, "HOME": str(tmp_path)}
    r = subprocess.run([MAKE, "-s", "chromium", *(f"{k}={v}" for k, v in variables.items())], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout, log.read_text().splitlines()


def test_chromium_recipe_installs_only_missing_packages_without_upgrades():
    recipe = subprocess.run([MAKE, "-n", "chromium"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "apt-get install" in recipe and "--no-upgrade" in recipe and "--no-install-recommends" in recipe


def test_chromium_installs_the_missing_packages_and_says_which(tmp_path):
    out, calls = run_chromium(tmp_path, NEW)
    assert "2 Debian packages" in out and "chromium chromium-common" in out
    assert calls[-1].startswith("apt-get install") and "--no-upgrade" in calls[-1] and "--no-install-recommends" in calls[-1]
    assert " -s" not in calls[-1] and " -y" in calls[-1]


def test_chromium_is_not_installed_when_it_would_upgrade_installed_packages(tmp_path):
    out, calls = run_chromium(tmp_path, NEW + UPGRADE)
    assert "libfoo1" in out and "QROAR_ALLOW_UPGRADES=1" in out and "QROAR_SKIP_BROWSER=1" in out
    assert not [c for c in calls if c.startswith("apt-get install") and " -s" not in c]  # simulated only
    out, calls = run_chromium(tmp_path, NEW + UPGRADE, QROAR_ALLOW_UPGRADES=1)
    assert "upgrading" in out and "libfoo1" in out and " -y" in calls[-1]


@pytest.mark.parametrize("how", ["variable", "environment"])
def test_skip_variable_skips_the_apt_step(tmp_path, how):
    dry = subprocess.run([MAKE, "-n", "chromium"] + (["QROAR_SKIP_BROWSER=1"] if how == "variable" else []), cwd=ROOT,
                         env={**os.environ, **({"QROAR_SKIP_BROWSER": "1"} if how == "environment" else {})},
                         capture_output=True, text=True, check=True).stdout
    assert "apt-get" not in dry and "browser tests are skipped" in dry
    out, calls = run_chromium(tmp_path, NEW, QROAR_SKIP_BROWSER=1)
    assert calls == [] and "skipped" in out


def test_skip_variable_marks_the_browser_tests_skipped_with_a_reason():
    env = {**os.environ, "QROAR_SKIP_BROWSER": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_browser.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "QROAR_SKIP_BROWSER is set" in r.stdout and " passed" not in r.stdout and "skipped" in r.stdout
