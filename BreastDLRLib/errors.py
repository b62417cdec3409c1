"""Errors a user can meet.  Each message says what went wrong and what to do, in words a clinician
understands; the command line prints it as one line and exits non-zero."""


class BreastDLRError(Exception):
    """Base of every error BreastDLR reports to a user (not a programming error)."""


class InputError(BreastDLRError):
    """An image, volume, mask or manifest that cannot be used as given."""


class ModelBundleError(BreastDLRError):
    """A model bundle that is missing, does not match this code, or was altered."""


class ClinicalInputError(BreastDLRError):
    """A clinical value that is out of range, of the wrong type or unknown to the model."""


class Cancelled(BreastDLRError):
    """The user cancelled a long-running job; nothing was written as a result."""
