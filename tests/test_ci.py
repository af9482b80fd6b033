""".ci/install_chromium, which .ci/run calls before `make test` so that the report's screenshot
test runs on CI: it installs Debian's chromium when absent (as root), does nothing when present,
and never fails CI (no root, no apt-get, no mirror: one line, exit 0). apt-get, id and timeout
are stubs here; nothing is installed."""

import os
import subprocess

import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, ".ci", "install_chromium")

STUBS = {
    "id": 'echo "${FAKE_UID:-0}"',
    "timeout": 'shift; exec "$@"',
    # records its arguments; "install" puts a chromium on PATH unless told to fail
    "apt-get": ('echo "$*" >> "$APT_LOG"\n'
                '[ -n "$APT_FAILS" ] && exit 100\n'
                'case "$*" in *install*chromium*) printf "#!/bin/sh\\n" > "$STUB_DIR/chromium";'
                ' chmod +x "$STUB_DIR/chromium";; esac\nexit 0'),
}


def run_script(tmp_path, *, uid="0", apt_fails=False, chromium=False, apt=True):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in STUBS.items():
        if name == "apt-get" and not apt:
            continue
        (stubs / name).write_text("#!/bin/bash\n" + body + "\n")
        (stubs / name).chmod(0o755)
    if chromium:
        (stubs / "chromium").write_text("#!/bin/sh\n")
        (stubs / "chromium").chmod(0o755)
    log = tmp_path / "apt.log"
    env = {"PATH": str(stubs), "FAKE_UID": uid, "APT_LOG": str(log), "STUB_DIR": str(stubs),
           "APT_FAILS": "1" if apt_fails else ""}
    result = subprocess.run(["/bin/bash", SCRIPT], env=env, capture_output=True, text=True,
                            timeout=30)
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls, (stubs / "chromium").exists()


def test_ci_run_installs_chromium_before_the_tests():
    with open(os.path.join(REPO, ".ci", "run")) as f:
        lines = [line.strip() for line in f]
    assert lines.index(".ci/install_chromium") < lines.index("make test")


def test_absent_chromium_is_installed_from_the_distribution(tmp_path):
    result, calls, installed = run_script(tmp_path)
    assert result.returncode == 0
    assert [c.split()[-1] for c in calls] == ["update", "chromium"]
    assert "install -y --no-install-recommends chromium" in calls[1]
    assert installed and "installed chromium" in result.stderr


def test_present_chromium_is_left_alone(tmp_path):
    result, calls, _ = run_script(tmp_path, chromium=True)
    assert (result.returncode, calls, result.stderr) == (0, [], "")


@pytest.mark.parametrize("case", ["apt_fails", "not_root", "no_apt"])
def test_no_way_to_install_is_one_line_and_no_failure(tmp_path, case):
    result, calls, installed = run_script(tmp_path, apt_fails=case == "apt_fails",
                                          uid="1000" if case == "not_root" else "0",
                                          apt=case != "no_apt")
    assert result.returncode == 0 and not installed
    assert len(result.stderr.splitlines()) == 1 and "screenshot test will skip" in result.stderr
    assert calls == (["-qq -o Acquire::Retries=1 -o Acquire::http::Timeout=20 -o "
                      "Acquire::https::Timeout=20 update"] if case == "apt_fails" else [])
