"""zoo.Index safety (#30): save never removes a user's files, load refuses a folder whose files disagree,
ids and k are checked at the call that passes them."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from zoo.index import Index, IndexUsageError


def _data(n=40, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _index(metric="cosine", n=40, ids=None):
    index = Index(8, metric=metric, device="cpu")
    index.add(_data(n), ids)
    return index


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


# ------------------------------------------------------------------------------------------------ save
def test_save_into_a_folder_of_user_files_is_refused_and_removes_nothing(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(IndexUsageError, match="not an ssl-zoo index folder") as err:
        _index().save(folder)
    assert "overwrite=True" in _one_line(err)
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_save_with_overwrite_writes_the_index_and_keeps_files_that_are_not_its_own(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "holiday.jpg").write_bytes(b"precious")
    (folder / "sub" / "x.txt").write_text("kept")
    index = _index()
    index.save(folder, overwrite=True)
    assert (folder / "holiday.jpg").read_bytes() == b"precious" and (folder / "sub" / "x.txt").read_text() == "kept"
    assert Index.load(folder).ntotal == 40
    # Saving again over what is now an index folder (with foreign files) needs no overwrite and keeps them too.
    labelled = Index(8, device="cpu")
    labelled.add(_data(10), [f"p{i}" for i in range(10)], labels=list(range(10)))
    labelled.save(folder)
    _index(n=5).save(folder)  # no labels this time: the previous labels.json is the index's own, removed
    assert not (folder / "labels.json").exists() and not (folder / "ids.json").exists()
    assert Index.load(folder).ntotal == 5 and (folder / "holiday.jpg").exists() and (folder / "sub" / "x.txt").exists()


def test_save_into_a_new_or_empty_folder_and_over_an_index_folder_needs_no_overwrite(tmp_path):
    (tmp_path / "empty").mkdir()
    _index().save(tmp_path / "empty")
    _index(n=7).save(tmp_path / "empty")
    _index().save(tmp_path / "new" / "deeper")
    assert Index.load(tmp_path / "empty").ntotal == 7 and Index.load(tmp_path / "new" / "deeper").ntotal == 40


def test_save_to_an_existing_file_path_is_refused_in_one_line(tmp_path):
    path = tmp_path / "index.bin"
    path.write_bytes(b"user data")
    with pytest.raises(IndexUsageError, match="is a file") as err:
        _index().save(path)
    _one_line(err)
    assert path.read_bytes() == b"user data"


def test_saved_index_folder_and_files_have_normal_permissions(tmp_path):
    before = os.umask(0o022)
    try:
        _index().save(tmp_path / "ix")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "ix").stat().st_mode) == 0o755
    for f in (tmp_path / "ix").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


# ------------------------------------------------------------------------------------------------ load
def _saved(tmp_path, metric="cosine"):
    folder = tmp_path / "ix"
    _index(metric).save(folder)
    return folder


def _edit_meta(folder, **changes):
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("metric,edited", [("cosine", "l2"), ("l2", "cosine")])
def test_load_refuses_a_meta_json_whose_metric_disagrees_with_index_faiss(tmp_path, metric, edited):
    folder = _saved(tmp_path, metric)
    _edit_meta(folder, metric=edited)
    with pytest.raises(IndexUsageError, match="meta.json is damaged .*metric") as err:
        Index.load(folder)
    _one_line(err)


@pytest.mark.parametrize("field,value,fragment", [("dim", 16, "dim 16 but index.faiss holds 8-d"),
                                                  ("ntotal", 41, "ntotal 41 but index.faiss holds 40")])
def test_load_refuses_a_meta_json_whose_dim_or_count_disagrees_with_index_faiss(tmp_path, field, value, fragment):
    folder = _saved(tmp_path)
    _edit_meta(folder, **{field: value})
    with pytest.raises(IndexUsageError, match=fragment) as err:
        Index.load(folder)
    assert str(folder / "meta.json") in _one_line(err)


def test_load_names_a_truncated_index_faiss(tmp_path):
    folder = _saved(tmp_path)
    data = (folder / "index.faiss").read_bytes()
    (folder / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexUsageError, match="index.faiss is damaged") as err:
        Index.load(folder)
    _one_line(err)


@pytest.mark.parametrize("name,content", [("meta.json", '{"dim": 8, "metric": '), ("meta.json", "[1, 2]"),
                                          ("ids.json", "[broken")])
def test_load_names_a_malformed_json_file(tmp_path, name, content):
    folder = tmp_path / "ix"
    index = Index(8, device="cpu")
    index.add(_data(), [f"p{i}" for i in range(40)])
    index.save(folder)
    (folder / name).write_text(content)
    with pytest.raises(IndexUsageError) as err:
        Index.load(folder)
    assert f"{folder / name} is damaged" in _one_line(err)


# ------------------------------------------------------------------------------------------------ ids and k
def test_add_refuses_an_id_beyond_int64_in_one_line():
    index = Index(8, device="cpu")
    with pytest.raises(IndexUsageError, match="does not fit in int64") as err:
        index.add(_data(2), [1, 2 ** 70])
    _one_line(err)
    assert index.ntotal == 0


def test_add_refuses_a_string_as_ids_instead_of_splitting_it_into_characters():
    index = Index(8, device="cpu")
    with pytest.raises(IndexUsageError, match="single str") as err:
        index.add(_data(2), ids="ab")
    _one_line(err)
    assert index.ntotal == 0


def test_add_refuses_duplicate_ids_within_one_add_and_against_the_index():
    index = Index(8, device="cpu")
    with pytest.raises(IndexUsageError, match="id 'a' appears twice") as err:
        index.add(_data(3), ["a", "b", "a"])
    _one_line(err)
    index.add(_data(2), ["a", "b"])
    with pytest.raises(IndexUsageError, match="id 'b' is already in the index"):
        index.add(_data(2, seed=1), ["c", "b"])
    positional = _index(n=3)  # default ids 0..2, then a user id that repeats one of them
    with pytest.raises(IndexUsageError, match="id 1 is already in the index"):
        positional.add(_data(1), [1])
    assert index.ntotal == 2 and positional.ntotal == 3


def test_search_refuses_a_k_that_is_not_a_positive_int_in_one_line():
    index = _index()
    for k in (True, False, 2.0, "3", 0, -1, None):  # True first: Python counts bools as ints
        with pytest.raises(IndexUsageError, match="k must be a positive int") as err:
            index.search(_data(1), k=k)
        _one_line(err)


def test_from_shards_names_a_malformed_index_json(tmp_path):
    (tmp_path / "index.json").write_text('{"complete": tru')
    with pytest.raises(IndexUsageError) as err:
        Index.from_shards(tmp_path, progress=False)
    assert f"{tmp_path / 'index.json'} is damaged" in _one_line(err)
