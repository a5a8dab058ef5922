"""ECVL: long-tailed classification with CLIP-style dual encoders (Song, Li, Wang 2023).

The library holds data formats, models, losses, samplers, augmentation and metrics.
It knows nothing of DVC, params files or the command line: those live in `pipeline`.

`ecvl.load_classifier(path)` loads the classifier `ecvl package` wrote (see
`ecvl.classifier`); it is imported on first use, so that `import ecvl` stays free of torch
(the CLI sets OpenMP's wait policy before torch loads).
"""

from ecvl.errors import DataError, EcvlError, ModelError, TrainingError

__version__ = "0.1.0"
__all__ = [
    "DataError",
    "EcvlError",
    "ModelError",
    "TrainingError",
    "__version__",
    "load_classifier",
]


def __getattr__(name: str):
    if name == "load_classifier":
        from ecvl.classifier import load_classifier

        return load_classifier
    raise AttributeError(f"module 'ecvl' has no attribute {name!r}")
