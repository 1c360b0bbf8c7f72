"""Errors a user can hit. Each carries one line that says what happened and what to do."""

import errno
import re


class AuditError(Exception):
    """A failure the user can act on; the CLI prints it without a traceback."""


class WorkspaceNotFound(AuditError):
    pass


class WorkspaceBusy(AuditError):
    pass


class BundleError(AuditError):
    """An encoder bundle is missing, incomplete or inconsistent."""


# What the OS, DuckDB ("Could not write file "…": No space left on device") and Lance ("… No space left on device
# (os error 28), /path/to/lance/src/….rs:98:5") say when the disk is full or a path is not writable.
_NO_SPACE = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}
_NOT_WRITABLE = {
    errno.EACCES: "Permission denied",
    errno.EPERM: "Operation not permitted",
    errno.EROFS: "Read-only file system",
}
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def _chain(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    while exc is not None and exc not in found and len(found) < 20:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


def _matches(exc: BaseException, kinds: dict[int, str]) -> str | None:
    if getattr(exc, "errno", None) in kinds:
        return kinds[exc.errno]
    text = str(exc).lower()
    for number, words in kinds.items():
        if words.lower() in text or f"(os error {number})" in text:
            return words
    return None


def storage_message(exc: BaseException, places: list[str]) -> str | None:
    """One actionable line when `exc` is the disk under the workspace failing (full, over quota, not writable,
    read-only) rather than the program; None otherwise. `places` are the workspace's folders, named when the error
    itself names no file (Lance's messages end in a path of its Rust sources, not of the data)."""
    for cause in _chain(exc):
        for kinds, problem, action in (
            (_NO_SPACE, "no space left on the disk holding", "free some space and run the command again"),
            (_NOT_WRITABLE, "cannot write to", "make it writable for this user and run the command again"),
        ):
            words = _matches(cause, kinds)
            if words is None:
                continue
            named = getattr(cause, "filename", None) or next(iter(_QUOTED_PATH.findall(str(cause))), None)
            where = str(named) if named else " or ".join(places) or "the workspace"
            return f"{problem} {where} ({words}); {action}: committed batches are kept"
    return None
