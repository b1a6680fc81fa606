"""The harness's refusals: a bad argument, and a peer checkout that cannot run a method."""


class UserError(Exception):
    """A bad argument: reported as one line, no traceback."""


class PeerUnavailable(Exception):
    """The given checkout cannot run this method (the reason says why)."""
