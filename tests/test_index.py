"""zoo.Index: kinds, ids, one-line errors, save/load round trip, building from shards; bench index smoke."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import zoo
from zoo.index import Index, IndexUsageError


def _data(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "sq8", "IVF{nlist},SQ8"])
def test_every_kind_finds_each_vector_itself_first_with_string_ids(kind):
    x = _data()
    ids = [f"img/{i}.jpg" for i in range(len(x))]
    index = Index(16, metric="cosine", kind=kind, device="cpu")
    index.add(x, ids)
    if index.nlist:
        index.nprobe = index.nlist  # exhaustive: the test is about ids, not recall
    scores, found = index.search(x[:20], k=3)
    assert found.shape == (20, 3) and found.dtype == object
    assert list(found[:, 0]) == ids[:20]
    assert np.allclose(scores[:, 0], 1.0, atol=0.02) and (np.diff(scores, axis=1) <= 1e-6).all()


def test_l2_metric_returns_squared_distances_and_int_ids_as_int64():
    x = np.array([[0, 0], [3, 4], [1, 0]], np.float32)
    index = Index(2, metric="l2", device="cpu")
    index.add(x, [10, 20, 30])
    scores, ids = index.search(np.array([[0, 0]], np.float32), k=3)
    assert ids.dtype == np.int64 and ids.tolist() == [[10, 30, 20]]
    assert np.allclose(scores, [[0, 1, 25]])


def test_cosine_index_accepts_torch_tensors_and_default_ids_are_positions():
    x = torch.randn(50, 8)
    index = zoo.Index(8)
    index.add(x[:25])
    index.add(x[25:])
    _, ids = index.search(x[30:31], k=1)
    assert ids.tolist() == [[30]] and len(index) == 50


def test_index_errors_are_one_line_and_name_the_fix():
    index = Index(8, device="cpu")
    cases = [
        (lambda: index.search(_data(2, 8), k=1), "index is empty"),
        (lambda: index.add(_data(5, 4)), "dimension 4 but the index holds 8-d"),
        (lambda: index.add(np.full((3, 8), np.nan, np.float32)), "3 of the vectors contain NaN or inf"),
        (lambda: index.add(_data(5, 8), ids=[1, 2, 3]), "got 5 vectors but 3 ids"),
        (lambda: index.add(_data(2, 8), ids=[object(), 1]), "ids must be ints or strings"),
        (lambda: Index(8, metric="dot"), "metric must be"),
        (lambda: Index(0), "dim must be a positive int"),
    ]
    for call, fragment in cases:
        with pytest.raises(IndexUsageError) as err:
            call()
        assert fragment in str(err.value) and "\n" not in str(err.value)
    index.add(_data(5, 8))
    with pytest.raises(IndexUsageError, match="k=6 but the index holds 5 vectors; ask for k <= 5"):
        index.search(_data(1, 8), k=6)
    with pytest.raises(IndexUsageError, match="queries have dimension 3"):
        index.search(_data(1, 3), k=1)
    with pytest.raises(IndexUsageError, match="NaN"):
        index.search(np.full((1, 8), np.inf, np.float32), k=1)
    with pytest.raises(IndexUsageError, match="FAISS cannot build"):
        Index(8, kind="NotAFactory").add(_data(5, 8))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "sq8"])
def test_save_load_round_trip_keeps_results_ids_labels_and_model(tmp_path, kind):
    x = _data(400, 16)
    index = Index(16, kind=kind, device="cpu", model={"name": "wmse-resnet18_narrow.fmnist", "weights": "untrained"})
    index.add(x, [f"p{i}" for i in range(400)], labels=[i % 3 for i in range(400)])
    before = index.search(x[:10], k=5)
    index.save(tmp_path / "ix")
    (tmp_path / "ix" / "notes.txt").write_text("x")  # a second save replaces the index's files, keeps others
    index.save(tmp_path / "ix")
    assert (tmp_path / "ix" / "notes.txt").read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    loaded = Index.load(tmp_path / "ix")
    after = loaded.search(x[:10], k=5)
    assert np.array_equal(before[1], after[1]) and np.allclose(before[0], after[0])
    assert loaded.model["name"] == "wmse-resnet18_narrow.fmnist" and loaded.factory == index.factory
    assert loaded.labels_of(["p4", "p5"]) == [1, 2] and loaded.nprobe == index.nprobe
    meta = json.loads((tmp_path / "ix" / "meta.json").read_text())
    assert meta["ntotal"] == 400 and meta["dim"] == 16
    with pytest.raises(IndexUsageError, match="not an ssl-zoo index folder"):
        Index.load(tmp_path)


def test_index_built_from_shards_equals_index_built_from_all_vectors(tmp_path):
    from zoo.shards import embed_to_dir, read_embeddings

    torch.manual_seed(0)
    model = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, device="cpu")
    x = torch.randint(0, 256, (90, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    embed_to_dir(model, x, tmp_path / "emb", shard_size=20, progress=False, merge=False)
    from_shards = Index.from_shards(tmp_path / "emb", kind="ivf", progress=False)
    emb = read_embeddings(tmp_path / "emb")
    direct = Index(256, kind="ivf", device="cpu")
    direct.add(emb.features, emb.ids)
    assert from_shards.ntotal == 90 and from_shards.ids == list(range(90))
    assert from_shards.model == "wmse-resnet18_narrow.fmnist"
    a, b = from_shards.search(emb.features[:5], k=4), direct.search(emb.features[:5], k=4)
    assert np.array_equal(a[1], b[1])
    with pytest.raises(IndexUsageError, match="has no index.json"):
        Index.from_shards(tmp_path)


def test_bench_index_smoke_prints_every_figure(capsys):
    from zoo_cli.bench.index import bench_index

    res = bench_index(exact_n=2000, exact_dim=32, queries=20, k=5, ann_n=4000, ann_dim=16, ann_queries=20,
                      repeats=1, matmul_size=256)
    out = capsys.readouterr().out
    for fragment in ("FAISS IndexFlatIP", "torch matmul + topk", "of matmul limit", "HNSW32", "SQ8",
                     "B/vector", "goal:"):
        assert fragment in out
    assert res["exact"]["faiss_s"] > 0 and len(res["approximate"]) == 12
