"""`zoo publish` -> Hub -> `zoo.load`, through the real huggingface_hub client and the local test Hub.

Nothing here reaches huggingface.co: `tests/hub_server.py` serves on 127.0.0.1 (port 0) and the
client's endpoint, cache and offline switch are monkeypatched (they are read at import otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import zoo
from zoo import registry
from zoo.hub import sha256_file

from hub_server import HubServer
from test_export import NAME, RESULTS, isolate, make_checkpoint

REPO = f"ssl-zoo/{NAME}"  # the registry row's hub_repo: where zoo.load pulls from
FILES = ["README.md", "config.json", "model.onnx", "model.safetensors"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One exported folder (registry row updated in a temp pretrained.json) for the whole module."""
    root = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root)
        ckpt = make_checkpoint(root / "run", results=RESULTS)
        from export.publish import export_model

        folder = export_model(ckpt.parent, NAME).folder
        empty = root / "no_model_cards"  # loads below must go through the Hub, not model_cards/
        empty.mkdir()
        mp.setenv("SSL_ZOO_MODEL_CARDS", str(empty))
        yield {"folder": folder, "ckpt": ckpt, "root": root}
    registry.reload()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh test Hub and an empty HF cache; the client pointed at them, online, without any token."""
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))  # not in ~
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet"))  # hf_xet (upload pipeline) logs there, not in ~
    server = HubServer().start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield server
    server.stop()
    assert server.unhandled == [], f"the client called endpoints the test server lacks: {server.unhandled}"


def _features(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(6, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(x)


def _cached_weights(cache: Path) -> Path:
    (blob,) = [p for p in (cache / f"models--{REPO.replace('/', '--')}" / "snapshots").glob("*/model.safetensors")]
    return blob.resolve()  # the blob behind the snapshot symlink


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def test_publish_pull_into_an_empty_cache_and_load_bit_for_bit_then_offline(exported, hub, monkeypatch, tmp_path):
    from huggingface_hub import HfApi, ModelCard, constants, snapshot_download

    from export.publish import publish_folder

    folder = exported["folder"]
    result = publish_folder(folder, REPO)
    assert result.repo_id == REPO and len(result.commit) == 40
    info = HfApi().model_info(REPO)
    assert info.sha == result.commit
    assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", *FILES]
    for name in FILES:
        assert hub.file_bytes(REPO, name) == (folder / name).read_bytes(), name

    local = zoo.load(NAME, pretrained=folder, device="cpu")
    pulled = zoo.load(NAME, device="cpu")  # empty cache, no model_cards/: hf_hub_download + sha256 check
    assert torch.equal(_features(pulled), _features(local))
    assert any(r.endswith("/resolve/main/model.safetensors") for r in hub.requests if r.startswith("GET"))

    snapshot = Path(snapshot_download(REPO))  # the whole repository, as users of other tools get it
    assert sorted(p.name for p in snapshot.iterdir()) == [".gitattributes", *FILES]
    for name in FILES:
        assert (snapshot / name).read_bytes() == (folder / name).read_bytes(), name
    card = ModelCard.load(REPO)
    assert {r.metric_config: r.metric_value for r in card.data.eval_results}["knn_k20"] == RESULTS["knn_k20"]

    # Offline: the cache alone, not one request to the server.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    hub.stop()
    offline = zoo.load(NAME, device="cpu")
    assert torch.equal(_features(offline), _features(local))
    assert len(hub.requests) == seen


def test_flipped_byte_on_the_hub_is_refused_with_a_sha256_message(exported, hub):
    from export.publish import publish_folder

    publish_folder(exported["folder"], REPO)
    hub.corrupt(REPO, "model.safetensors")  # same size, same ETag: only the sha256 can tell
    with pytest.raises(zoo.IntegrityError, match=r"sha256 .* not the registry row of .*'s .*re-publish") as e:
        zoo.load(NAME, device="cpu")
    assert "\n" not in str(e.value)
    hub.corrupt(REPO, "model.safetensors", on=False)
    healed = zoo.load(NAME, device="cpu")  # the bad cached copy is downloaded again
    assert torch.equal(_features(healed), _features(zoo.load(NAME, pretrained=exported["folder"], device="cpu")))


def test_flipped_byte_in_the_cache_is_refused_offline_and_refetched_online(exported, hub, monkeypatch):
    from huggingface_hub import constants

    from export.publish import publish_folder

    publish_folder(exported["folder"], REPO)
    good = zoo.load(NAME, device="cpu")
    blob = _cached_weights(Path(constants.HF_HUB_CACHE))
    _flip_byte(blob)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(zoo.IntegrityError, match=r"cached .* is corrupt: sha256 .*unset HF_HUB_OFFLINE"):
        zoo.load(NAME, device="cpu")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    again = zoo.load(NAME, device="cpu")
    assert torch.equal(_features(again), _features(good))
    assert sha256_file(_cached_weights(Path(constants.HF_HUB_CACHE))) == zoo.get_spec(NAME).sha256


def test_revision_pins_a_commit_and_a_branch(exported, hub, tmp_path):
    from huggingface_hub import HfApi

    from export.checkpoint import ExportError
    from export.publish import publish_folder
    from zoo.safetensors_io import save_backbone

    first = publish_folder(exported["folder"], REPO).commit
    # A second commit on main with other weights (and their own config.json sha256).
    other = zoo.create_backbone("resnet18_narrow")
    changed = tmp_path / "changed"
    shutil.copytree(exported["folder"], changed)
    save_backbone(other.state_dict(), changed / "model.safetensors")
    config = json.loads((changed / "config.json").read_text())
    config["sha256"] = sha256_file(changed / "model.safetensors")
    (changed / "config.json").write_text(json.dumps(config))
    second = publish_folder(changed, REPO).commit
    assert second != first and HfApi().model_info(REPO).sha == second

    original = _features(zoo.load(NAME, pretrained=exported["folder"], device="cpu"))
    assert torch.equal(_features(zoo.load(NAME, device="cpu", revision=first)), original)
    assert torch.equal(_features(zoo.load(NAME, device="cpu", revision=second)), _features(other.eval()))
    # main now differs from the registry row: the row's sha256 refuses it.
    with pytest.raises(zoo.IntegrityError, match="sha256"):
        zoo.load(NAME, device="cpu")

    branch = publish_folder(exported["folder"], REPO, revision="v1").commit
    assert torch.equal(_features(zoo.load(NAME, device="cpu", revision="v1")), original)
    assert {b.name: b.target_commit for b in HfApi().list_repo_refs(REPO).branches}["v1"] == branch
    with pytest.raises(zoo.WeightsNotAvailableError, match="revision 'nope' does not exist"):
        zoo.load(NAME, device="cpu", revision="nope")
    with pytest.raises(ValueError, match="pretrained=True"):
        zoo.load(NAME, pretrained=exported["folder"], revision=first)
    with pytest.raises(ExportError, match="branch name"):
        publish_folder(exported["folder"], REPO, revision=first)


def test_publish_refuses_a_tampered_or_incomplete_folder(exported, hub, tmp_path):
    from export.checkpoint import ExportError
    from export.publish import publish_folder

    bad = tmp_path / "bad"
    shutil.copytree(exported["folder"], bad)
    _flip_byte(bad / "model.safetensors")
    with pytest.raises(ExportError, match="does not match the sha256 in config.json; export the model again"):
        publish_folder(bad, REPO)
    (bad / "model.onnx").unlink()
    with pytest.raises(ExportError, match="lacks model.onnx"):
        publish_folder(bad, REPO)
    with pytest.raises(ExportError, match="ORG/NAME"):
        publish_folder(exported["folder"], "no-namespace")
    assert not any(r.startswith("POST /api/repos/create") for r in hub.requests)  # refused before any upload


def test_cli_publish_prints_the_commit_and_never_the_token(exported, hub, monkeypatch, capsys, caplog):
    from zoo_cli.export import register

    token = "hf_TESTtokenTHATmustNEVERbePRINTED"  # a fake one, only ever sent to 127.0.0.1
    monkeypatch.setenv("HF_TOKEN", token)
    parser = argparse.ArgumentParser(prog="zoo")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["publish", str(exported["folder"]), "--repo-id", "someone/private-copy", "--private"])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "published" in out.out and "someone/private-copy at commit" in out.out
    assert token not in out.out + out.err + caplog.text
    assert "zoo.load" in caplog.text  # warned: zoo.load(NAME) pulls from ssl-zoo/NAME, not this repo
    assert hub.state.repos[("model", "someone/private-copy")].private


def test_publish_offline_or_without_network_is_one_line_naming_the_fix(exported, hub, monkeypatch):
    from huggingface_hub import constants

    from export.publish import publish_folder
    from zoo.errors import ZooError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ZooError, match="HF_HUB_OFFLINE=1 is set; unset it") as info:
        publish_folder(exported["folder"], REPO)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ZooError, match="cannot be reached .*check your network or HF_ENDPOINT") as info:
        publish_folder(exported["folder"], REPO, endpoint="http://127.0.0.1:9")  # nothing listens on port 9
    assert "\n" not in str(info.value) and info.value.__cause__ is None


def test_load_without_a_name_says_what_a_name_is():
    with pytest.raises(TypeError, match="needs a model name such as"):
        zoo.load(None)


def test_publish_builds_the_onnx_an_export_left_to_first_use_and_uploads_every_card_file(hub, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from export.publish import export_model, publish_folder

    isolate(monkeypatch, tmp_path / "cards")
    ckpt = make_checkpoint(tmp_path / "run", results={"knn_k20": 71.25})
    folder = export_model(ckpt.parent, NAME, onnx_in_folder=False).folder
    full = export_model(ckpt.parent, NAME, out_dir=tmp_path / "full", update_registry=False).folder
    publish_folder(folder, REPO)
    assert sorted(s.rfilename for s in HfApi().model_info(REPO).siblings) == [".gitattributes", *FILES]
    assert hub.file_bytes(REPO, "model.onnx") == (full / "model.onnx").read_bytes()  # the export's own bytes
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
