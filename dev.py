#!/usr/bin/env python3
"""The two commands of a fresh machine (Python 3.11+ and the package registries, nothing else).

    python3 dev.py run                 # install, then `alerting-app up`: the whole platform locally
    python3 dev.py test [pytest args]  # install, then the whole test suite (in 4 processes)

Both create `.venv` when it is missing and (re)install the project into it whenever pyproject.toml
changed since the last install, one at a time (the second of two started at once waits, under the
lock file .venv.lock). Standard library only: this runs before anything is installed.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
# Records what the virtualenv was installed from; a different pyproject.toml means reinstall.
STAMP = VENV / ".installed-from"
# Held while .venv is checked, created or installed into (`install_lock`); beside it, not in it,
# as it must exist before .venv does.
LOCK = ROOT / ".venv.lock"
# `dev.py test` with no arguments runs the suite in this many pytest-xdist processes, a test file
# each at a time. Most of a test's time is spent waiting (a worker process starting, a consumer
# group joining, a timeout running out): run one after another, the suite kept two cores about a
# quarter busy. Each process starts services of its own (tests/conftest.py).
TEST_PROCESSES = 4


def _install_fingerprint() -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()


@contextlib.contextmanager
def install_lock(path: Path | None = None):
    """One dev.py at a time in here: two started at once in a fresh checkout (`run` in one shell,
    `test` in another) each created .venv and ran pip into it at the same time. The second now
    waits, then finds the first one's install done."""
    with open(path or LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another dev.py installing into {VENV}…", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # released when the file closes


def ensure_installed() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"alerting-app needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    with install_lock():
        _install()


def _install() -> None:
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        try:
            venv.create(VENV, with_pip=True)
        except subprocess.CalledProcessError:
            shutil.rmtree(VENV)  # half made: the next attempt must start over
            sys.exit("could not create the virtualenv with pip (Debian/Ubuntu: apt install python3-venv)")
    fingerprint = _install_fingerprint()
    if STAMP.exists() and STAMP.read_text() == fingerprint:
        return
    print("installing alerting-app and its test dependencies into .venv", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet"]
    if subprocess.run([*pip, "-e", ".[test,embedded]"], cwd=ROOT).returncode != 0:
        sys.exit(f"pip install failed (see above); nothing was run. If .venv itself is broken (an "
                 f"interrupted set-up), delete {VENV} and run this again.")
    STAMP.write_text(fingerprint)


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("run", "test"):
        sys.exit(__doc__)
    ensure_installed()
    os.chdir(ROOT)
    if argv[0] == "run":
        os.execv(BIN / "alerting-app", ["alerting-app", "up"])
    pytest_args = argv[1:] or ["-n", str(TEST_PROCESSES), "--dist", "loadfile"]
    os.execv(BIN / "python", [str(BIN / "python"), "-m", "pytest", *pytest_args])


if __name__ == "__main__":
    main(sys.argv[1:])
