"""`zoo convert`: preprocessing and identity in config.json, wrapper prefixes, --strip / --keep, and the layouts
of older solo-learn, lightly's DINO example and solo-learn's CIFAR stem (keys as each project's code names them)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import zoo
from test_convert import ARCH, _lightning, any_name, features, mlp, source_backbone
from zoo.convert import convert
from zoo.convert_formats import ConversionError
from zoo_cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGENET_MEAN = (0.485, 0.456, 0.406)


def _converted_features(out, arch: str = ARCH) -> torch.Tensor:
    return features(zoo.load(any_name(arch), pretrained=out, device="cpu"))


# ------------------------------------------------------------------------------------------ 1. preprocessing
def test_converted_torchvision_resnet50_preprocesses_a_photo_with_imagenet_settings_and_keeps_its_features(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet50().eval()
    torch.save(source.state_dict(), tmp_path / "resnet50.pth")
    convert(tmp_path / "resnet50.pth", "torchvision", arch="resnet50", out=tmp_path / "out", verbose=False)

    loaded = zoo.load("wmse-resnet50", pretrained=tmp_path / "out", device="cpu")  # default tag: fmnist weights
    photo = Image.fromarray(torch.randint(0, 256, (480, 640, 3), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(1)).numpy())
    x = loaded.preprocess(photo)
    assert x.shape == (3, 224, 224)
    assert (loaded.spec.mean, loaded.spec.std) == (IMAGENET_MEAN, (0.229, 0.224, 0.225))
    assert (loaded.spec.resize_size, loaded.spec.interpolation) == (256, "bilinear")
    assert loaded.spec.metrics == {} and loaded.spec.train_minutes is None and loaded.spec.recipe == ""
    assert loaded.spec.name == "wmse-resnet50"
    source.fc = nn.Identity()  # the classifier is what conversion drops
    with torch.no_grad():
        assert torch.equal(loaded(x[None]), source(x[None]))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["arch"] == "resnet50" and config["input_size"] == 224
    assert config["extra"]["converted_from"]["format"] == "torchvision"
    assert len(config["extra"]["converted_from"]["sha256"]) == 64


def test_timm_defaults_and_arch_datasets_set_the_preprocessing(tmp_path):
    torch.manual_seed(0)
    state = {**torchvision.models.resnet18().state_dict()}
    torch.save(state, tmp_path / "timm.pth")
    result = convert(tmp_path / "timm.pth", "timm", arch="resnet18", out=tmp_path / "timm", verbose=False)
    assert result.preprocessing == dict(input_size=224, resize_size=235, mean=list(IMAGENET_MEAN),
                                        std=[0.229, 0.224, 0.225], interpolation="bicubic", tag="in1k",
                                        dataset="imagenet-1k")
    loaded = zoo.load("isd-resnet18", pretrained=tmp_path / "timm", device="cpu")
    assert (loaded.spec.name, loaded.spec.tag, loaded.spec.dataset) == ("isd-resnet18", "in1k", "imagenet-1k")
    cifar = source_backbone(1, "resnet18_cifar").state_dict()
    torch.save({"model": {f"resnet.{k}": v for k, v in cifar.items()}}, tmp_path / "equimod.pt")
    result = convert(tmp_path / "equimod.pt", "equimod", arch="resnet18_cifar", out=tmp_path / "eq", verbose=False)
    assert result.preprocessing["input_size"] == 32 and result.preprocessing["mean"] == [0.4914, 0.4822, 0.4465]


def test_preprocessing_flags_override_the_registry_row_and_the_loaded_spec_says_so(tmp_path):
    from test_convert import write_layout

    path, source = write_layout("groco", tmp_path / "src")
    name = "groco-resnet18_narrow.fmnist"
    convert(path, "groco", out=tmp_path / "out", name=name, mean=(0.5, 0.5, 0.5), input_size=24, verbose=False)
    loaded = zoo.load(name, pretrained=tmp_path / "out", device="cpu")
    assert loaded.spec.mean == (0.5, 0.5, 0.5) and loaded.spec.input_size == 24 and loaded.spec.resize_size == 24
    assert loaded.spec.std == zoo.get_spec(name).std and loaded.spec.metrics == {}
    assert "overridden: input_size, mean" in loaded.spec.extra["converted_from"]["preprocessing"]
    assert torch.equal(features(loaded), features(source))


# ------------------------------------------------------------------------------------------ 2. wrapper prefixes
class Lit(nn.Module):
    """A LightningModule holding `self.model = ...`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


