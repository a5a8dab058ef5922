"""ECVL: long-tailed classification with CLIP-style dual encoders (Song, Li, Wang 2023).

The library holds data formats, models, losses, samplers, augmentation and metrics.
It knows nothing of DVC, params files or the command line: those live in `pipeline`.
"""

from ecvl.errors import DataError, EcvlError, ModelError, TrainingError

__version__ = "0.1.0"
__all__ = ["DataError", "EcvlError", "ModelError", "TrainingError", "__version__"]
