"""zoo.embed: input kinds, the bad-input corpus, sharded embedding (kill + resume), torchrun."""

from __future__ import annotations

import json
import re
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.embed import embed
from zoo.errors import EmbedError
from zoo.images import read_image
from zoo.shards import embed_to_dir, read_embeddings

sys.path.insert(0, str(Path(__file__).parent))
from make_bad_images import _photo, make_bad_images  # noqa: E402

NAME = "wmse-resnet18_narrow.fmnist"
REPO = Path(__file__).resolve().parents[1]


def _model():
    torch.manual_seed(0)  # untrained weights, identical in every process that seeds the same way
    return zoo.load(NAME, pretrained=False, device="cpu")


@pytest.fixture(scope="module")
def model():
    return _model()


def _one(model, image) -> torch.Tensor:
    return embed(model, [image], progress=False).features[0]


def test_bad_input_corpus_is_embedded_or_skipped_with_reasons_and_no_valid_image_is_lost(model, tmp_path):
    expect = make_bad_images(tmp_path)
    emb = embed(model, tmp_path, progress=False, num_workers=2, batch_size=4)
    rel = lambda p: Path(p).relative_to(tmp_path).as_posix()  # noqa: E731
    assert sorted(rel(i) for i in emb.ids) == sorted(k for k, v in expect.items() if v is None)
    failed = {rel(i): reason for i, reason in emb.failed}
    assert set(failed) == {k for k, v in expect.items() if v is not None}
    for name, fragment in failed.items():
        assert expect[name] in failed[name], (name, failed[name])
        assert "\n" not in failed[name]
    assert emb.features.shape == (len(emb.ids), 256) and torch.isfinite(emb.features).all()
    feats = {rel(i): f for i, f in zip(emb.ids, emb.features)}

    def close(a, b):
        return torch.allclose(a, b, atol=1e-5)

    photo = Image.fromarray(_photo())
    assert close(feats["rgb.png"], _one(model, photo))
    # EXIF orientation 6 applied: same as decoding without EXIF and rotating by hand.
    raw = Image.open(tmp_path / "exif_rotated.jpg").convert("RGB")
    assert read_image(tmp_path / "exif_rotated.jpg").size == (raw.size[1], raw.size[0])
    assert close(feats["exif_rotated.jpg"], _one(model, raw.transpose(Image.Transpose.ROTATE_270)))
    assert not close(feats["exif_rotated.jpg"], _one(model, raw))
    # 16-bit values scaled (not clipped): the 16-bit copy of gray.png embeds exactly like it.
    assert close(feats["gray16.png"], feats["gray.png"])
    assert close(feats["rgb16.png"], _one(model, Image.fromarray(_photo(2))))
    # Fully transparent pixels become the white background, whatever RGB they hide.
    assert close(feats["transparent.png"], _one(model, Image.new("RGB", photo.size, (255, 255, 255))))
    assert close(feats["rgba.png"], feats["rgb.png"])  # opaque RGBA == its RGB
    assert close(feats["cmyk.jpg"], _one(model, Image.open(tmp_path / "cmyk.jpg").convert("RGB")))


def test_tensor_pil_paths_folder_and_dataset_inputs_give_the_same_features_and_ids(model, tmp_path):
    from zoo.datasets import load_fashion_mnist

    x, y = load_fashion_mnist("test")
    x, y = x[:40], y[:40]
    paths = []
    for i, img in enumerate(x):
        p = tmp_path / f"{i:03d}.png"
        Image.fromarray(img.numpy()).save(p)
        paths.append(str(p))
    by_tensor = embed(model, x, progress=False, batch_size=16)
    assert by_tensor.ids == list(range(40)) and by_tensor.features.dtype == torch.float32
    by_pil = embed(model, [Image.fromarray(a.numpy()) for a in x], progress=False, batch_size=16)
    by_paths = embed(model, paths, progress=False, batch_size=16, num_workers=1)
    by_folder = embed(model, tmp_path, progress=False, batch_size=16)
    ds = torch.utils.data.TensorDataset(x[:, None], y)
    by_dataset = embed(model, ds, progress=False, batch_size=16)
    assert by_paths.ids == paths and by_folder.ids == paths
    for other in (by_pil, by_paths, by_folder, by_dataset):
        assert torch.allclose(other.features, by_tensor.features, atol=1e-5)
    assert torch.equal(by_dataset.labels, y) and by_tensor.labels is None
    # The fp32 path is the model itself: normalised features of model(preprocess(x)).
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(model.preprocess(x[:, None])), dim=1)
    assert torch.allclose(by_tensor.features, ref, atol=1e-5)
    raw = embed(model, x[:4], progress=False, normalize=False).features
    assert not torch.allclose(raw.norm(dim=1), torch.ones(4))


def test_embed_rejects_unknown_backend_precision_and_input_kind_in_one_line(model):
    with pytest.raises(EmbedError, match="backend must be one of"):
        embed(model, torch.zeros(1, 28, 28, dtype=torch.uint8), backend="tensorrt", progress=False)
    with pytest.raises(EmbedError, match="precision must be one of"):
        embed(model, torch.zeros(1, 28, 28, dtype=torch.uint8), precision="fp8", progress=False)
    with pytest.raises(EmbedError, match="bf16.*backend='torch'"):
        embed(model, torch.zeros(1, 28, 28, dtype=torch.uint8), backend="onnxruntime", precision="bf16",
              progress=False)
    with pytest.raises(EmbedError, match="cannot embed a dict"):
        embed(model, {"a": 1}, progress=False)


