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


def __getattr__(name: str):
    # Lazy: `import zoo` must not pull in faiss / onnxruntime (nor DataLoader machinery) until used.
    if name == "embed":
        import zoo.embed as module

        # The submodule zoo.embed shares the function's name: importing it set the package attribute
        # to the module, so put the function back (the module is callable too, for the other order).
        globals()["embed"] = module.embed
        return module.embed
    if name == "Embeddings":
        from zoo.embed import Embeddings

        return Embeddings
    if name == "Index":
        from zoo.index import Index

        return Index
    if name in ("detection_backbone", "segmentation_backbone"):
        import zoo.detection as detection

        return getattr(detection, name)
    if name == "convert":  # as embed: the submodule zoo.convert shares the function's name
        import zoo.convert as module

        globals()["convert"] = module.convert
        return module.convert
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


__all__ = ["ARCHS", "METHODS", "ModelSpec", "create_backbone", "get_spec", "list_models", "load", "ZooError",
           "UnknownNameError", "WeightsNotAvailableError", "CheckpointMismatchError", "IntegrityError",
           "MissingDependencyError", "embed", "Embeddings", "Index", "convert",
           "detection_backbone", "segmentation_backbone"]
