"""Where tfb writes its outputs: one rule for every output directory and report file.

Output directories (``tfb bayesianize --out``, ``tfb finetune --out``, ``tfb serve
--posterior-out``):

- a new or empty directory is written atomically: the files go to a temporary directory beside
  it, which is then renamed into place (an empty mount point, which cannot be renamed, gets the
  files moved in one by one, the file that marks the output last);
- an existing non-empty directory is refused, naming it, unless ``force``, which replaces it only
  when it holds a previous tfb output and nothing else (:data:`OUTPUTS`);
- never, even with ``force``: the current directory or one that contains it, an input of the
  same command or a directory that contains one, a file.

Report files (``tfb eval --json/--plot``) are written to a temporary file beside them, then
renamed; a previous report is replaced; an input, or a file inside an input directory, never.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .adapter import CONFIG_NAME, WEIGHTS_NAME
from .errors import TFBError

TFB_CONFIG_NAME = "tfb_config.json"
POSTERIOR_NAME = "tfb_posterior.safetensors"
SERVE_KEY_NAME = "tfb_serve_key.json"  # a cached fit (tfb serve's start-up search): the key of its inputs
FINETUNE_LOG_NAME = "finetune.json"

#: what each tfb command writes: the file that marks its output, and every file that output may hold
OUTPUTS = {
    "Bayesianized adapter": (TFB_CONFIG_NAME, {CONFIG_NAME, WEIGHTS_NAME, POSTERIOR_NAME, TFB_CONFIG_NAME,
                                               SERVE_KEY_NAME}),
    "finetuned adapter": (FINETUNE_LOG_NAME, {CONFIG_NAME, WEIGHTS_NAME, FINETUNE_LOG_NAME,
                                              "README.md"}),  # peft's model card
}

Inputs = Iterable[tuple[str, "str | os.PathLike | None"]]  # (flag, path): what the command reads


def tfb_output(directory: Path) -> str | None:
    """The kind of tfb output ``directory`` holds (a key of :data:`OUTPUTS`), or None when it holds
    anything else: a subdirectory, a link, a file no tfb command writes."""
    names = {p.name for p in directory.iterdir()}
    for kind, (marker, known) in OUTPUTS.items():
        if marker in names and names <= known and all(
                (directory / n).is_file() and not (directory / n).is_symlink() for n in names):
            return kind
    return None


def check_output_dir(path: str | os.PathLike, *, force: bool = False, inputs: Inputs = (),
                     flag: str = "output directory") -> Path:
    """The directory ``path`` names, resolved, if the rule lets a command write it; else a
    :class:`TFBError` naming ``flag`` and ``path``. Writes nothing."""
    shown = path
    out = Path(path).expanduser().resolve()
    cwd = Path.cwd().resolve()
    never = "(even with --force); name a new or empty directory"
    if out == cwd or out in cwd.parents:
        what = "is" if out == cwd else "contains"
        raise TFBError(f"{flag} {shown} {what} the current directory: refusing to replace it {never}")
    for input_flag, input_path in inputs:
        if input_path is None or not Path(input_path).expanduser().exists():
            continue
        source = Path(input_path).expanduser().resolve()
        if out == source or out in source.parents:
            what = "is" if out == source else "contains"
            raise TFBError(f"{flag} {shown} {what} the input {input_flag} {input_path}: refusing to write "
                           f"over an input {never}")
    if not out.exists():
        return out
    if not out.is_dir():
        raise TFBError(f"{flag} {shown} is a file, not a directory; name a new or empty directory")
    if not any(out.iterdir()):
        return out
    kind = tfb_output(out)
    if kind is None:
        raise TFBError(f"{flag} {shown} is not empty and holds files no tfb command writes: refusing to "
                       f"write there (--force replaces only a previous tfb output); name a new or "
                       f"empty directory")
    if not force:
        raise TFBError(f"{flag} {shown} already holds a {kind}: pass --force to replace it, or name a "
                       f"new or empty directory")
    return out


def write_output_dir(path: str | os.PathLike, write: Callable[[Path], None], *, force: bool = False,
                     inputs: Inputs = (), flag: str = "output directory") -> Path:
    """Check ``path`` (:func:`check_output_dir`), let ``write(tmp)`` fill a temporary directory
    beside it, then put that in its place. Returns ``path`` (``~`` expanded). On any failure the
    temporary directory is removed and what was there before is left as it was."""
    out = check_output_dir(path, force=force, inputs=inputs, flag=flag)
    in_place = out.is_dir() and os.path.ismount(out)  # a mount point cannot be renamed
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp.", dir=out if in_place else out.parent))
        tmp.chmod(0o777 & ~_umask())  # as mkdir would make it (mkdtemp's is private: 0o700)
    except OSError as e:
        raise TFBError(f"{flag} {path}: cannot write there: {e.strerror or e}") from None
    try:
        write(tmp)
        if in_place:
            _move_files_in(tmp, out)
        else:
            _rename_into_place(tmp, out, flag, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(path).expanduser()


def _rename_into_place(tmp: Path, out: Path, flag: str, shown) -> None:
    """``tmp`` becomes ``out``; a previous output (checked) is moved aside first, then removed."""
    if not out.exists() or not any(out.iterdir()):
        try:
            os.replace(tmp, out)  # over an empty directory too, in one step
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # a file appeared since the check
                raise TFBError(f"{flag} {shown} is no longer empty; nothing was written there") from None
            raise
        return
    if tfb_output(out) is None:  # changed since the check: never move anything else aside
        raise TFBError(f"{flag} {shown} changed while it was being written: it now holds files no tfb "
                       f"command writes; nothing was written there")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, old / "d")
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / "d", out)  # put the previous output back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _move_files_in(tmp: Path, out: Path) -> None:
    """Fill the mount point ``out`` from ``tmp`` (inside it), file by file: a previous output's
    marker goes first, the new marker comes last, so a half-done move never looks complete."""
    markers = {marker for marker, _ in OUTPUTS.values()}
    previous = [p for p in out.iterdir() if p != tmp]  # empty, or a previous output (checked)
    for p in sorted(previous, key=lambda p: p.name not in markers):
        p.unlink()
    for p in sorted(tmp.iterdir(), key=lambda p: p.name in markers):
        os.replace(p, out / p.name)
    tmp.rmdir()


def check_output_file(path: str | os.PathLike, *, inputs: Inputs = (), flag: str = "output file") -> Path:
    """The file ``path`` names, resolved, if a command may write it: not a directory, not an input,
    not inside an input directory. A previous file there is replaced when written."""
    out = Path(path).expanduser().resolve()
    if out.is_dir():
        raise TFBError(f"{flag} {path} is a directory; name a file")
    for input_flag, input_path in inputs:
        if input_path is None or not Path(input_path).expanduser().exists():
            continue
        source = Path(input_path).expanduser().resolve()
        if out == source or source in out.parents:
            what = "is" if out == source else "is inside"
            raise TFBError(f"{flag} {path} {what} the input {input_flag} {input_path}: refusing to write "
                           f"over an input; name another file")
    return out


def write_output_file(path: str | os.PathLike, write: Callable[[Path], None], *, inputs: Inputs = (),
                      flag: str = "output file") -> Path:
    """Check ``path`` (:func:`check_output_file`), let ``write(tmp)`` write a temporary file beside
    it (same suffix), then rename it to ``path``; a missing parent directory is created."""
    out = check_output_file(path, inputs=inputs, flag=flag)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp.", suffix=out.suffix, dir=out.parent)
    except OSError as e:
        raise TFBError(f"{flag} {path}: cannot write there: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # as open() would make it (mkstemp's is private: 0o600)
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Path(path).expanduser()


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


# --- a cached fit's key, and the lock that makes processes fit one at a time ------------------------


def stored_key(directory: Path) -> str | None:
    """The key a cached fit in ``directory`` was made for (see :func:`tfb_core.fit.fit_key`), or None."""
    try:
        return json.loads((Path(directory) / SERVE_KEY_NAME).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def write_key(directory: Path, key: str) -> None:
    (Path(directory) / SERVE_KEY_NAME).write_text(json.dumps({"key": key}))


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive file lock (flock) on ``path``, released on exit or when the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def lock_for(cache: Path, out: Path) -> Path:
    """The lock file in ``cache`` that guards the output directory ``out``."""
    return Path(cache) / "locks" / (hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:32] + ".lock")


def sha256_head_tail(path: Path, n: int = 1 << 20) -> bytes:
    """sha256 of a file's first and last ``n`` bytes (a multi-GB weight file is not read whole)."""
    with open(path, "rb") as f:
        head = f.read(n)
        f.seek(max(0, path.stat().st_size - n))
        tail = f.read(n)
    return hashlib.sha256(head + tail).digest()
