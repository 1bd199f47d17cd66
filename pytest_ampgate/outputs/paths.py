"""Where the outputs go: checks of the output paths before anything is measured, and the one write.

A path that is sure to fail at session end (a directory in the file's place, a parent that is a
file, a directory no one may write into) is refused as a usage error before a long measurement
rather than after it.  Every report file is then written through :func:`save`, which writes it
whole or not at all (:func:`pytest_ampgate.file_safety.write_atomic`), so a CI step never uploads
half a report.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError


def save(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating its directory; returns the path."""
    from ..file_safety import write_atomic  # removes its temp file when the write fails: no debris

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return path


OUTPUT_OPTIONS = {"json": "--ampgate-json", "markdown": "--ampgate-markdown", "plot": "--ampgate-plot"}


def check_output_path(option: str, path: Path) -> None:
    """Refuse before measuring what is sure to fail at session end: a directory in the file's place,
    a file in the place of one of its parent directories, a parent no one may write into, or a path
    the OS will not even look up (a name too long, a symlink loop)."""
    try:
        _check_output_path(option, path)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: {exc.strerror or exc}; choose another path") from None


def _check_output_path(option: str, path: Path) -> None:
    try:  # a name too long or a symlink loop: an OSError, made a ConfigError above
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # not there yet, or under a file: see below
        pass
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a directory; give the path of a file to write, e.g. {path / 'ampgate'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is a file, not a directory; choose a path under a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{option} {path}: not writable by this user; choose a path you may write to")


def check_step_summary(value: str) -> None:
    """``$GITHUB_STEP_SUMMARY`` is appended to, never created with its directory: check both exist as such."""
    path = Path(value)
    try:
        os.stat(path) if os.path.lexists(path) else None
    except OSError as exc:
        raise ConfigError(f"$GITHUB_STEP_SUMMARY={value}: {exc.strerror or exc}; unset it or point it at a file") from None
    if path.is_dir():
        raise ConfigError(f"$GITHUB_STEP_SUMMARY={value}: is a directory, not a file; unset it or point it at a file")
    if not path.parent.is_dir():
        raise ConfigError(
            f"$GITHUB_STEP_SUMMARY={value}: its directory {path.parent} does not exist; unset it or point it at a file "
            "in an existing directory (on GitHub Actions the runner sets it for you)"
        )


def check_baseline_dir(path: Path, update: bool) -> None:
    """The baseline directory, checked before measuring: a file in its place (or in the place of one of
    its parents) fails every gated test, and under --ampgate-update a directory that cannot be created
    or written would lose every measurement at session end."""
    fix = "point --ampgate-baseline-dir (or the ampgate_baseline_dir ini setting) at a directory"
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"baseline directory {path}: is a file, not a directory; {fix}")
        parent = path
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"baseline directory {path}: {parent} is a file, not a directory; {fix}")
        if update and not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(
                f"baseline directory {path}: {parent} is not writable by this user, so --ampgate-update could record nothing; {fix} you may write to"
            )
    except OSError as exc:
        raise ConfigError(f"baseline directory {path}: {exc.strerror or exc}; {fix}") from None
