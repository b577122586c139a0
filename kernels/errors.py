"""The one error type flashzo raises when it refuses what a user gave it.

Every check of user input (arguments, configs, checkpoints, data files, flags) raises ``InputError``,
a ``ValueError``, with a message that names the problem (and for data, the file and line). The
``flashzo`` command prints an InputError as one line and exits with status 2; anything else is a bug
and keeps its traceback. It lives at the bottom of the layers (kernels/ imports nothing of flashzo's
outside kernels/, engine/ only kernels/ and engine/), so every layer can raise it; ``flashzo.InputError``
and ``flashzo.errors.InputError`` are this class.
"""


class InputError(ValueError):
    """flashzo refused an input: the message names what and why."""
