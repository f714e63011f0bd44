"""Detection / segmentation backbones on torchvision's detectors, and the detection transfer runner."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

import zoo
from training.detection import load_detection_recipe, run_detection
from training.detection_eval import detection_ap


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (see conftest.py)


def _images_and_boxes(n=2, seed=0):
    """Small generated images with one or two boxes each (sides 112-160 px)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(120, 150), (128, 128), (112, 160)][:n]
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [50.0, 40.0, 100.0, 100.0]][: 1 + i % 2]),
                "labels": torch.tensor([1, 2][: 1 + i % 2])} for i in range(n)]
    return images, targets


def test_faster_rcnn_on_wmse_resnet50_trains_frozen_layers_and_bn_stay_trainable_ones_move():
    shipped = zoo.get_spec("wmse-resnet50").has_weights  # the shipped ResNet-50 when the checkout has it
    backbone = zoo.detection_backbone("wmse-resnet50", pretrained=shipped)
    if shipped:  # its weights and BatchNorm statistics, not a fresh init
        pooled = zoo.load("wmse-resnet50", device="cpu")
        assert torch.equal(backbone.body.conv1.weight, pooled.conv1.weight)
        assert torch.equal(backbone.body.bn1.running_mean, pooled.bn1.running_mean)
    assert isinstance(backbone, torchvision.models.detection.backbone_utils.BackboneWithFPN)
    assert backbone.out_channels == 256
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())  # all BatchNorm frozen
    body = backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    trainable = {n for n, p in body.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("layer2", "layer3", "layer4")) for n in trainable)  # trainable_layers=3
    model = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=160, **backbone.transform_kwargs)
    frozen = {n: t.detach().clone() for n, t in [("conv1", body.conv1.weight), ("layer1", body.layer1[0].conv2.weight),
                                                 ("bn_stem_mean", body.bn1.running_mean),
                                                 ("bn_layer4_var", body.layer4[0].bn1.running_var),
                                                 ("bn_layer4_weight", body.layer4[0].bn1.weight)]}
    moving = {n: t.detach().clone() for n, t in [("layer4", body.layer4[0].conv1.weight),
                                                 ("layer2", body.layer2[0].conv2.weight)]}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    images, targets = _images_and_boxes()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(math.isfinite(v.item()) for v in losses.values())
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    now = {"conv1": body.conv1.weight, "layer1": body.layer1[0].conv2.weight, "bn_stem_mean": body.bn1.running_mean,
           "bn_layer4_var": body.layer4[0].bn1.running_var, "bn_layer4_weight": body.layer4[0].bn1.weight}
    assert all(torch.equal(frozen[n], now[n]) for n in frozen)
    assert not torch.equal(moving["layer4"], body.layer4[0].conv1.weight)
    assert not torch.equal(moving["layer2"], body.layer2[0].conv2.weight)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"} and out[0]["boxes"].shape[1] == 4


def test_detection_backbone_plugs_into_mask_rcnn_and_retinanet():
    images, targets = _images_and_boxes(1)
    backbone = zoo.detection_backbone("wmse-resnet18_narrow.fmnist", pretrained=False, trainable_layers=5)
    assert backbone.transform_kwargs["image_mean"] == [0.2860] * 3  # the model's own normalisation
    mask_rcnn = MaskRCNN(backbone, num_classes=3, min_size=64, max_size=96, **backbone.transform_kwargs).eval()
    with torch.no_grad():
        assert "masks" in mask_rcnn(images)[0]
    retina_backbone = zoo.detection_backbone("wmse-resnet18_narrow.fmnist", pretrained=False, returned_layers=[2, 3, 4],
                                             extra_blocks=LastLevelP6P7(256, 256))
    retinanet = RetinaNet(retina_backbone, num_classes=3, min_size=64, max_size=96,
                          **retina_backbone.transform_kwargs).train()
    losses = retinanet(images, targets)
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(math.isfinite(v.item()) for v in losses.values())


def test_norm_choices_and_trainable_layers():
    sync = zoo.detection_backbone("wmse-resnet18_narrow.fmnist", pretrained=False, norm="sync", trainable_layers=5)
    assert isinstance(sync.body.bn1, nn.SyncBatchNorm) and sync.body.conv1.weight.requires_grad
    plain = zoo.detection_backbone("wmse-resnet18_narrow.fmnist", pretrained=False, norm="bn", trainable_layers=0)
    assert type(plain.body.bn1) is nn.BatchNorm2d
    assert not any(p.requires_grad for p in plain.body.parameters())
    assert all(p.requires_grad for p in plain.fpn.parameters())  # new layers always train
    with pytest.raises(ValueError, match="trainable_layers must be 0-5"):
        zoo.detection_backbone("wmse-resnet18_narrow.fmnist", pretrained=False, trainable_layers=6)
    with pytest.raises(ValueError, match="norm must be one of frozen, sync, bn"):
        zoo.detection_backbone("wmse-resnet18_narrow.fmnist", pretrained=False, norm="group")


def test_frozen_batchnorm_keeps_the_pretrained_statistics_and_outputs():
    torch.manual_seed(0)
    model = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, device="cpu")
    for name, buf in model.named_buffers():  # non-default statistics, so copying them matters
        if name.endswith("running_mean"):
            buf.normal_(0, 0.1)
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = model(x)
        from zoo.detection import freeze_batchnorm

        frozen = freeze_batchnorm(model)
        assert (frozen.train()(x) - expected).abs().max().item() <= 1e-5  # train mode: still the stored stats


