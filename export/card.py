"""The model card (`README.md` of a Hub repository), built with huggingface_hub's ModelCard API.

YAML metadata (library, license, tags, datasets, pipeline tag, model-index of the measured results),
then: how to load it in one line, what it was trained on with which recipe and for how long, the
evaluation table with its protocol, how to use the files without ssl-zoo (torchvision +
safetensors, onnxruntime alone), limits, citation. Every number comes from the checkpoint, the
evaluation's `results.json` or the export's own checks; a metric nobody measured says so. The
training history is the header comment of the recipe file (the measured record of its runs),
shown only when that file still resolves to the recipe the weights were trained with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

from export.checkpoint import METRICS, Results, TrainedCheckpoint
from zoo.backbones import get_arch
from zoo.registry import ModelSpec

NOT_MEASURED = "not measured"

# registry dataset -> (Hub dataset id for the `datasets` metadata, display name, evaluation split)
DATASETS: dict[str, tuple[str, str, str]] = {
    "fashion_mnist": ("zalando-datasets/fashion_mnist", "Fashion-MNIST", "test"),
    "cifar10": ("uoft-cs/cifar10", "CIFAR-10", "test"),
    "cifar100": ("uoft-cs/cifar100", "CIFAR-100", "test"),
    "imagenet-1k": ("ILSVRC/imagenet-1k", "ImageNet-1k", "validation"),
    "tiny-imagenet": ("zh-plus/tiny-imagenet", "Tiny ImageNet", "validation"),
    "stl10": ("stl10", "STL-10", "test"),
    "imagenet-100": ("imagenet-100", "ImageNet-100", "validation"),
}

# recipe `data.dataset` -> registry `dataset`
RECIPE_DATASETS = {"fashion_mnist": "fashion_mnist", "cifar10": "cifar10", "cifar100": "cifar100", "stl10": "stl10",
                   "tiny_imagenet": "tiny-imagenet", "imagenet100": "imagenet-100", "imagenet": "imagenet-1k"}

METHOD_NAMES = {"wmse": "W-MSE", "msbreg": "MSBReg", "equimod-simclr": "EquiMod (SimCLR)",
                "equimod-byol": "EquiMod (BYOL)", "isd": "ISD", "groco": "GroCo", "simclr": "SimCLR", "byol": "BYOL"}

DEFAULT_PROTOCOL = ("Frozen backbone, features of the centre-cropped evaluation view (the model's `preprocess`). "
                    "k-NN: cosine similarity, the train split as the bank and the {split} split as queries; "
                    "'weighted' votes are exp(sim / 0.07) (Wu et al. 2018). Linear probe: a linear classifier on "
                    "the frozen features, trained on the train split, top-1 on the {split} split.")


@dataclass
class ExportFacts:
    """What the export itself measured or wrote, for the card's files section."""

    sha256: str
    weights_dtype: str
    onnx_opset: int
    parity: dict[str, tuple[int, float]]  # input kind -> (number of inputs, max |onnx - torch|)
    weights_bytes: int
    onnx_bytes: int


def dataset_info(spec: ModelSpec) -> tuple[str, str, str]:
    return DATASETS.get(spec.dataset, (spec.dataset, spec.dataset, "test"))


def eval_results(spec: ModelSpec, results: Results) -> list[Any]:
    """One `EvalResult` per measured metric (none for unmeasured ones)."""
    from huggingface_hub import EvalResult

    hub_id, display, split = dataset_info(spec)
    out = []
    for key, description in METRICS.items():
        if key not in results.metrics:
            continue
        knn = key.startswith("knn")
        out.append(EvalResult(
            task_type="image-classification",
            task_name="k-NN classification on frozen features" if knn else "linear probe on frozen features",
            dataset_type=hub_id, dataset_name=display, dataset_split=split,
            metric_type="accuracy", metric_name=f"{description} (%)", metric_config=key,
            metric_value=round(results.metrics[key], 4), verified=False,
        ))
    return out


def transfer_description(key: str) -> str:
    """`linear_10pct` -> "linear probe, 10% of the labels (class-balanced)"; `finetune_100pct` -> "fine-tuning, all labels"."""
    kind, pct = key.rsplit("_", 1)
    share = pct[:-3].replace("p", ".")
    what = "all labels" if float(share) == 100 else f"{share}% of the labels (class-balanced)"
    return f"{'linear probe' if kind == 'linear' else 'fine-tuning'}, {what}"


def _transfer_order(key: str) -> tuple[int, float]:
    kind, pct = key.rsplit("_", 1)
    return (0 if kind == "linear" else 1, float(pct[:-3].replace("p", ".")))


