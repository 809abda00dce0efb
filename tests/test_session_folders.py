"""The test session's own clean-up (tests/conftest.py): a session that was killed leaves its folder
behind (embedded services' data, some 50 MB); the next session removes it, and never the folder of
a session still running."""
from __future__ import annotations

import tempfile
from pathlib import Path

import conftest
from alerting_app.embedded import hold_lock


def test_a_killed_sessions_folder_is_removed_and_a_running_ones_is_kept():
    ended = Path(tempfile.mkdtemp(prefix=conftest._FOLDER_PREFIX))
    (ended / conftest._SESSION_LOCK).write_text("12345\n")  # its holder gone: the lock is free
    running = Path(tempfile.mkdtemp(prefix=conftest._FOLDER_PREFIX))
    lock = hold_lock(running / conftest._SESSION_LOCK)
    starting = Path(tempfile.mkdtemp(prefix=conftest._FOLDER_PREFIX))  # no lock taken yet
    try:
        conftest._remove_folders_of_ended_sessions()

        assert not ended.exists()
        assert running.exists() and starting.exists()
    finally:
        lock.close()
        for folder in (ended, running, starting):
            if folder.exists():
                for file in folder.iterdir():
                    file.unlink()
                folder.rmdir()
