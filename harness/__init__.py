"""tf-repro-harness: does a TensorFlow model give the same bits after it is saved and reloaded elsewhere?

Public API: ``Scenario`` (write your own in a scenarios directory) and
``Tolerance``. Importing this package never imports TensorFlow or Ray.
"""

from .compare import Tolerance
from .scenario import Scenario

__all__ = ["Scenario", "Tolerance", "__version__"]
__version__ = "0.1.0"
