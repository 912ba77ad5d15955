"""Errors raised by the data plane."""


class DataError(RuntimeError):
    """A data file is missing, corrupt or does not match its expected layout.

    The message always names the file and says what to do about it.
    """
