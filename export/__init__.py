"""Export and publishing: trainer checkpoint -> `model_cards/NAME/` (safetensors, ONNX, config, model card) -> Hub.

    from export import export_model, publish_folder
    export_model("runs/wmse-fashion_mnist-.../", "wmse-resnet18_narrow.fmnist")
    publish_folder("model_cards/wmse-resnet18_narrow.fmnist", "ssl-zoo/wmse-resnet18_narrow.fmnist")

Heavy parts (torch.onnx, huggingface_hub) are imported when these functions run.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_model", "publish_folder"]  # run files are read by zoo.checkpoint


def __getattr__(name: str) -> Any:  # lazy, so `import export` (the `zoo` command) stays cheap
    if name in ("export_model", "publish_folder"):
        from export import publish

        return getattr(publish, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
