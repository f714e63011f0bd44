"""ssl-zoo: self-supervised image backbones, embeddings and nearest-neighbour search.

    import zoo
    model = zoo.load("wmse-resnet18_narrow.fmnist")
    x = model.preprocess(pil_image)[None]
    features = model(x)
"""

from zoo.backbones import ARCHS, create_backbone
from zoo.errors import (CheckpointMismatchError, IntegrityError, MissingDependencyError, UnknownNameError,
                        WeightsNotAvailableError, ZooError)
from zoo.load import load
from zoo.registry import METHODS, ModelSpec, get_spec, list_models

__version__ = "0.1.0"

__all__ = ["ARCHS", "METHODS", "ModelSpec", "create_backbone", "get_spec", "list_models", "load", "ZooError",
           "UnknownNameError", "WeightsNotAvailableError", "CheckpointMismatchError", "IntegrityError",
           "MissingDependencyError"]
