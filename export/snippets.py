"""Code for the model card's "use without ssl-zoo" section: rebuild the arch from torchvision alone and load
the weights, or run the ONNX file with onnxruntime, numpy and PIL."""

from __future__ import annotations

from zoo.backbones import get_arch
from zoo.registry import ModelSpec


def torchvision_builder(arch_name: str) -> str | None:
    """The torchvision constructor an arch starts from, or None when it is not a stock one."""
    name = getattr(get_arch(arch_name).builder, "__name__", "")
    return name if name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152") else None


def stem_width(arch_name: str) -> int:
    """The arch's `conv1` output channels (the base width of its stages)."""
    import torch

    from zoo.backbones import create_backbone

    with torch.device("meta"):  # shapes only: no memory, no init cost
        return create_backbone(arch_name).conv1.out_channels


def torchvision_snippet(spec: ModelSpec, weights_file: str = "model.safetensors") -> str:
    """Python that rebuilds the arch from torchvision alone and loads the weight file into it."""
    arch = get_arch(spec.arch)
    width = stem_width(spec.arch)
    builder = torchvision_builder(spec.arch)
    lines = ["import torch", *(["import torchvision"] if builder else []), "from safetensors.torch import load_file",
             "from torch import nn"]
    if builder is not None:
        lines += ["", f"model = torchvision.models.{builder}(weights=None)"]
    else:  # the narrow CPU arch: torchvision's ResNet-18 layout with base width `width`
        lines += ["from torchvision.models.resnet import BasicBlock, ResNet", "",
                  "model = ResNet(BasicBlock, [2, 2, 2, 2])",
                  f"model.inplanes = {width}"]
    if arch.small_stem:
        lines.append(f"model.conv1 = nn.Conv2d(3, {width}, kernel_size=3, stride={arch.stem_stride}, padding=1, "
                     f"bias=False)")
    elif builder is None:
        lines.append(f"model.conv1 = nn.Conv2d(3, {width}, kernel_size=7, stride=2, padding=3, bias=False)")
    if builder is None:
        lines += [f"model.bn1 = nn.BatchNorm2d({width})",
                  f"model.layer1 = model._make_layer(BasicBlock, {width}, 2)",
                  f"model.layer2 = model._make_layer(BasicBlock, {width * 2}, 2, stride=2)",
                  f"model.layer3 = model._make_layer(BasicBlock, {width * 4}, 2, stride=2)",
                  f"model.layer4 = model._make_layer(BasicBlock, {width * 8}, 2, stride=2)"]
    if not arch.maxpool:
        lines.append("model.maxpool = nn.Identity()")
    lines += ["model.fc = nn.Identity()  # the file holds the backbone only: no fc.* keys",
              f'model.load_state_dict(load_file("{weights_file}"))  # strict: every key matches',
              "model.eval()",
              "",
              f"images = torch.rand(2, 1, {spec.input_size}, {spec.input_size})  # your batch, normalised "
              f"as in the onnxruntime section",
              "images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # grayscale -> 3 channels",
              f"features = model(images)  # [N, {spec.feature_dim}]"]
    return "\n".join(lines)


def onnx_snippet(spec: ModelSpec) -> str:
    """Python that runs model.onnx with onnxruntime, numpy and PIL only, preprocessing included."""
    mean = ", ".join(f"{m:g}" for m in spec.mean)
    std = ", ".join(f"{s:g}" for s in spec.std)
    resample = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "nearest": "NEAREST"}.get(spec.interpolation,
                                                                                        "BILINEAR")
    return f'''import numpy as np
import onnxruntime as ort
from PIL import Image

SIZE, RESIZE = {spec.input_size}, {spec.resize_size}
MEAN = np.array([{mean}], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([{std}], dtype=np.float32).reshape(3, 1, 1)


def preprocess(image: Image.Image) -> np.ndarray:
    """PIL image -> float32 [3, SIZE, SIZE]: resize the short side, centre crop, [0, 1], normalise."""
    image = image.convert("RGB")  # grayscale is repeated to 3 channels
    if image.size != (SIZE, SIZE) or RESIZE != SIZE:
        w, h = image.size
        s = RESIZE / min(w, h)
        image = image.resize((max(RESIZE, int(w * s)), max(RESIZE, int(h * s))), Image.Resampling.{resample})
        left, top = round((image.width - SIZE) / 2), round((image.height - SIZE) / 2)
        image = image.crop((left, top, left + SIZE, top + SIZE))
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (x - MEAN) / STD


session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
image = Image.new("L", ({spec.input_size}, {spec.input_size}))  # replace with your image(s)
batch = np.stack([preprocess(image)])  # [N, 3, SIZE, SIZE]; N is free
features = session.run(["features"], {{"images": batch}})[0]  # [N, {spec.feature_dim}]'''
