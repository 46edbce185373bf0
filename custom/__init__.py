"""seqinv: sequence-invariant 3D brain-MRI representations (the code every bundle imports as ``custom``)."""

from custom.errors import InputError, install_excepthook

__all__ = ["InputError", "__version__"]
__version__ = "0.1.0"

install_excepthook()
