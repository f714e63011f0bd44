"""`zoo convert`: checkpoints laid out as each project's own code writes them -> bit-identical ssl-zoo backbones.

Every layout is built here from a tiny backbone (`resnet18_narrow`, 28 px) wrapped in modules whose
attribute names are the ones the project's code uses (see the `source` of each row of
`zoo.convert_formats.FORMATS`), saved as that code saves it, converted, and loaded back with `zoo.load`.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
from zoo.convert import convert
from zoo.convert_formats import FORMATS, ConversionError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (see conftest.py)

ARCH = "resnet18_narrow"
PROBE = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(7))


def source_backbone(seed: int = 0, arch: str = ARCH) -> nn.Module:
    """A random backbone whose BatchNorm weights and statistics are not the defaults (so BN really travels)."""
    torch.manual_seed(seed)
    model = zoo.create_backbone(arch)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(1000 + seed)
    return model.eval()


def features(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(PROBE)


def mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, d_out))


# ------------------------------------------------------------------------------------------ layouts
# Each builder returns (object to save, torch.save kwargs, the backbone the converted one must equal).
def groco_layout():
    """learning_by_sorting: RegularEncoder(.encoder = torchvision resnet, fc Identity) under DDP; legacy pickle."""
    class RegularEncoder(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.encoder = backbone

    backbone = source_backbone(1)
    encoder = nn.DataParallel(RegularEncoder(backbone))  # DDP's `module.` prefix (DataParallel's on CPU)
    projection = nn.DataParallel(mlp(256, 32))
    state = {"epoch": 99, "step": 1000, "encoder": encoder.state_dict(), "projection": projection.state_dict(),
             "optimizer": torch.optim.SGD(list(encoder.parameters()) + list(projection.parameters()), lr=0.1
                                          ).state_dict(),
             "config": collections.OrderedDict(encoder=collections.OrderedDict(type="RegularEncoder"))}
    return state, {"_use_new_zipfile_serialization": False}, backbone


def wmse_layout():
    """htdt/self-supervised: torch.save(WMSE.state_dict()): model = DataParallel(resnet), head, whitening."""
    class Whitening2d(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(1, n, 1, 1))
            self.register_buffer("running_variance", torch.eye(n))

    class WMSE(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.model = nn.DataParallel(backbone)
            self.head = mlp(256, 8)
            self.whitening = Whitening2d(8)

    backbone = source_backbone(2)
    return WMSE(backbone).state_dict(), {}, backbone


def isd_layout():
    """UMBCvision/ISD train_isd.py: {'opt': Namespace, 'state_dict': ISD (encoder_q/k in DataParallel, predict_q,
    queue), ...}."""
    class ISD(nn.Module):
        def __init__(self, student, teacher):
            super().__init__()
            self.encoder_q, self.encoder_k = student, teacher
            self.predict_q = mlp(256, 256)
            self.register_buffer("queue", torch.randn(64, 256))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

        def data_parallel(self):
            self.encoder_q = nn.DataParallel(self.encoder_q)
            self.encoder_k = nn.DataParallel(self.encoder_k)
            self.predict_q = nn.DataParallel(self.predict_q)

    student, teacher = source_backbone(3), source_backbone(4)
    isd = ISD(student, teacher)
    isd.data_parallel()
    opt = argparse.Namespace(arch="resnet18", queue_size=64, temp=0.02, lr_decay_epochs=[140, 180])
    state = {"opt": opt, "state_dict": isd.state_dict(),
             "optimizer": torch.optim.SGD([p for p in isd.parameters()], lr=0.05).state_dict(), "epoch": 200}
    return state, {}, student


def equimod_layout():
    """ADevillers/EquiMod BYOL branch: {'model': EquiMod (resnet + heads), 'momentum_model': m_resnet, ...}."""
    class EquiMod(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.resnet = backbone
            self.proj_head_inv, self.predictor_inv = mlp(256, 32), mlp(32, 32)
            self.proj_head_eq, self.proj_head_t, self.predictor_eq = mlp(256, 32), mlp(17, 32), mlp(64, 32)

    class MomentumResNet(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.m_resnet = copy.deepcopy(model.resnet)
            self.m_proj_head_inv = copy.deepcopy(model.proj_head_inv)

    backbone = source_backbone(5)
    model = EquiMod(backbone)
    momentum = MomentumResNet(model)
    nn.init.constant_(momentum.m_resnet.conv1.weight, 0.5)  # a different encoder, which must not be the one kept
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    state = {"last_epoch": 299, "log_dir": "runs/equimod_byol", "model": model.state_dict(),
             "momentum_model": momentum.state_dict(), "optimizer_repr": optimizer.state_dict(),
             "warm_up_scheduler_repr": warm.state_dict(), "cosine_scheduler_repr": cosine.state_dict()}
    return state, {}, backbone


def _lightning(module: nn.Module, **extra) -> dict:
    """What PyTorch Lightning's trainer.save_checkpoint writes around a module's state dict."""
    return {"epoch": 399, "global_step": 20000, "pytorch-lightning_version": "2.2.0", "state_dict": module.state_dict(),
            "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 400}}}},
            "callbacks": {"ModelCheckpoint": {"best_model_path": "", "kth_value": torch.tensor(1.0)}},
            "optimizer_states": [torch.optim.SGD(module.parameters(), lr=0.3).state_dict()], "lr_schedulers": [],
            **extra}


def solo_learn_layout():
    """solo-learn BYOL: backbone / momentum_backbone (torchvision resnet, fc Identity), projector, predictor,
    classifier. An ImageNet-stem resnet18: solo-learn's 3x3 (CIFAR) stem pads by 2 and is refused."""
    class BYOL(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.classifier = nn.Linear(256, 10)
            self.momentum_backbone = source_backbone(60)
            self.projector, self.momentum_projector, self.predictor = mlp(256, 32), mlp(256, 32), mlp(32, 32)

    backbone = source_backbone(6, "resnet18")
    return _lightning(BYOL(backbone)), {}, backbone


def lightly_layout():
    """lightly benchmark (imagenet100_benchmark.py): backbone = nn.Sequential(*list(resnet.children())[:-1])."""
    class BYOLModel(nn.Module):
        def __init__(self, resnet):
            super().__init__()
            self.backbone = nn.Sequential(*list(resnet.children())[:-1])  # drops fc: 0 conv1 ... 7 layer4, 8 avgpool
            self.projection_head, self.prediction_head = mlp(256, 32), mlp(32, 32)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)

    backbone = source_backbone(7)
    model = BYOLModel(backbone)
    nn.init.constant_(model.backbone_momentum[0].weight, 0.5)
    return _lightning(model, hyper_parameters={"batch_size_per_device": 256, "num_classes": 100}), {}, backbone


