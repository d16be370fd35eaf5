"""What the scripts write: the check at start that their output can be written, the writes
themselves (atomic: a temporary file, then a rename), and write failures as one line.

A script checks its output folder before the long work (check_folder: no file in the way, not
read-only, writable, then made and a probe file written and removed there) and writes through
write_atomic, append_line or inside writing(). An OSError on the way, at start or hours later
(no space left on device, a read-only file system, a file in the way, no permission), becomes a
WriteError whose message names the file, the cause (on a full disk with the bytes free there and
the bytes needed) and what to do; the scripts print it as their one error line. A failed write
changes no file written before and leaves no temporary file behind.

    check_folder(args.out, "--out")                    # at start
    with writing(path, "--out", needed=n): save_atomic(state, path)
    write_atomic(path, lambda tmp: np.savez(tmp, ...), "OUT")
"""
import errno
import json
import os
from contextlib import contextmanager


class WriteError(OSError):
    """An output that cannot be written; the message says why and what to do. An OSError, so code
    that handles a failed write as one (hubconf.py) handles this too."""


def size_text(n):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _existing(path):
    """The nearest of path and its parent folders that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def free_bytes(path):
    """Bytes this user may still write on the file system that holds path (or would hold it), or None."""
    try:
        st = os.statvfs(_existing(path))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _file_in_the_way(path):
    """The first of path's parent folders that exists as something other than a folder, or None."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts)):
        prefix = os.sep.join(parts[:i])
        if os.path.exists(prefix) and not os.path.isdir(prefix):
            return prefix
    return None


def failure_text(e, path, flag="--out", needed=None):
    """One line for the OSError e met while writing (or making) path: the cause and what to do.
    flag: how the user names the output (--out, OUT); needed: the bytes the write takes, when known."""
    code = getattr(e, "errno", None)
    other = f"choose another {flag}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path)
        amounts = [f"about {size_text(needed)} needed" if needed else None,
                   f"{size_text(free)} free there" if free is not None else None]
        amounts = ", ".join(a for a in amounts if a)
        cause = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        return f"{cause} writing {path}{f' ({amounts})' if amounts else ''}; free some space or {other}"
    if code == errno.EROFS:
        return f"cannot write {path}: read-only file system; {other} on a writable disk"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot write {path}: permission denied; {other}, or give this user write permission there"
    blocker = _file_in_the_way(path)
    if blocker and code in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT):
        return f"cannot write {path}: {blocker} is a file, not a folder; move that file away or {other}"
    if code == errno.EISDIR or os.path.isdir(path):
        return f"cannot write {path}: it is a folder; {flag} must name a file"
    return f"cannot write {path} ({e.strerror or e}); {other}"


@contextmanager
def writing(path, flag="--out", needed=None, after=""):
    """Turn an OSError raised inside into a WriteError for path; `after` is appended to the
    message (what was kept, how to go on)."""
    try:
        yield
    except OSError as e:
        raise WriteError(failure_text(e, path, flag, needed) + after) from None


def check_folder(folder, flag="--out", create=True, target=None):
    """Stop with a WriteError unless files can be written in `folder`. create=False: only what can
    be told without making anything (no file in the way, not a read-only file system, write
    permission, a probe file when the folder exists); create=True: the folder is made and a probe
    file written and removed in it. target: the file to be written there, named in the messages."""
    folder = folder or "."
    what = f"cannot write {target}: " if target else f"{flag} "
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise WriteError(f"{what}{folder} is a file, not a folder; move that file away or choose another {flag}")
    blocker = _file_in_the_way(folder)
    if blocker:
        raise WriteError(f"cannot write {target or folder}: {blocker} is a file, not a folder; move that file away "
                         f"or choose another {flag}")
    if not os.path.isdir(folder):
        base = _existing(folder)
        if not create:
            try:
                read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
            except OSError:
                read_only = False
            if read_only:
                raise WriteError(failure_text(OSError(errno.EROFS, "read-only"), target or folder, flag))
            if not os.access(base, os.W_OK | os.X_OK):
                raise WriteError(failure_text(OSError(errno.EACCES, "permission denied"), target or folder, flag))
            return
        with writing(target or folder, flag):
            os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f".write-probe.{os.getpid()}")
    with writing(target or folder, flag):
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            if os.path.exists(probe):
                os.remove(probe)


def check_file(path, flag="--out", create_folder=True):
    """check_folder for the folder of a file to be written, and that path is not a folder itself."""
    if os.path.isdir(path):
        raise WriteError(f"{flag} {path} is a folder; {flag} must name a file")
    check_folder(os.path.dirname(path), flag, create_folder, target=path)


def write_atomic(path, write, flag="--out", needed=None, suffix=""):
    """write(tmp) to a temporary file in path's folder, then rename it to path, so a reader never
    sees a half-written file; a failure (WriteError) leaves path as it was and no temporary file.
    suffix: what write adds to a file name (np.savez adds .npz)."""
    tmp = f"{path}.tmp.{os.getpid()}{suffix}"
    try:
        with writing(path, flag, needed):
            write(tmp)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj, flag="--out"):
    """obj as indented JSON, atomically."""
    text = json.dumps(obj, indent=2)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write, flag, needed=len(text))


def append_line(path, line, flag="--out"):
    """Append one line (a JSON record) to path; a failed write leaves the file as it was, without a partial line."""
    data = (line + "\n").encode()
    with writing(path, flag, needed=len(data)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        start = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)
