"""dev.py's install lock: two `python3 dev.py run`/`test` started at once in a fresh checkout each
created .venv and ran pip into it at the same time; the second now waits for the first.

dev.py is run as a fresh machine runs it, by a separate interpreter: the lock is between processes.
"""
from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

import dev
from pipe_lines import read_lines_until

ROOT = Path(dev.__file__).parent

# Takes the lock on argv[1] as ensure_installed does, then prints what the holder wrote to argv[2]
# just before it let go: empty had it not waited.
_SECOND = """
import sys
from pathlib import Path
import dev
with dev.install_lock(Path(sys.argv[1])):
    print("holding, the first one wrote:", Path(sys.argv[2]).read_text(), flush=True)
"""


def test_a_second_dev_py_waits_for_the_first_ones_install(tmp_path):
    lock, note = tmp_path / ".venv.lock", tmp_path / "note"
    note.write_text("")
    with dev.install_lock(lock):
        second = subprocess.Popen([sys.executable, "-c", _SECOND, str(lock), str(note)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            read_lines_until(second.stdout, lambda line: line.startswith("waiting for another dev.py"),
                             '"waiting for another dev.py"', 60)
            note.write_text("done installing")
        except BaseException:
            second.kill()
            raise
    rest, _ = second.communicate(timeout=60)
    assert second.returncode == 0, rest
    assert rest == "holding, the first one wrote: done installing\n"


def test_ensure_installed_holds_the_install_lock(monkeypatch, tmp_path):
    # The lock is taken around the whole check-create-install: held, the stamp was already written.
    held = []

    def install() -> None:
        with open(dev.LOCK) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)

    monkeypatch.setattr(dev, "LOCK", tmp_path / ".venv.lock")
    monkeypatch.setattr(dev, "_install", install)
    dev.ensure_installed()
    assert held == [True]