def test_fpn_false_returns_one_map_for_a_single_level_detector():
    backbone = zoo.detection_backbone("wmse-resnet18_narrow.fmnist", pretrained=False, fpn=False)
    assert backbone.out_channels == 256
    anchors = AnchorGenerator(sizes=((16, 32, 64),), aspect_ratios=((0.5, 1.0, 2.0),))
    model = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=96, rpn_anchor_generator=anchors,
                       box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), **backbone.transform_kwargs).train()
    images, targets = _images_and_boxes(1)
    assert all(math.isfinite(v.item()) for v in model(images, targets).values())


def test_segmentation_backbone_dilates_like_torchvision_and_feeds_deeplabv3():
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
    from torchvision.models.segmentation.fcn import FCNHead

    from zoo.detection import dilate_stages

    ours = dilate_stages(zoo.load("wmse-resnet50", pretrained=False, device="cpu"))
    reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    geometry = [[(n, m.stride, m.dilation, m.padding) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
                for net in (ours, reference)]
    assert geometry[0] == geometry[1]

    body = zoo.segmentation_backbone("wmse-resnet18_narrow.fmnist", aux=True, pretrained=False)
    assert body.output_stride == 4 and body.out_channels == 256 and body.aux_channels == 128
    model = DeepLabV3(body, DeepLabHead(body.out_channels, 5), FCNHead(body.aux_channels, 5)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out["out"].shape == (2, 5, 32, 32) and out["aux"].shape == (2, 5, 32, 32)


# ------------------------------------------------------------------------------------------ AP
def _det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def _gt(boxes, labels, ignore=None):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "ignore": torch.tensor(ignore or [False] * len(labels))}


def test_ap_is_100_for_exact_boxes_and_ignores_difficult_objects():
    gts = [_gt([[0, 0, 10, 10], [20, 20, 40, 40]], [1, 2], [False, True])]
    exact = [_det([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8], [1, 2])]
    for kind in ("area", "voc07", "coco101"):
        assert detection_ap(exact, gts, num_classes=2, kind=kind) == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}
    # A confident false positive before the hit halves precision at full recall; a duplicate is a false positive.
    worse = [_det([[50, 50, 60, 60], [0, 0, 10, 10], [0, 0, 10, 10]], [0.95, 0.9, 0.85], [1, 1, 1])]
    ap = detection_ap(worse, gts, num_classes=2, kind="area")
    assert ap["AP50"] == pytest.approx(50.0)
    shifted = [_det([[0, 0, 10, 13]], [0.9], [1])]  # IoU 0.77: a hit at 0.5 and 0.75, a miss from 0.8
    ap = detection_ap(shifted, gts, num_classes=2, kind="area")
    assert ap["AP50"] == 100.0 and ap["AP75"] == 100.0 and ap["AP"] == pytest.approx(60.0)


# ------------------------------------------------------------------------------------------ recipes and runner
def test_detection_recipes_carry_moco_schedules_and_ask_for_a_data_root(tmp_path):
    voc = load_detection_recipe("training/recipes/detection/voc-faster-rcnn.yaml")
    assert (voc["schedule"]["max_iter"], voc["schedule"]["steps"], voc["optim"]["lr"], voc["optim"]["batch_size"]) \
        == (24000, [18000, 22000], 0.02, 16)
    assert voc["model"]["norm"] == "sync" and voc["data"]["train"] == ["VOC2007/trainval", "VOC2012/trainval"]
    coco = load_detection_recipe("training/recipes/detection/coco-faster-rcnn.yaml")
    assert (coco["schedule"]["max_iter"], coco["schedule"]["steps"]) == (180000, [120000, 160000])
    with pytest.raises(ValueError, match="data.root"):
        run_detection("training/recipes/detection/voc-faster-rcnn.yaml", ["model.weights=untrained",
                                                                           "model.name=wmse-resnet18_narrow"],
                      out=tmp_path / "run", progress=False)


SMOKE = ["model.name=wmse-resnet18_narrow.fmnist", "model.weights=untrained", "data.dataset=synthetic",
         "data.size=4", "data.test_size=2", "data.image_size=64", "data.workers=0", "optim.batch_size=2",
         "schedule.steps=[1]", "schedule.warmup_iters=1", "model.min_size_train=[64]", "model.min_size_test=64",
         "model.max_size=96", "train.log_every=1", "train.ap=area"]


def test_zoo_transfer_detect_runs_the_voc_recipe_on_generated_boxes_and_resumes(tmp_path):
    from zoo_cli.main import main

    out = tmp_path / "run"
    sets = [a for s in SMOKE + ["schedule.max_iter=2"] for a in ("--set", s)]
    assert main(["transfer", "detect", "training/recipes/detection/voc-faster-rcnn.yaml", "--out", str(out),
                 "--no-progress", *sets]) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in logged] == [1, 2] and all(math.isfinite(r["loss"]) for r in logged)
    assert logged[1]["lr"] == pytest.approx(0.02 * 2 / 16 * 0.1)  # linear scaling, then the step at 1
    results = json.loads((out / "detection_results.json").read_text())
    assert all(0 <= results[k] <= 100 for k in ("AP", "AP50", "AP75")) and results["iterations"] == 2
    again = run_detection("training/recipes/detection/voc-faster-rcnn.yaml",
                          SMOKE + ["schedule.max_iter=3", "train.eval=false"], out=out, progress=False)
    assert again["steps"] == 3 and len(again["losses"]) == 1  # resumed at iteration 2 from checkpoint.pt
