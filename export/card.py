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
from typing import Any

import yaml

from export.card_sections import fmt, history_section, protocol_knn_section, transfer_section
from zoo.checkpoint import METRICS, Results, TrainedCheckpoint
from export.snippets import onnx_snippet, stem_width, torchvision_builder, torchvision_snippet
from zoo.backbones import get_arch
from zoo.registry import METHODS, DatasetRow, ModelSpec, UnknownDatasetError, get_dataset, get_method

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
    onnx_in_folder: bool = True  # False: left out of the folder (kept out of git), built on first use


def _onnx_where(facts: ExportFacts) -> str:
    if facts.onnx_in_folder:
        return "in this folder"
    return ("built on first use: not in ssl-zoo's git folder (kept out of git for its size); `zoo publish` builds it "
            "from `model.safetensors`, with the same check, before uploading, so the Hub repository has it; "
            "`zoo.embed(model, x, backend=\"onnxruntime\")` builds it in the local cache")


def _dataset_row(spec: ModelSpec) -> DatasetRow | None:
    try:
        return get_dataset(spec.dataset)
    except UnknownDatasetError:  # a config.json naming a dataset no row knows: shown by its name
        return None


def dataset_info(spec: ModelSpec) -> tuple[str, str, str]:
    """(Hub dataset id, display name, evaluation split) of the model's pretraining dataset."""
    row = _dataset_row(spec)
    return (row.hub_id, row.display, row.eval_split) if row else (spec.dataset, spec.dataset, "test")


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


def build_card(spec: ModelSpec, checkpoint: TrainedCheckpoint, results: Results, facts: ExportFacts) -> Any:
    """The `ModelCard` of an exported model (`card.save(folder / "README.md")`)."""
    from huggingface_hub import ModelCard

    hub_id, display, split = dataset_info(spec)
    method_name = get_method(spec.method).display if spec.method in METHODS else spec.method
    arch = get_arch(spec.arch)
    recipe = checkpoint.recipe
    batch = (recipe.get("data") or {}).get("batch_size")
    trained_on = checkpoint.dataset or spec.dataset
    row = _dataset_row(spec)
    if row is not None and row.trainer == trained_on:
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
        f"| {description} | {fmt(results.metrics.get(key))} |" + "".join(f" {fmt(m.get(key))} |" for _, m in base)
        for key, description in METRICS.items())
    parity_rows = "; ".join(f"{n} {kind} inputs: max abs diff {diff:.2e}" for kind, (n, diff) in facts.parity.items())
    train_time = fmt(results.train_minutes, " min")
    if results.train_minutes is not None and results.hardware:
        train_time += f" on {results.hardware}"
    recipe_yaml = yaml.safe_dump(recipe, sort_keys=False).rstrip()
    if results.measured_on:
        measured_on_note = f"Measured on: {results.measured_on}."
    else:  # older results.json files did not say; do not let the reader assume the shipped bytes
        measured_on_note = "Measured on: not recorded in its results.json (the field is newer than these numbers)."
    if facts.weights_dtype == "float16":
        measured_on_note += " The shipped `model.safetensors` is fp16: its features differ from fp32 ones by rounding."
    weights_dtype = "fp16 (loads back as fp32)" if facts.weights_dtype == "float16" else "fp32"
    width = stem_width(spec.arch)
    stem_note = (f"`conv1` is a 3x3 convolution with stride {arch.stem_stride} and padding 1 instead of torchvision's "
                 f"7x7 stride-2 one" if arch.small_stem else "`conv1` is torchvision's 7x7 stride-2 convolution")
    stem_note += "; `maxpool` is kept" if arch.maxpool else "; there is no max-pool (`maxpool = Identity`)"
    if torchvision_builder(spec.arch) is None:
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
| k-NN monitor at the end of training | {fmt(monitor, " %")} (the trainer's subset estimate, not the evaluation below) |

Reproduce with `zoo train {spec.recipe}`. The resolved recipe this checkpoint was trained with:

<details><summary>recipe</summary>

```yaml
{recipe_yaml}
```

</details>
{history_section(spec, checkpoint)}
## Evaluation

Top-1 accuracy (%) on the {display} {split} split, measured by ssl-zoo's evaluation step{baseline_note}.
{measured_on_note}

{eval_header}
{eval_rows}

Protocol: {protocol}
{protocol_knn_section(results)}{transfer_section(results, base)}
## Files

| file | where | what |
|---|---|---|
| `model.safetensors` | in this folder | backbone weights, {weights_dtype}, {facts.weights_bytes / 1e6:.1f} MB, sha256 `{facts.sha256}` |
| `model.onnx` | {_onnx_where(facts)} | the same backbone as ONNX (opset {facts.onnx_opset}, dynamic batch), {facts.onnx_bytes / 1e6:.1f} MB; checked against PyTorch with onnxruntime at export: {parity_rows} |
| `config.json` | in this folder | the ssl-zoo registry row: arch, feature dim, input size, mean/std, interpolation, method, tag, recipe, sha256, metrics |

## Use without ssl-zoo

### PyTorch: torchvision + safetensors

`model.safetensors` holds torchvision's ResNet state-dict keys (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ...,
`layer4.1.bn2.running_var`) without `fc.*`. Differences from the stock `{torchvision_builder(spec.arch) or "resnet18"}`: {stem_note}.

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
