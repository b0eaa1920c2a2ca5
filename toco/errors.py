"""The one base of every error a user can cause (a wrong key, a missing file, a checkpoint that does not fit):
`toco` prints its message as one line and exits with status 2, without a traceback (TOCO_DEBUG=1 shows it)."""


class UserError(ValueError):
    """A mistake in the input; the message names the file or key and what is wrong."""
