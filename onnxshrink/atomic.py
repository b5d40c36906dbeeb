"""Writing outputs atomically: a reader sees the old file or the new one, never half of either.

* :func:`check_outputs` checks every path a command will write -- model, its ``.data``, reports
  -- against the input model and each other before anything is written.
* :func:`save` writes the model to a temporary folder beside the target and moves it into place
  with ``os.replace`` (external data first, under a name no earlier run used, then the model);
  it refuses to overwrite the input model and removes what a killed run left behind.
* :func:`copy_file` and :func:`atomic_text` do the same for a copied model and a report.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import onnx_ir as ir

from onnxshrink.errors import OutputError
from onnxshrink.io import write

__all__ = ["atomic_text", "check_output_path", "check_outputs", "copy_file", "save"]


def check_outputs(
    model_out: Path | None, reports: Iterable[Path], protected: Iterable[Path]
) -> None:
    """Every file a command will write -- the model (and its ``.data``), the reports -- checked
    against the input model, its external data and each other, before anything is written."""
    taken = {p.resolve() for p in protected}
    if model_out is not None:
        check_output_path(model_out, protected)
        taken |= {model_out.resolve(), (model_out.parent / f"{model_out.name}.data").resolve()}
    for report in reports:
        check_output_path(report, (), what="report")
        if report.resolve() in taken:
            raise OutputError(
                f"{report}: the report would overwrite the input model, its external "
                "data, the output model or another report; choose another path"
            )
        taken.add(report.resolve())


def check_output_path(path: Path, protected: Iterable[Path], *, what: str = "output model") -> None:
    folder = path.parent
    if not folder.exists():
        raise OutputError(f"{path}: output folder '{folder}' does not exist")
    if not folder.is_dir():
        raise OutputError(f"{path}: '{folder}' is not a folder")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name for the {what}")
    data = folder / f"{path.name}.data"
    if what == "output model" and data.is_dir():
        raise OutputError(f"{path}: '{data}' is a folder; the model's external data would go there")
    try:  # a real probe: os.access says yes to root even where nothing can be created
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{path}: output folder '{folder}' is not writable ({e.strerror})") from e
    resolved = {path.resolve(), (folder / f"{path.name}.data").resolve()}
    for p in protected:
        if p.resolve() in resolved:
            raise OutputError(
                f"{path}: would overwrite the input model or its external data; "
                "choose another output path"
            )


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    protect: Iterable[Path] = (),
    external_data: bool | None = None,
) -> int:
    """Atomically writes ``model`` to ``path``; never overwrites a ``protect``-ed file.

    External data goes to ``<name>.<run>.data``, a name no earlier run used, moved into place
    before the model that names it; the model then replaces the old one in one rename, and the
    data files of earlier runs go after it. A reader sees the old pair or the new one, never the
    old model with new weights (two renames of fixed names allowed that, if killed between).
    Returns the bytes on disk (model file plus external data).
    """
    path = Path(path)
    check_output_path(path, protect)
    _clean_leftovers(path)
    try:  # the process id in the name: a later run knows a leftover of a killed one
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        )
    except OSError as e:
        raise OutputError(f"{path}: cannot write to '{path.parent}': {e.strerror}") from e
    try:
        data = tmp / f"{path.name}.{secrets.token_hex(4)}.data"
        try:
            size = write(model, tmp / path.name, external_data=external_data, data_name=data.name)
        except OSError as e:
            raise OutputError(f"{path}: cannot write the model: {e.strerror or e}") from e
        try:
            if data.exists():
                os.replace(data, path.parent / data.name)
            os.replace(tmp / path.name, path)
        except OSError as e:
            raise OutputError(f"{path}: cannot write the model: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_old_data(path, keep=data.name, protect=protect)
    return size


def _remove_old_data(path: Path, keep: str, protect: Iterable[Path]) -> None:
    """The data files of earlier runs beside ``path`` (``<name>.data``, ``<name>.<run>.data``),
    now that the model names ``keep``; never a protected file."""
    protected = {p.resolve() for p in protect}
    for old in path.parent.glob(f"{glob.escape(path.name)}.*data"):
        rest = old.name[len(path.name) + 1 :]
        ours = rest == "data" or (rest.endswith(".data") and len(rest) == 13 and rest[:8].isalnum())
        if ours and old.name != keep and old.resolve() not in protected and old.is_file():
            old.unlink(missing_ok=True)


def _clean_leftovers(path: Path) -> None:
    """Removes ``.OUT.<pid>.*.tmp`` folders and files beside ``path`` that a run killed while
    writing left behind (its process is gone)."""
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = old.name[len(path.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def copy_file(src: Path, path: Path, *, protect: Iterable[Path] = ()) -> None:
    """Atomically copies the model file ``src`` to ``path`` (checked as :func:`save` does)."""
    check_output_path(path, protect)
    tmp = path.parent / f".{path.name}.{os.getpid()}.copy.tmp"
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the model: {e.strerror or e}") from e


def atomic_text(path: Path, text: str) -> None:
    """Writes a text file (a report) atomically, with the permissions the umask gives."""
    check_output_path(path, (), what="report")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write the report: {e.strerror or e}") from e
    try:
        try:
            f = os.fdopen(fd, "w", encoding="utf-8")
        except BaseException:
            os.close(fd)
            raise
        with f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the report: {e.strerror or e}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
