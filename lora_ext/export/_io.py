"""File handling shared by the exporter and the adapter writer: output checks, the temporary
directory next to the target, atomic commit, sizes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

# protobuf cannot serialise a message over 2 GiB; stay clear of the limit (the graph itself,
# names and attributes, also count) and move weights to an external file above this.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def check_output_path(path: str | os.PathLike, arg: str = "path", suffix: str = ".onnx") -> Path:
    """Resolve an output path and check, before any work, that its directory exists and is
    writable and that the path is not a directory.

    Raises:
        FileNotFoundError / NotADirectoryError / PermissionError / IsADirectoryError, each
        naming the argument and the directory.
    """
    target = Path(path).expanduser().absolute()
    if target.suffix != suffix:
        raise ValueError(f"{arg}: got {str(path)!r}, need a file name ending in {suffix!r}")
    parent = target.parent
    if not parent.exists():
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


@contextmanager
def staging_dir(target: Path, arg: str = "path") -> Iterator[Path]:
    """A temporary directory next to ``target`` (same file system, so the final rename is
    atomic), removed on exit whatever happens. Creating it also proves the directory is
    writable (os.access says yes to root even on a read-only mount)."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise PermissionError(
            f"{arg}: cannot write in {str(target.parent)!r} ({exc.strerror}); choose another "
            "output path"
        ) from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
