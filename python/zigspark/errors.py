"""Exceptions users see. Each message names what was wrong and how to fix it."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs here; the message says why and the fix."""