def lightly_named_layout():
    """lightly benchmarks/imagenet/resnet50/dino.py: backbone = resnet (fc Identity), student_backbone, heads."""
    class DINO(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = mlp(256, 32)
            self.student_backbone = source_backbone(80)
            self.student_projection_head = mlp(256, 32)
            self.online_classifier = nn.Sequential(nn.Linear(256, 10))
            self.criterion = nn.Module()
            self.criterion.register_buffer("center", torch.zeros(1, 32))

    backbone = source_backbone(8)
    return _lightning(DINO(backbone)), {}, backbone


def torchvision_layout():
    """A torchvision ResNet's state_dict(): the trunk plus the classifier fc."""
    backbone = source_backbone(9)
    state = {**backbone.state_dict(), "fc.weight": torch.randn(10, 256), "fc.bias": torch.randn(10)}
    return state, {}, backbone


def timm_layout():
    """timm resnet (same trunk names, classifier `fc`), as the Hub's model.safetensors holds it."""
    backbone = source_backbone(10)
    state = {**backbone.state_dict(), "fc.weight": torch.randn(10, 256), "fc.bias": torch.randn(10)}
    return state, {"safetensors": True}, backbone


LAYOUTS = {"groco": (groco_layout, "groco-resnet18_narrow.fmnist"),
           "wmse": (wmse_layout, "wmse-resnet18_narrow.fmnist"),
           "isd": (isd_layout, "isd-resnet18_narrow.fmnist"),
           "equimod": (equimod_layout, "equimod-byol-resnet18_narrow.fmnist"),
           "solo-learn": (solo_learn_layout, None),
           "lightly": (lightly_layout, "byol-resnet18_narrow.fmnist"),
           "lightly-named": (lightly_named_layout, None),
           "torchvision": (torchvision_layout, None),
           "timm": (timm_layout, "simclr-resnet18_narrow.fmnist")}


def any_name(arch: str) -> str:
    """A registry name of `arch` (a converted folder without --name loads under any of them)."""
    return next(n for n, s in zoo.registry.registry().items() if s.arch == arch)


def write_layout(layout: str, folder: Path) -> tuple[Path, nn.Module]:
    obj, kwargs, backbone = LAYOUTS[layout][0]()
    folder.mkdir(parents=True, exist_ok=True)
    if kwargs.pop("safetensors", False):
        from safetensors.torch import save_file

        path = folder / "model.safetensors"
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        path = folder / f"{layout}.ckpt"
        torch.save(obj, path, **kwargs)
    return path, backbone


# ------------------------------------------------------------------------------------------ tests
def test_every_format_row_has_a_layout_test_here():
    assert {layout.split("-named")[0] for layout in LAYOUTS} == set(FORMATS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_converts_to_bit_identical_features_through_zoo_load(layout, tmp_path):
    path, source = write_layout(layout, tmp_path / "src")
    fmt = layout.split("-named")[0]
    name = LAYOUTS[layout][1]
    out = tmp_path / "out"
    result = convert(path, fmt, arch=source.arch, out=out, name=name, verbose=False)

    loaded = zoo.load(name or any_name(source.arch), pretrained=out, device="cpu")
    assert torch.equal(features(loaded), features(source))
    # Every buffer travelled too, BN counters included (nothing filled: all these files have them).
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    assert result.filled == [] and result.kept == len(source.state_dict())
    config = json.loads((out / "config.json").read_text())
    assert config["extra"]["converted_from"]["format"] == fmt
    assert (out / "checkpoint.pt").exists() == (name is not None)


def test_the_kept_encoder_is_the_evaluated_one_not_the_momentum_or_teacher_copy(tmp_path):
    # ISD: student encoder_q, not the teacher encoder_k; lightly: backbone, not backbone_momentum.
    for layout, dropped in (("isd", "encoder_k."), ("lightly", "backbone_momentum.")):
        path, source = write_layout(layout, tmp_path / layout)
        result = convert(path, layout, arch=ARCH, out=tmp_path / f"{layout}-out", verbose=False)
        assert result.dropped[dropped] == len(source.state_dict())
        assert torch.equal(features(zoo.load("wmse-resnet18_narrow.fmnist", pretrained=result.out, device="cpu")),
                           features(source))
        assert "encoder kept:" in "\n".join(result.report())


def test_htdt_byol_checkpoints_keep_model_and_drop_the_target_model_t(tmp_path):
    class BYOL(nn.Module):  # htdt/self-supervised methods/byol.py attribute names
        def __init__(self, online, target):
            super().__init__()
            self.model, self.head = nn.DataParallel(online), mlp(256, 8)
            self.pred = mlp(8, 8)
            self.model_t, self.head_t = nn.DataParallel(target), mlp(256, 8)

    online = source_backbone(11)
    torch.save(BYOL(online, source_backbone(12)).state_dict(), tmp_path / "byol_cifar10_99.pt")
    result = convert(tmp_path / "byol_cifar10_99.pt", "wmse", arch=ARCH, out=tmp_path / "out", verbose=False)
    assert result.dropped["model_t."] == len(online.state_dict())
    assert torch.equal(features(zoo.load("byol-resnet18_narrow.fmnist", pretrained=result.out, device="cpu")),
                       features(online))


CALLS: list[str] = []


def record_call(tag: str) -> str:
    CALLS.append(tag)
    return tag


class Opaque:
    """Pickles as a call to `record_call`: loading it with full unpickling would run that code."""

    def __reduce__(self):
        return record_call, ("unpickled",)


def test_a_checkpoint_that_pickles_a_custom_class_is_refused_with_how_to_resave_it(tmp_path):
    obj, _, _ = isd_layout()
    obj["opt"] = Opaque()
    torch.save(obj, tmp_path / "ckpt_epoch_200.pth")
    with pytest.raises(ConversionError) as err:
        convert(tmp_path / "ckpt_epoch_200.pth", "isd", arch=ARCH, out=tmp_path / "out", verbose=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("refused ")
    assert "test_convert.record_call" in msg and "weights_only=True" in msg
    assert "torch.save(torch.load(path)['state_dict']" in msg  # the format's own way to re-save it
    assert CALLS == [] and not (tmp_path / "out").exists()


def test_unknown_keys_are_listed_and_only_an_explicit_drop_removes_them(tmp_path):
    obj, _, source = wmse_layout()
    obj["knn_bank.features"] = torch.randn(4, 8)
    obj["knn_bank.labels"] = torch.zeros(4)
    torch.save(obj, tmp_path / "wmse.pt")
    with pytest.raises(ConversionError) as err:
        convert(tmp_path / "wmse.pt", "wmse", arch=ARCH, out=tmp_path / "out", verbose=False)
    msg = str(err.value)
    assert "2 key(s) no wmse rule covers: knn_bank.features, knn_bank.labels" in msg and "--drop" in msg
    assert not (tmp_path / "out").exists()

    result = convert(tmp_path / "wmse.pt", "wmse", arch=ARCH, out=tmp_path / "out", drop=["knn_bank."], verbose=False)
    assert result.dropped["knn_bank."] == 2 and "knn_bank.* (2)" in "\n".join(result.report())
    assert torch.equal(features(zoo.load("wmse-resnet18_narrow.fmnist", pretrained=result.out, device="cpu")),
                       features(source))


def test_missing_backbone_keys_are_listed(tmp_path):
    obj, _, _ = wmse_layout()
    del obj["model.module.layer4.1.bn2.weight"], obj["model.module.conv1.weight"]
    torch.save(obj, tmp_path / "wmse.pt")
    with pytest.raises(ConversionError, match=r"2 resnet18_narrow key\(s\) missing: conv1.weight, "
                                              r"layer4.1.bn2.weight"):
        convert(tmp_path / "wmse.pt", "wmse", arch=ARCH, out=tmp_path / "out", verbose=False)


def test_old_torchvision_files_without_bn_counters_are_filled_and_reported(tmp_path):
    obj, _, source = torchvision_layout()
    obj = {k: v for k, v in obj.items() if not k.endswith("num_batches_tracked")}
    torch.save(obj, tmp_path / "resnet.pth")
    result = convert(tmp_path / "resnet.pth", "torchvision", arch=ARCH, out=tmp_path / "out", verbose=False)
    assert len(result.filled) == sum(k.endswith("num_batches_tracked") for k in source.state_dict())
    assert "filled 20 BatchNorm num_batches_tracked" in "\n".join(result.report())
    assert torch.equal(features(zoo.load("wmse-resnet18_narrow.fmnist", pretrained=result.out, device="cpu")),
                       features(source))


def test_a_wrong_arch_names_the_archs_whose_shapes_fit(tmp_path):
    path, _ = write_layout("torchvision", tmp_path / "src")
    with pytest.raises(ConversionError) as err:
        convert(path, "torchvision", arch="resnet18_cifar", out=tmp_path / "out", verbose=False)
    assert "shape mismatch conv1.weight (32, 3, 3, 3) vs (64, 3, 3, 3)" in str(err.value)
    assert "its shapes fit resnet18_narrow" in str(err.value)
    with pytest.raises(ConversionError, match="is arch 'resnet50', not 'resnet18_narrow'"):
        convert(path, "torchvision", arch=ARCH, out=tmp_path / "out", name="groco-resnet50.in1k", verbose=False)


def test_a_converted_folder_is_what_zoo_export_reads_and_exports(tmp_path, monkeypatch):
    from zoo.checkpoint import read_checkpoint
    from export.publish import check_compatible, export_model
    from zoo import registry

    name = "groco-resnet18_narrow.fmnist"
    path, source = write_layout("groco", tmp_path / "src")
    out = convert(path, "groco", out=tmp_path / "converted", name=name, verbose=False).out  # arch from the name
    ckpt = read_checkpoint(out)
    check_compatible(registry.get_spec(name), ckpt)
    assert ckpt.recipe["converted_from"]["format"] == "groco"

    monkeypatch.setattr(registry, "PRETRAINED_JSON", tmp_path / "pretrained.json")
    result = export_model(out, name, out_dir=tmp_path / "cards", update_registry=False)
    exported = zoo.load(name, pretrained=result.folder, device="cpu")
    assert torch.equal(features(exported), features(source))
    assert result.spec.extra["recipe_hash"] == ckpt.recipe_hash


def test_cli_convert_prints_encoder_feature_norm_and_that_no_key_was_unused(tmp_path, capsys):
    from zoo_cli.main import main

    path, source = write_layout("equimod", tmp_path / "src")
    out = tmp_path / "out"
    assert main(["convert", str(path), "--from", "equimod", "--arch", ARCH, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    probe = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        norm = float(source(probe).norm(dim=1).mean())
    assert f"mean L2 norm {norm:.4f}" in printed
    assert "encoder kept: `model.resnet`, the online encoder" in printed
    assert "not read: cosine_scheduler_repr, last_epoch, log_dir, momentum_model" in printed
    assert "0 unused: every key accounted for" in printed

    # Errors are one line on stderr with exit status 2; an existing folder is not overwritten.
    assert main(["convert", str(path), "--from", "equimod", "--arch", ARCH, "--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    shutil.rmtree(out)
    assert main(["convert", str(path), "--from", "groco", "--arch", ARCH, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of 'encoder'" in err and "is it a groco checkpoint" in err

    # zoo.convert is the function whether or not the submodule was imported first (as zoo.embed).
    import zoo.convert as module

    assert callable(zoo.convert) and callable(module)
