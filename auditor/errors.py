"""Errors a user can hit. Each carries one line that says what happened and what to do."""


class AuditError(Exception):
    """A failure the user can act on; the CLI prints it without a traceback."""


class WorkspaceNotFound(AuditError):
    pass


class WorkspaceBusy(AuditError):
    pass


class BundleError(AuditError):
    """An encoder bundle is missing, incomplete or inconsistent."""
