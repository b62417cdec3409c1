"""BreastDLR engine: deep-learning radiomics of breast lesions on ultrasound.

Plain Python: never imports Qt, ``slicer.app`` or the Slicer module, so it runs in plain
Python, in Slicer's Python and on a cluster.  Research use only; not a medical device.
"""

__version__ = "0.1.0"

from .errors import BreastDLRError, InputError, ModelBundleError, ClinicalInputError, Cancelled  # noqa: F401
from .volume import Volume  # noqa: F401
