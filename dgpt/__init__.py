"""dgpt: donated idle devices as one elastic Ray fabric for AI training and inference.

``import dgpt`` stays light (no torch, no Ray Serve) so the donor agent starts fast.
"""

from dgpt.config import Settings, load_settings
from dgpt.exceptions import DgptError
from dgpt.sdk.client import Client

__version__ = "0.1.0"

__all__ = [
    "Client",
    "DgptError",
    "Settings",
    "__version__",
    "load_settings",
]