def dino_benchmark(backbone: nn.Module) -> nn.Module:
    """lightly benchmarks/imagenet/resnet50/dino.py names: backbone (teacher), student_backbone, heads."""
    module = nn.Module()
    module.backbone, module.projection_head = backbone, mlp(256, 32)
    module.student_backbone, module.student_projection_head = source_backbone(80), mlp(256, 32)
    return module


WRAPS = {
    "module.": (lambda m: nn.DataParallel(m), {"module.": 1}),
    "_orig_mod.": (lambda m: torch.compile(m), {"_orig_mod.": 1}),
    "model.": (lambda m: Lit(m), {"model.": 1}),
    "module._orig_mod.": (lambda m: nn.DataParallel(torch.compile(m)), {"module.": 1, "_orig_mod.": 1}),
    "model.module.": (lambda m: Lit(nn.DataParallel(m)), {"model.": 1, "module.": 1}),
}


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_wrapper_prefixes_are_stripped_in_any_nesting_and_reported(wrap, tmp_path):
    backbone = source_backbone(3)
    module = WRAPS[wrap][0](dino_benchmark(backbone))
    torch.save({"state_dict": module.state_dict()}, tmp_path / "x.ckpt")
    result = convert(tmp_path / "x.ckpt", "lightly", arch=ARCH, out=tmp_path / "out", verbose=False)
    n = len(module.state_dict())
    assert result.stripped == {p: n for p in WRAPS[wrap][1]}
    assert torch.equal(_converted_features(tmp_path / "out"), features(backbone))


def test_a_compiled_backbone_inside_the_module_loses_its_orig_mod_level(tmp_path):
    backbone = source_backbone(4)
    module = dino_benchmark(torch.compile(backbone))  # backbone._orig_mod.conv1.weight
    torch.save({"state_dict": module.state_dict()}, tmp_path / "x.ckpt")
    result = convert(tmp_path / "x.ckpt", "lightly", arch=ARCH, out=tmp_path / "out", verbose=False)
    assert result.stripped == {"backbone._orig_mod.": len(backbone.state_dict())}
    assert "prefixes stripped: backbone._orig_mod. (" in "\n".join(result.report())
    assert torch.equal(_converted_features(tmp_path / "out"), features(backbone))


def test_model_is_not_a_wrapper_where_it_has_siblings_or_is_the_formats_own_name(tmp_path):
    module = nn.Module()
    module.model, module.head = source_backbone(5), mlp(256, 8)  # a method's part named `model`, not a wrapper
    torch.save(module.state_dict(), tmp_path / "x.pt")
    with pytest.raises(ConversionError, match=r"keys start with `model.`: pass --keep model.") as err:
        convert(tmp_path / "x.pt", "torchvision", arch=ARCH, out=tmp_path / "out", verbose=False)
    assert "\n" not in str(err.value)
    # W-MSE names its encoder `model`: its row does not strip it even when it is the only child.
    torch.save(Lit(nn.DataParallel(source_backbone(5))).state_dict(), tmp_path / "wmse.pt")
    result = convert(tmp_path / "wmse.pt", "wmse", arch=ARCH, out=tmp_path / "wmse", verbose=False)
    assert result.stripped == {"model.module.": len(source_backbone(5).state_dict())}


# ------------------------------------------------------------------------------------------ --strip / --keep
def test_strip_and_keep_take_the_backbone_from_under_a_prefix_and_errors_name_them(tmp_path):
    backbone = source_backbone(6)
    net = nn.Module()
    net.net, net.aux = backbone, mlp(256, 8)
    torch.save({f"{k}": v for k, v in net.state_dict().items() if not k.startswith("aux.")}, tmp_path / "a.pt")
    with pytest.raises(ConversionError, match=r"keys start with `net.`: pass --strip net. or --keep net."):
        convert(tmp_path / "a.pt", "timm", arch=ARCH, out=tmp_path / "out", verbose=False)
    result = convert(tmp_path / "a.pt", "timm", arch=ARCH, out=tmp_path / "s", strip=["net."], verbose=False)
    assert result.stripped == {"--strip net.": len(backbone.state_dict())}
    assert torch.equal(_converted_features(tmp_path / "s"), features(backbone))

    torch.save(net.state_dict(), tmp_path / "b.pt")  # aux.* too: --keep drops everything outside net.
    assert main(["convert", str(tmp_path / "b.pt"), "--from", "timm", "--arch", ARCH, "--out", str(tmp_path / "k"),
                 "--keep", "net."]) == 0
    assert torch.equal(_converted_features(tmp_path / "k"), features(backbone))
    with pytest.raises(ConversionError, match=r"no key starts with 'nett.'.*fix --keep nett."):
        convert(tmp_path / "b.pt", "timm", arch=ARCH, out=tmp_path / "x", keep="nett.", verbose=False)


