"""Bad inputs (#30): resume never mixes two runs, tensors are read by one stated rule, and a corpus of bad
inputs fed to the CLI in-process never lets a traceback out, never removes a user's file, reports every
failure (exit 2 and one `zoo: error:` line, or a `.failed` entry for an unreadable image)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.embed import embed
from zoo.errors import EmbedError
from zoo.preprocess import Preprocess
from zoo.shards import embed_to_dir, read_embeddings
from zoo_cli.main import main

sys.path.insert(0, str(Path(__file__).parent))
from make_bad_images import _photo, make_bad_images  # noqa: E402

NAME = "wmse-resnet18_narrow.fmnist"


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return zoo.load(NAME, pretrained=False, device="cpu")


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    """Eager torch, no TorchScript freeze per loaded model: these tests are about inputs, and must stay fast."""
    monkeypatch.setattr("zoo.runners._frozen_graph", lambda model: None)


@pytest.fixture(scope="module")
def model():
    return _model()


def _x(n=10):
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _kill_after_two_shards(out: Path) -> None:
    """What a run killed after its second shard leaves: later markers and the merged files absent."""
    for p in list((out / "shards").glob("shard-*.json"))[:]:
        if int(p.stem.split("-")[1]) >= 2:
            p.unlink()
    for name in ("features.npy", "ids.json"):
        (out / name).unlink(missing_ok=True)


def _cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    argv = [str(a) for a in argv]
    if argv[0] in ("embed", "index"):
        argv.append("--workers=0")  # decode in-process: a worker process costs seconds to start
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def _assert_one_line_error(rc: int, stderr: str, fragment: str = "") -> str:
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("zoo: error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    assert fragment in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------------------------ 1. resume key
def test_resuming_a_folder_with_other_weights_is_refused_naming_weights_and_config_json_is_kept(model, tmp_path):
    out = tmp_path / "emb"
    embed_to_dir(model, _x(), out, shard_size=2, progress=False)
    _kill_after_two_shards(out)
    config, shards = (out / "config.json").read_bytes(), _files(out / "shards")
    with pytest.raises(EmbedError, match="holds a different embedding run .*weights") as err:
        embed_to_dir(_model(seed=1), _x(), out, shard_size=2, progress=False)
    assert "\n" not in str(err.value) and "new --out" in str(err.value)
    assert (out / "config.json").read_bytes() == config and _files(out / "shards") == shards
    embed_to_dir(model, _x(), out, shard_size=2, progress=False)  # the same weights still resume
    assert read_embeddings(out).ids == list(range(10))


def test_resuming_a_folder_with_other_preprocessing_is_refused_naming_preprocess(model, tmp_path):
    out = tmp_path / "emb"
    embed_to_dir(model, _x(), out, shard_size=2, progress=False)
    _kill_after_two_shards(out)
    other = _model()
    other.preprocess = Preprocess(28, 28, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(EmbedError, match="preprocess"):
        embed_to_dir(other, _x(), out, shard_size=2, progress=False)


def test_cli_resume_with_another_seed_is_one_line_and_keeps_the_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.fromarray(_photo(i)).save(images / f"{i}.png")
    out = tmp_path / "emb"
    base = ["embed", NAME, "--untrained", images, "--out", out, "--shard-size", "2", "--no-progress"]
    assert _cli(base + ["--seed", "0"])[0] == 0
    _kill_after_two_shards(out)
    before = _files(out)
    line = _assert_one_line_error(*_cli(base + ["--seed", "1"]), "weights")
    assert "--out" in line and _files(out) == before


def test_a_shard_whose_rows_disagree_with_its_ids_is_refused_naming_the_shard_file(model, tmp_path):
    out = tmp_path / "emb"
    embed_to_dir(model, _x(), out, shard_size=4, progress=False, merge=False)
    npy = out / "shards" / "shard-00001.npy"
    np.save(npy, np.load(npy)[:3])
    with pytest.raises(EmbedError, match="shard-00001.npy holds 3 rows but its .json lists 4 ids") as err:
        read_embeddings(out)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ 3. tensors
@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64])
def test_integer_tensors_are_read_as_0_255_pixel_values_like_uint8(model, dtype):
    x = torch.randint(0, 255, (4, 28, 28))
    want = embed(model, x.to(torch.uint8), progress=False).features
    got = embed(model, x.to(dtype), progress=False).features
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("x,fragment", [
    (torch.rand(2, 28, 28) * 255, "float images must be in [0, 1]"),
    (torch.rand(2, 28, 28) - 0.5, "float images must be in [0, 1]"),
    (torch.full((2, 28, 28), float("nan")), "NaN"),
    (torch.ones(2, 28, 28, dtype=torch.bool), "not an image"),
    (torch.ones(2, 28, 28, dtype=torch.complex64), "not an image"),
    (torch.zeros(3, 0, 0, dtype=torch.uint8), "empty images"),
    (torch.full((2, 28, 28), 300), "0-255 pixel values"),
    (torch.full((2, 28, 28), -1), "0-255 pixel values"),
])
def test_bad_tensors_are_refused_in_one_line(model, x, fragment):
    with pytest.raises(EmbedError) as err:
        embed(model, x, progress=False)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    if "float" in fragment:
        assert "divide by 255" in str(err.value)


@pytest.mark.parametrize("bs", [0, -1, True, 2.5])
def test_a_batch_size_that_is_not_a_positive_int_is_refused_in_one_line(model, bs):
    with pytest.raises(EmbedError, match="batch_size must be a positive int"):
        embed(model, _x(2), batch_size=bs, progress=False)


# ------------------------------------------------------------------------------------------ 5. smaller ones
def test_cli_embed_out_that_is_an_existing_file_is_one_line(tmp_path):
    Image.fromarray(_photo()).save(tmp_path / "a.png")
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    _assert_one_line_error(*_cli(["embed", NAME, "--untrained", tmp_path / "a.png", "--out", target,
                                  "--no-progress"]), "is a file")
    assert target.read_text() == "mine"


def test_a_symlink_loop_in_an_input_folder_is_reported_in_failed(model, tmp_path):
    Image.fromarray(_photo()).save(tmp_path / "good.png")
    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    os.symlink("missing.png", tmp_path / "dangling.png")
    emb = embed(model, tmp_path, progress=False)
    assert emb.ids == [str(tmp_path / "good.png")]
    failed = dict(emb.failed)
    assert set(failed) == {str(tmp_path / "loop.jpg"), str(tmp_path / "dangling.png")}
    assert "symbolic links" in failed[str(tmp_path / "loop.jpg")]


def test_embedding_outputs_have_normal_permissions(model, tmp_path):
    before = os.umask(0o022)
    try:
        embed_to_dir(model, _x(), tmp_path / "emb", shard_size=4, progress=False)
    finally:
        os.umask(before)
    for p in [tmp_path / "emb", *(tmp_path / "emb").rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p


# ------------------------------------------------------------------------------------------ 6. the corpus
def _index_folder(tmp_path: Path) -> Path:
    index = zoo.Index(256, device="cpu", model={"name": NAME, "weights": "untrained", "seed": 0})
    index.add(np.random.default_rng(0).standard_normal((5, 256)).astype(np.float32))
    return index.save(tmp_path / "ix")


def test_cli_bad_input_corpus_never_tracebacks_reports_every_failure_and_removes_nothing(tmp_path):
    bad = tmp_path / "bad"
    expect = make_bad_images(bad)
    os.symlink("loop.png", bad / "loop.png")
    expect["loop.png"] = "symbolic links"
    query = tmp_path / "q.png"
    Image.fromarray(_photo()).save(query)

    # Unreadable images: a `.failed` entry each, with its reason; the user's file in --out is kept.
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = _cli(["embed", NAME, "--untrained", bad, "--out", out, "--no-progress", "--shard-size", "8"])
    assert rc == 0 and "Traceback" not in err, err
    failed = {Path(p).relative_to(bad).as_posix(): reason for p, reason in json.loads((out / "ids.json").read_text())
              ["failed"]}
    assert set(failed) == {k for k, v in expect.items() if v is not None}
    assert all(expect[k] in failed[k] for k in failed), failed
    assert (out / "keep.txt").read_text() == "mine"

    # Errors: exit 2, one `zoo: error:` line, and the folders involved unchanged.
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text('{"model": ')
    zero = tmp_path / "checkpoint.pt"
    zero.write_bytes(b"")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: [unclosed\n  : : bad\n")
    truncated = _index_folder(tmp_path / "t")
    data = (truncated / "index.faiss").read_bytes()
    (truncated / "index.faiss").write_bytes(data[: len(data) // 3])
    edited = _index_folder(tmp_path / "e")
    meta = json.loads((edited / "meta.json").read_text())
    (edited / "meta.json").write_text(json.dumps({**meta, "metric": "l2"}))
    user_index = tmp_path / "build" / "index"
    user_index.mkdir(parents=True)
    (user_index / "holiday.jpg").write_bytes(b"precious")
    good = _index_folder(tmp_path / "g")
    cases = [
        (["embed", NAME, "--untrained", query, "--out", cfg, "--no-progress"], "config.json is damaged"),
        (["embed", NAME, "--untrained", query, "--out", zero, "--no-progress"], "is a file"),
        (["embed", NAME, "--weights", zero, query, "--out", tmp_path / "o1", "--no-progress"], "checkpoint"),
        (["embed", NAME, "--untrained", query, "--out", tmp_path / "o2", "--batch-size", "0", "--no-progress"],
         "batch_size"),
        (["train", recipe], "not valid YAML"),
        (["search", truncated, query], "index.faiss is damaged"),
        (["search", edited, query], "meta.json is damaged"),
        (["search", good, query, "-k", "0"], "k must be a positive int"),
        (["index", "build", NAME, "--untrained", query, "--out", tmp_path / "build", "--no-progress"],
         "not an ssl-zoo index folder"),
    ]
    snapshot = {p: _files(p) if p.is_dir() else p.read_bytes() for p in (cfg, truncated, edited, user_index, zero)}
    for argv, fragment in cases:
        _assert_one_line_error(*_cli(argv), fragment)
    assert snapshot == {p: _files(p) if p.is_dir() else p.read_bytes() for p in snapshot}
