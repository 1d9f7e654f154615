"""Atomic file I/O for every artefact steer_lens saves: safetensors plus JSON, never pickle.

Each file goes to a temporary name in the same folder, is fsync'ed and moved into place with
``os.replace``, so a reader sees either the old file or the new one. A folder of several files
(tensors + config) is written as a whole by :func:`atomic_folder`: into a fresh sibling folder that is
swapped in when complete, so a reader (or a process killed mid-save) sees the old folder or the new
one, never new tensors beside an old config. Used by vector folders
(:meth:`steer_lens.SteeredTransformer.save`), training checkpoints, SAE and adapter saves and the demo.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save
from torch import Tensor

__all__ = [
    "atomic_folder",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "load_safetensors",
    "read_json",
    "readable_folder",
    "remove_stale_siblings",
]


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors, atomically (serialised in memory, then :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    with open(path) as f:
        return json.load(f)


def load_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a safetensors file onto the CPU."""
    return load_file(str(path), device="cpu")


_RENAME_EXCHANGE = 2  # linux renameat2 flag: swap two paths atomically
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Remove the half-written sibling folders a killed :func:`atomic_folder` left beside ``path``.

    A save writes into ``.<name>.<pid>-<random>.tmp``; a process killed by SIGKILL (or a power cut)
    cannot remove it. Such a sibling is removed when the process id in its name no longer exists;
    siblings of live processes (a save running in parallel) and names in any other form are kept.

    Returns:
        The removed folders.
    """
    path = Path(path)
    removed = []
    for sib in path.parent.glob(f".{path.name}.*-*.tmp"):
        pid = sib.name[len(path.name) + 2 :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and sib.is_dir():
            shutil.rmtree(sib, ignore_errors=True)
            removed.append(sib)
    return removed


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, carry_over: bool = True) -> Iterator[Path]:
    """Context manager: write a folder as a whole. Yields an empty sibling folder to write into.

    On a normal exit the new folder replaces ``path``: with ``carry_over`` (the default) files of an
    existing folder that the new one does not write are carried over (a user's notes beside saved
    vectors survive; ``carry_over=False`` replaces the folder whole, e.g. a checkpoint whose old shards
    must not outlive it), then the two are swapped atomically (``renameat2`` exchange on
    Linux; elsewhere two renames, between which :func:`readable_folder` finds the old folder). On an
    exception (or an interrupt) the sibling is removed and ``path`` is untouched. Siblings left by a
    process that was killed outright are removed by the next save (:func:`remove_stale_siblings`).

    Raises:
        NotADirectoryError: ``path`` exists and is not a folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} exists and is not a folder; save to a folder path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp"))
    try:
        yield tmp
        if path.exists() and carry_over:
            for old in path.iterdir():
                if not (tmp / old.name).exists() and not old.name.startswith("."):
                    (shutil.copytree if old.is_dir() else shutil.copy2)(old, tmp / old.name)
        _fsync_tree(tmp)
        os.chmod(tmp, _umask_mode() | ((_umask_mode() & 0o444) >> 2))  # rw as files, x where r
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)
        else:  # pragma: no cover - non-Linux fallback
            aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, aside)
            os.rename(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def readable_folder(path: str | os.PathLike) -> Path:
    """The folder to read for ``path``: itself, or (when a save was killed between the two renames of
    :func:`atomic_folder`'s fallback) the complete old folder set aside beside it."""
    path = Path(path)
    if path.exists():
        return path
    aside = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.exists() else []
    return aside[-1] if aside else path
