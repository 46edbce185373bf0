"""seqinv: sequence-invariant 3D brain-MRI representations (the code every bundle imports as ``custom``).

Importing the package has no process-wide side effect: the one-line report of bad input
(:func:`custom.errors.report_input_errors`) is switched on explicitly by the bundle configs' run lists, and only
when ``python -m monai.bundle`` is the program being run.
"""

from custom.errors import InputError

__all__ = ["InputError", "__version__"]
__version__ = "0.1.0"
