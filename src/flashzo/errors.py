"""The one error type flashzo raises when it refuses what a user gave it.

Every check of user input (arguments, configs, checkpoints, data files, flags) raises ``InputError``,
a ``ValueError``, with a message that names the problem (and for data, the file and line). The
``flashzo`` command prints an InputError as one line and exits with status 2; anything else is a bug
and keeps its traceback. This module imports nothing from flashzo, so every layer (kernels included)
can raise it.
"""


class InputError(ValueError):
    """flashzo refused an input: the message names what and why."""