# ------------------------------------------------------------------------------------------ shards
_SHARD_SCRIPT = textwrap.dedent("""
    import sys, time, torch, zoo
    from zoo.shards import embed_to_dir
    out, delay = sys.argv[1], float(sys.argv[2])

    class Slow(torch.utils.data.Dataset):  # slow enough to be killed mid-run
        def __init__(self, x):
            self.x = x
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            time.sleep(delay)
            return self.x[i]

    torch.manual_seed(0)
    model = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, device="cpu")
    x = torch.randint(0, 256, (96, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    embed_to_dir(model, Slow(x), out, shard_size=16, batch_size=8, num_workers=0, progress=False)
""")


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_killed_sharded_embedding_resumes_at_last_finished_shard_with_the_same_result(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_SHARD_SCRIPT)
    out = tmp_path / "emb"
    proc = subprocess.Popen([sys.executable, str(script), str(out), "0.03"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    index = out / "index.json"
    while time.time() < deadline:
        if index.exists() and json.loads(index.read_text())["finished"] >= 1:
            break
        if proc.poll() is not None:
            pytest.fail(f"embedding ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = json.loads(index.read_text())
    assert not killed["complete"] and 1 <= killed["finished"] < killed["n_shards"] == 6
    first = out / "shards" / "shard-00000.npy"
    stamp = first.stat().st_mtime_ns
    subprocess.run([sys.executable, str(script), str(out), "0"], env=_env(), check=True, timeout=120,
                   capture_output=True)
    assert first.stat().st_mtime_ns == stamp  # finished shards are not embedded again
    resumed = read_embeddings(out)
    final = json.loads(index.read_text())
    assert final["complete"] and final["merged"] and final["finished"] == 6

    # The uninterrupted run, in this process: same seed, same generated corpus.
    x = torch.randint(0, 256, (96, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    embed_to_dir(_model(), torch.utils.data.TensorDataset(x), tmp_path / "full", shard_size=16, batch_size=8,
                 progress=False)
    full = read_embeddings(tmp_path / "full")
    assert resumed.ids == full.ids == list(range(96))
    assert torch.allclose(resumed.features, full.features, atol=1e-6)


def test_resuming_into_a_folder_of_another_run_is_refused(model, tmp_path):
    x = torch.zeros(10, 28, 28, dtype=torch.uint8)
    embed_to_dir(model, x, tmp_path, shard_size=4, progress=False)
    with pytest.raises(EmbedError, match="holds a different embedding run"):
        embed_to_dir(model, x, tmp_path, shard_size=5, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_embed_their_own_slices_and_merge_to_the_single_process_result(model, tmp_path):
    corpus = tmp_path / "images"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(22):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(corpus / f"{i:02d}.png")
    (corpus / "broken.png").write_bytes(b"not a png")
    script = tmp_path / "dist.py"
    script.write_text(textwrap.dedent("""
        import sys, torch, torch.distributed as dist, zoo
        from zoo.shards import embed_to_dir
        torch.manual_seed(int(sys.argv[3]))  # ranks differ on purpose: rank 0's weights are broadcast
        model = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, device="cpu")
        embed_to_dir(model, sys.argv[1], sys.argv[2], shard_size=5, batch_size=4, num_workers=0, progress=False)
    """))
    out = tmp_path / "emb"
    wrapper = tmp_path / "rank_seed.py"  # seed = rank for rank 1, 0 for rank 0
    wrapper.write_text(f"import os, runpy, sys\nsys.argv = [{str(script)!r}, sys.argv[1], sys.argv[2], "
                       f"os.environ['RANK']]\nrunpy.run_path({str(script)!r}, run_name='__main__')\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", str(wrapper), str(corpus), str(out)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["n_shards"] == 5 and index["failed"] == 1
    ranks = {json.loads((out / "shards" / f"{s['name']}.json").read_text())["rank"] for s in index["shards"]}
    assert ranks == {0, 1}
    merged = read_embeddings(out)
    single = embed(_model(), corpus, progress=False)  # seed 0 = rank 0's weights
    assert merged.ids == single.ids and len(merged.ids) == 22
    assert torch.allclose(merged.features, single.features, atol=1e-5)
    assert [Path(p).name for p, _ in merged.failed] == ["broken.png"]


def test_fmnist_inputs_take_the_first_n_images_and_a_bad_n_is_one_line_naming_the_syntax(tmp_path, capsys):
    from zoo_cli.common import resolve_inputs
    from zoo_cli.main import main

    first = resolve_inputs(["fmnist:test:5"])
    assert len(first) == 5 and first.ids == [f"fmnist:test:{i}" for i in range(5)]
    assert first[0][0].shape == (1, 28, 28) and first[0][1] == int(first.labels[0])
    for bad in ("fmnist:test:-5", "fmnist:test:five", "fmnist:val", "fmnist:test:5:6"):
        with pytest.raises(EmbedError, match=re.escape("write fmnist:train, fmnist:test or fmnist:<train|test>:N")):
            resolve_inputs([bad])
    out = tmp_path / "emb"
    assert main(["embed", NAME, "--untrained", "fmnist:test:-5", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fmnist:<train|test>:N" in err and not out.exists()