def transfer_section(results: Results, base: Sequence[tuple[str, dict[str, Any]]] = ()) -> str:
    """The card's label-efficient transfer table (each number with its protocol, beside the baselines that
    measured the same key, e.g. the raw-pixel linear probe), or "" when none was measured."""
    if not results.transfer:
        return ""
    base = [(label, m) for label, m in base if any(k in m for k in results.transfer)]
    header = "| protocol | top-1 (%) |" + "".join(f" {label} |" for label, _ in base) + " how it was measured |"
    header += "\n|---|---:|" + "---:|" * len(base) + "---|"
    rows = "\n".join(f"| {transfer_description(k)} | {results.transfer[k]:.2f} |"
                     + "".join(f" {_fmt(m.get(k))} |" for _, m in base)
                     + f" {results.transfer_protocols.get(k, 'protocol not recorded')} |"
                     for k in sorted(results.transfer, key=_transfer_order))
    return f"""
### Label-efficient transfer

Top-1 accuracy (%) with part of the labels (`zoo eval linear --labels`, `zoo eval finetune`; subsets hold the same
number of images per class, drawn with a fixed seed):

{header}
{rows}
"""


def protocol_knn_section(results: Results) -> str:
    """The card's table of k-NN numbers under other projects' protocols, each row naming its protocol and the
    code it reproduces, or "" when none was measured."""
    if not results.protocol_knn:
        return ""
    from zoo.knn import KNN_PROTOCOLS

    by_key = {p.key(k): (p, k) for p in KNN_PROTOCOLS.values() for k in p.ks}
    order = {key: i for i, key in enumerate(by_key)}
    rows = "\n".join(f"| `{key}` | {by_key[key][0].describe(by_key[key][1])} | {results.protocol_knn[key]:.2f} | "
                     f"{by_key[key][0].source} |" for key in sorted(results.protocol_knn, key=order.__getitem__))
    return f"""
### k-NN under other projects' protocols

The same features and splits, scored the way other SSL code bases score k-NN (`zoo eval knn --protocol NAME`), so
numbers can be compared with theirs:

| key | protocol | top-1 (%) | evaluation code it reproduces |
|---|---|---|---|
{rows}
"""


def card_data(spec: ModelSpec, results: Results) -> Any:
    from huggingface_hub import ModelCardData

    hub_id, _, _ = dataset_info(spec)
    tags = ["ssl-zoo", "self-supervised-learning", "image-feature-extraction", spec.method,
            *(["equimod", spec.method.split("-", 1)[1]] if spec.method.startswith("equimod-") else []),
            spec.arch, "resnet", "safetensors", "onnx"]
    evals = eval_results(spec, results)
    return ModelCardData(
        library_name="ssl-zoo", license=spec.license, tags=list(dict.fromkeys(tags)), datasets=[hub_id],
        pipeline_tag="image-feature-extraction", model_name=spec.name,
        eval_results=evals or None, metrics=["accuracy"] if evals else None,
    )


def _fmt(value: float | None, unit: str = "") -> str:
    return NOT_MEASURED if value is None else f"{value:.2f}{unit}"


