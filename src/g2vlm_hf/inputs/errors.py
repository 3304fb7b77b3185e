"""The one error class of the inputs layer."""


class InputError(ValueError):
    """Views that cannot be used as given (a missing file, a folder without images, a video without frames, too few
    or too many views); the message says what to do. A ValueError, so callers catching those catch it too."""
