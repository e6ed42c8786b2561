"""File handling shared by the exporter and the adapter writer: output checks, the temporary
directory next to the target (named after its owner, so a later export removes what a killed
one left), missing output directories created atomically, atomic commit, sizes."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

# protobuf cannot serialise a message over 2 GiB; stay clear of the limit (the graph itself,
# names and attributes, also count) and move weights to an external file above this.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def check_output_path(
    path: str | os.PathLike, arg: str = "path", suffix: str = ".onnx", make_parents: bool = False
) -> Path:
    """Resolve an output path and check, before any work, that its directory exists (or, with
    ``make_parents``, that its nearest existing ancestor is a directory) and is writable and
    that the path is not a directory.

    Raises:
        FileNotFoundError / NotADirectoryError / PermissionError / IsADirectoryError, each
        naming the argument and the directory.
    """
    target = Path(path).expanduser().absolute()
    if target.suffix != suffix:
        raise ValueError(f"{arg}: got {str(path)!r}, need a file name ending in {suffix!r}")
    parent = target.parent
    if make_parents:
        parent = _existing_ancestor(parent)
    elif not parent.exists():
        raise FileNotFoundError(
            f"{arg}: the directory {str(parent)!r} does not exist; create it first"
        )
    if not parent.is_dir():
        raise NotADirectoryError(f"{arg}: {str(parent)!r} is not a directory")
    if target.is_dir():
        raise IsADirectoryError(f"{arg}: {str(target)!r} is a directory, need a file path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{arg}: the directory {str(parent)!r} is not writable; choose another output path"
        )
    return target


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as a file or a directory)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# -- staging directories: ".<name>.tmp-<pid>@<host>-<random>" next to what they stage -----
def _staging_prefix(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}@{socket.gethostname()}-"


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_staging(directory: Path, name: str) -> list[Path]:
    """Remove the staging directories for ``name`` in ``directory`` that a process of this
    host left when it died (killed during an export): only directories named as
    :func:`staging_dir` names them, only when their owner's pid is gone. Staging of a live
    process, of another host, or named otherwise is left alone. Returns what was removed."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.tmp-(\d+)@(.+)-[A-Za-z0-9_]+$")
    host = socket.gethostname()
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or match.group(2) != host or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _owner_alive(pid):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _mkdtemp(name: str, directory: Path, arg: str) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=_staging_prefix(name), dir=directory))
    except OSError as exc:
        raise PermissionError(
            f"{arg}: cannot write in {str(directory)!r} ({exc.strerror}); choose another "
            "output path"
        ) from None


@contextmanager
def staging_dir(target: Path, arg: str = "path") -> Iterator[Path]:
    """A temporary directory next to ``target`` (same file system, so the final rename is
    atomic), removed on exit whatever happens. Creating it also proves the directory is
    writable (os.access says yes to root even on a read-only mount). Its name carries this
    process's pid and host; staging that dead processes left for the same target is removed
    first (:func:`remove_stale_staging`)."""
    remove_stale_staging(target.parent, target.name)
    tmp = _mkdtemp(target.name, target.parent, arg)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def output_parents(target: Path, arg: str = "path") -> Iterator[Path]:
    """Where to write ``target`` when its directory may be missing, created atomically.

    Yields ``target`` itself when its directory exists. Otherwise the missing directories
    are built inside a staging directory in the nearest existing ancestor and the path
    yielded lies in that copy; when the block succeeds the copy's top directory is renamed
    into place (one atomic rename: the directory appears with its files), and when it fails
    nothing is left. Use as ``with output_parents(t) as where, staging_dir(where) as tmp:``
    and commit into ``where.parent``.
    """
    if target.parent.is_dir():
        yield target
        return
    base = _existing_ancestor(target.parent)
    top = base / target.parent.relative_to(base).parts[0]  # the first missing directory
    remove_stale_staging(base, top.name)
    shadow = _mkdtemp(top.name, base, arg)
    try:
        where = shadow / target.relative_to(top)
        where.parent.mkdir(parents=True, exist_ok=True)
        yield where
        try:
            os.rename(shadow, top)
        except OSError as exc:  # another process created ``top`` (with files) meanwhile
            raise FileExistsError(
                f"{arg}: {str(top)!r} appeared while the export ran ({exc.strerror}); "
                "nothing was written, run again"
            ) from None
    finally:
        shutil.rmtree(shadow, ignore_errors=True)


def commit(staged: list[Path], target_dir: Path) -> list[Path]:
    """Move staged files into ``target_dir`` with os.replace (atomic per file). The model
    file must come last in ``staged``: a reader never sees a model whose external data is not
    yet in place."""
    done = []
    for src in staged:
        dst = target_dir / src.name
        os.replace(src, dst)
        done.append(dst)
    return done


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data the model holds (initializers, including external ones)."""
    total = 0
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        total += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def save_model(
    model: onnx.ModelProto, path: Path, external_data: bool | None
) -> tuple[list[Path], bool]:
    """Save ``model`` at ``path``; weights go to ``<name>.data`` next to it when
    ``external_data`` is True, or when None and the weights are near protobuf's 2 GiB limit.

    Returns: (files written, data file first and model file last; whether external data is
    used).
    """
    use_external = (
        initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
        if external_data is None
        else bool(external_data)
    )
    data_name = path.name + ".data"
    if use_external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        return [path.parent / data_name, path], True
    onnx.save_model(model, str(path))
    return [path], False


def file_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())
