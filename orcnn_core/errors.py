"""The one exception type for bad user input (files, annotations, parameters)."""


class InputError(ValueError):
    """Bad input from a user file or argument.

    The message names what is wrong and where (file, annotation id, key, parameter), so the
    command line prints it as one line and exits with code 2, without a traceback.
    """