def _small_input_note(spec: ModelSpec, arch: Any, display: str) -> str:
    """Say plainly what an ImageNet-stem network trained on small images is (and is not)."""
    if arch.small_stem or spec.input_size >= 96:
        return ""
    side = spec.input_size // 4  # stride-2 conv + stride-2 max-pool
    last = max(1, -(-spec.input_size // 32))  # ceil: the last stage's map side at reduction 32
    return (f"\n**What this is:** a {arch.description}, trained on {spec.input_size}-px {display} images "
            f"(the stem leaves {side}x{side} maps after its max-pool, {last}x{last} in the last stage): useful "
            f"for that domain and as a working "
            f"example of the pipeline, **not an ImageNet backbone**. For ImageNet features use a model tagged "
            f"`.in1k`.\n")


def _arxiv(paper: str) -> str | None:
    m = re.search(r"arXiv:(\d{4}\.\d{4,5})", paper)
    return m.group(1) if m else None


def _torchvision_builder(arch_name: str) -> str | None:
    """The torchvision constructor an arch starts from, or None when it is not a stock one."""
    name = getattr(get_arch(arch_name).builder, "__name__", "")
    return name if name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152") else None


def _stem_width(arch_name: str) -> int:
    import torch

    from zoo.backbones import create_backbone

    with torch.device("meta"):  # shapes only: no memory, no init cost
        return create_backbone(arch_name).conv1.out_channels


_PAPER = re.compile(r"^(?P<authors>[^,]+), (?P<title>[^,]+), (?P<venue>[^(;]*?)\s*\(arXiv:(?P<id>\d{4}\.\d{4,5})\)")


def _bibtex(spec: ModelSpec) -> str:
    """A BibTeX entry parsed from the registry's paper line ("Authors, Title, Venue Year (arXiv:ID)")."""
    m = _PAPER.match(spec.paper)
    if not m:
        return ""
    year = re.findall(r"(?:19|20)\d\d", m["venue"])
    authors = m["authors"].replace(" et al.", " and others").replace(" & ", " and ")
    key = re.sub(r"\W", "", m["authors"].split()[0]).lower() + (year[-1] if year else "")
    lines = [f"@article{{{key},", f"  title = {{{m['title']}}},", f"  author = {{{authors}}},",
             f"  journal = {{arXiv preprint arXiv:{m['id']}}},"]
    if re.search(r"[A-Za-z]", m["venue"]):  # a venue, not just a year
        lines.append(f"  note = {{{m['venue']}}},")
    if year:
        lines.append(f"  year = {{{year[-1]}}},")
    return "```bibtex\n" + "\n".join(lines) + "\n}\n```"


def torchvision_snippet(spec: ModelSpec, weights_file: str = "model.safetensors") -> str:
    """Python that rebuilds the arch from torchvision alone and loads the weight file into it."""
    arch = get_arch(spec.arch)
    width = _stem_width(spec.arch)
    builder = _torchvision_builder(spec.arch)
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


def recipe_header(path: str | None) -> str:
    """The `#` comment lines at the top of a recipe file, without their `# ` prefix ("" if none or unreadable)."""
    from training.recipe import resolve_recipe_path

    if not path:
        return ""
    try:
        text = resolve_recipe_path(path).read_text()
    except (OSError, ValueError):
        return ""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines).strip("\n")


def history_section(spec: ModelSpec, checkpoint: TrainedCheckpoint) -> str:
    """The card's "Training history (from the recipe)": the recipe file's header comment, or "" when the file
    is missing, has no header, or no longer resolves to the recipe these weights were trained with (its header
    would then describe other runs)."""
    from training.recipe import config_hash, load_recipe

    header = recipe_header(spec.recipe)
    if not header:
        return ""
    try:
        same = config_hash(load_recipe(spec.recipe)) == checkpoint.recipe_hash
    except (OSError, ValueError, TypeError, KeyError):
        same = False
    if not same:
        return ""
    fence = "````" if "```" in header else "```"
    return f"""
## Training history (from the recipe)

The header comment of `{spec.recipe}`, as committed with the recipe: the measured record
of the runs made with it (the trainer's k-NN monitor per epoch, probes, wall-clock minutes, same-seed reruns).

{fence}text
{header}
{fence}
"""


def build_card(spec: ModelSpec, checkpoint: TrainedCheckpoint, results: Results, facts: ExportFacts) -> Any:
    """The `ModelCard` of an exported model (`card.save(folder / "README.md")`)."""
    from huggingface_hub import ModelCard

    hub_id, display, split = dataset_info(spec)
    method_name = METHOD_NAMES.get(spec.method, spec.method)
    arch = get_arch(spec.arch)
    recipe = checkpoint.recipe
    batch = (recipe.get("data") or {}).get("batch_size")
    trained_on = checkpoint.dataset or spec.dataset
    if RECIPE_DATASETS.get(trained_on) == spec.dataset:
        data_row = f"{display} train split (recipe dataset `{trained_on}`), labels unused"
        pretrained_on = f"**{display}**"
    else:  # e.g. a smoke-test run on synthetic images: say so rather than claim the registry's dataset
        data_row = f"recipe dataset `{trained_on}`, not {display}: these weights are not the registry row's model"
        pretrained_on = f"`{trained_on}` images (not {display})"
    arxiv = _arxiv(spec.paper)
    monitor = checkpoint.monitor_knn
    protocol = results.protocol or DEFAULT_PROTOCOL.format(split=split)

    from zoo.report import baselines

    # The baselines measured by the same code on the same split, beside this model's numbers.
    base = baselines(spec.tag, spec.arch)
    baseline_note = ", beside baselines measured by the same code" if base else ""
    eval_header = "| protocol | this model |" + "".join(f" {label} |" for label, _ in base)
    eval_header += "\n|---|---:|" + "---:|" * len(base)
    eval_rows = "\n".join(
        f"| {description} | {_fmt(results.metrics.get(key))} |" + "".join(f" {_fmt(m.get(key))} |" for _, m in base)
        for key, description in METRICS.items())
    parity_rows = "; ".join(f"{n} {kind} inputs: max abs diff {diff:.2e}" for kind, (n, diff) in facts.parity.items())
    train_time = _fmt(results.train_minutes, " min")
    if results.train_minutes is not None and results.hardware:
        train_time += f" on {results.hardware}"
    recipe_yaml = yaml.safe_dump(recipe, sort_keys=False).rstrip()
    weights_dtype = "fp16 (loads back as fp32)" if facts.weights_dtype == "float16" else "fp32"
    width = _stem_width(spec.arch)
    stem_note = (f"`conv1` is a 3x3 convolution with stride {arch.stem_stride} and padding 1 instead of torchvision's "
                 f"7x7 stride-2 one" if arch.small_stem else "`conv1` is torchvision's 7x7 stride-2 convolution")
    stem_note += "; `maxpool` is kept" if arch.maxpool else "; there is no max-pool (`maxpool = Identity`)"
    if _torchvision_builder(spec.arch) is None:
        stem_note += (f"; the stage widths are {width}-{width * 2}-{width * 4}-{width * 8} (torchvision's ResNet-18 "
                      f"layout at base width {width} instead of 64)")

    body = f"""
# {spec.name}

A **{method_name}** self-supervised backbone: {arch.description}, pretrained on {pretrained_on} without labels
by ssl-zoo. It maps an image to a **{spec.feature_dim}-d** feature vector
(the globally pooled output of the last ResNet stage; the method's projector/predictor heads are not included).
{_small_input_note(spec, arch, display)}
## Load it in one line

```python
import zoo  # pip install ssl-zoo

model = zoo.load("{spec.name}")  # downloads {spec.hub_repo} once, checks its sha256, then works offline
features = model(model.preprocess(pil_image)[None])  # [1, {spec.feature_dim}]
```

Pin a commit of this repository with `zoo.load("{spec.name}", revision="<commit sha>")`; with `HF_HUB_OFFLINE=1`
the Hugging Face cache is used. `model.preprocess` takes a PIL image or a uint8 tensor and returns the normalised
`[3, {spec.input_size}, {spec.input_size}]` input.

## Training

| | |
|---|---|
| method | {method_name}: {spec.paper} |
| data | {data_row} |
| recipe | `{spec.recipe}` in the ssl-zoo repository; resolved-config sha256 `{checkpoint.recipe_hash}` |
| length | {checkpoint.step} optimiser steps, {checkpoint.epoch} epochs, batch {batch if batch is not None else "?"} |
| training time | {train_time} |
| k-NN monitor at the end of training | {_fmt(monitor, " %")} (the trainer's subset estimate, not the evaluation below) |

Reproduce with `zoo train {spec.recipe}`. The resolved recipe this checkpoint was trained with:

<details><summary>recipe</summary>

```yaml
{recipe_yaml}
```

</details>
{history_section(spec, checkpoint)}
## Evaluation

Top-1 accuracy (%) on the {display} {split} split, measured by ssl-zoo's evaluation step{baseline_note}:

{eval_header}
{eval_rows}

Protocol: {protocol}
{protocol_knn_section(results)}{transfer_section(results, base)}
## Files

| file | what |
|---|---|
| `model.safetensors` | backbone weights, {weights_dtype}, {facts.weights_bytes / 1e6:.1f} MB, sha256 `{facts.sha256}` |
| `model.onnx` | the same backbone as ONNX (opset {facts.onnx_opset}, dynamic batch), {facts.onnx_bytes / 1e6:.1f} MB; checked against PyTorch with onnxruntime at export: {parity_rows} |
| `config.json` | the ssl-zoo registry row: arch, feature dim, input size, mean/std, interpolation, method, tag, recipe, sha256, metrics |

## Use without ssl-zoo

### PyTorch: torchvision + safetensors

`model.safetensors` holds torchvision's ResNet state-dict keys (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ...,
`layer4.1.bn2.running_var`) without `fc.*`. Differences from the stock `{_torchvision_builder(spec.arch) or "resnet18"}`: {stem_note}.

```python
{torchvision_snippet(spec)}
```

### onnxruntime alone

Input `images`: float32 `[N, 3, {spec.input_size}, {spec.input_size}]` (NCHW, N free). Preprocessing: resize the
shorter side to {spec.resize_size} px ({spec.interpolation}), centre-crop {spec.input_size} px, scale to [0, 1],
repeat grayscale to 3 channels, subtract mean `{list(spec.mean)}` and divide by std `{list(spec.std)}`.
Output `features`: float32 `[N, {spec.feature_dim}]`.

```python
{onnx_snippet(spec)}
```

## Limitations

- Trained on {display} only ({spec.input_size} px inputs): the features describe that domain; expect weaker
  transfer to other image types, resolutions or colour statistics, and fine-tune or re-train for them.
- Self-supervised features, evaluated with frozen-feature protocols only; no classifier head ships, and the
  numbers above are single runs without error bars.
- {"Weights are stored in fp16: features differ from the fp32 training weights by rounding (about 1e-3 relative). "
   if facts.weights_dtype == "float16" else ""}The ONNX graph is exported at a fixed {spec.input_size} px input side.
- Biases of the pretraining data carry over to the features; not for decisions about people.

## Citation

{spec.paper}.{f" <https://arxiv.org/abs/{arxiv}>" if arxiv else ""}

{_bibtex(spec)}
"""
    return ModelCard(f"---\n{card_data(spec, results).to_yaml()}\n---\n{body}")
