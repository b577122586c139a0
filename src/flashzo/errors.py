"""``InputError``, the one error type flashzo raises when it refuses what a user gave it.

The class is defined at the bottom of the layers, in kernels/errors.py, so that the kernels and the
engine can raise it without importing the application; this module keeps its application name.
"""

from flashzo.kernels.errors import InputError

__all__ = ["InputError"]