# ------------------------------------------------------------------------------------------ 3. layouts
def test_solo_learn_up_to_1_0_4_encoder_naming_keeps_encoder_and_drops_momentum_encoder(tmp_path):
    encoder = source_backbone(7, "resnet18")
    module = nn.Module()  # solo-learn 1.0.2 BYOL: encoder / momentum_encoder, projector, predictor, classifier
    module.encoder, module.momentum_encoder = encoder, source_backbone(70)
    module.projector, module.momentum_projector, module.predictor = mlp(512, 32), mlp(512, 32), mlp(32, 32)
    module.classifier = nn.Linear(512, 10)
    torch.save(_lightning(module), tmp_path / "byol.ckpt")
    result = convert(tmp_path / "byol.ckpt", "solo-learn", arch="resnet18", out=tmp_path / "out", verbose=False)
    assert result.encoder.startswith("`encoder.`: solo-learn <= 1.0.4")
    assert result.dropped["momentum_encoder."] == len(module.momentum_encoder.state_dict())
    assert torch.equal(_converted_features(tmp_path / "out", "resnet18"), features(encoder))


def dino_example() -> tuple[nn.Module, nn.Module, nn.Module]:
    """lightly examples/pytorch_lightning/dino.py: student/teacher backbone = Sequential(resnet children[:-1])."""
    student, teacher = source_backbone(8), source_backbone(9)
    module = nn.Module()
    module.student_backbone = nn.Sequential(*list(student.children())[:-1])
    module.student_head = mlp(256, 32)
    module.teacher_backbone = nn.Sequential(*list(teacher.children())[:-1])
    module.teacher_head = copy.deepcopy(module.student_head)
    module.criterion = nn.Module()
    module.criterion.register_buffer("center", torch.zeros(1, 32))
    return module, student, teacher


def test_lightly_dino_example_keeps_the_teacher_by_default_and_the_student_with_keep(tmp_path, capsys):
    module, student, teacher = dino_example()
    torch.save(_lightning(module), tmp_path / "dino.ckpt")
    assert main(["convert", str(tmp_path / "dino.ckpt"), "--from", "lightly", "--arch", ARCH,
                 "--out", str(tmp_path / "t")]) == 0
    assert "encoder kept: `teacher_backbone.`: lightly's DINO example" in capsys.readouterr().out
    assert torch.equal(_converted_features(tmp_path / "t"), features(teacher))

    assert main(["convert", str(tmp_path / "dino.ckpt"), "--from", "lightly", "--arch", ARCH,
                 "--out", str(tmp_path / "s"), "--keep", "student_backbone."]) == 0
    printed = capsys.readouterr().out
    assert "encoder kept: `student_backbone.` (--keep)" in printed and "not under --keep student_backbone.*" in printed
    assert torch.equal(_converted_features(tmp_path / "s"), features(student))


# ------------------------------------------------------------------------------------------ 4. CIFAR stem
def test_solo_learn_cifar_stem_with_padding_2_is_refused_through_the_cli(tmp_path, capsys):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    resnet.fc, resnet.maxpool = nn.Identity(), nn.Identity()
    resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)  # solo/methods/base.py, cifar
    module = nn.Module()
    module.backbone, module.projector = resnet, mlp(512, 32)
    torch.save(_lightning(module), tmp_path / "simclr.ckpt")
    assert main(["convert", str(tmp_path / "simclr.ckpt"), "--from", "solo-learn", "--arch", "resnet18_cifar",
                 "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "padding=2" in err and "pads by 1" in err
    assert not (tmp_path / "out").exists()
