"""Device paths tested on a CPU-only machine: a tensor subclass behaves like a CUDA tensor where it matters
(`.numpy()` refuses until `.cpu()`), so a host-only step that forgets the copy fails here as on a GPU."""

from __future__ import annotations

import pytest
import torch

import zoo


class DeviceTensor(torch.Tensor):
    """Stands for a tensor on an accelerator: every op keeps the subclass, `.numpy()` refuses, `.cpu()` copies out."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu or getattr(func, "__name__", "") == "cpu":
            return args[0].as_subclass(torch.Tensor).clone()
        return super().__torch_function__(func, types, args, kwargs or {})

    def numpy(self, *args, **kwargs):  # what torch says for a CUDA tensor
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")


class OnDevice(torch.nn.Module):
    """A model whose outputs live 'on the device' (what a model moved to CUDA returns)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.spec, self.preprocess = model.spec, model.preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).as_subclass(DeviceTensor)


def test_device_tensor_stand_in_refuses_numpy_until_copied_to_the_host():
    t = torch.ones(2).as_subclass(DeviceTensor)
    with pytest.raises(TypeError, match="Tensor.cpu"):
        (t * 2).numpy()
    assert (t * 2).cpu().numpy().tolist() == [2.0, 2.0]


def test_precision_check_copies_device_features_to_the_host(tmp_path, monkeypatch):
    from zoo.precision import check_precision

    monkeypatch.setenv("SSL_ZOO_CACHE", str(tmp_path))
    model = OnDevice(zoo.load("equimod-byol-resnet18_narrow.fmnist", device="cpu"))
    entry = check_precision(model, "bf16", force=True, sizes=(200, 100), verbose=False)
    assert entry["n_queries"] == 100 and isinstance(entry["accepted"], bool)


def test_embed_copies_device_features_to_the_host():
    model = OnDevice(zoo.load("equimod-byol-resnet18_narrow.fmnist", device="cpu"))
    emb = zoo.embed(model, torch.zeros(3, 28, 28, dtype=torch.uint8), progress=False)
    assert type(emb.features) is torch.Tensor and emb.features.numpy().shape == (3, 256)


def test_evaluation_and_feature_maps_copy_device_features_to_the_host():
    from zoo.eval import evaluate_model

    model = OnDevice(zoo.load("equimod-byol-resnet18_narrow.fmnist", device="cpu"))
    res = evaluate_model(model, limit_train=300, limit_test=100, progress=False)
    assert 0 <= res["knn_k20"] <= 100 and 0 <= res["linear"] <= 100
    emb = zoo.embed(model.model, torch.zeros(2, 28, 28, dtype=torch.uint8), layer="layer3", pool="gem",
                    progress=False)
    assert emb.features.shape[0] == 2
