"""DATA_DIR, created and held by what keeps state in it (a worker, `up`): a path that cannot be a
folder, or cannot be written, stops start-up naming DATA_DIR rather than with a bare OSError
("[Errno 17] File exists: '/x'" says neither which setting nor what is wrong with a path that exists)."""
from __future__ import annotations

from pathlib import Path
from typing import IO

from alerting_app.embedded import hold_lock
from alerting_app.settings import ConfigurationError


def create_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigurationError(f"Invalid configuration:\n  DATA_DIR: {data_dir} is a file, not a folder") from None
    except OSError as exc:
        raise ConfigurationError(f"Invalid configuration:\n  DATA_DIR: cannot create {data_dir}: "
                                 f"{exc.strerror or exc}") from None


def hold_data_dir_lock(data_dir: Path, name: str) -> IO | None:
    """`embedded.hold_lock` on DATA_DIR/`name`: None while another process holds it."""
    try:
        return hold_lock(data_dir / name)
    except OSError as exc:  # a read-only file system, or a volume of another user than ours
        raise ConfigurationError(f"Invalid configuration:\n  DATA_DIR: cannot write in {data_dir}: "
                                 f"{exc.strerror or exc}") from None
