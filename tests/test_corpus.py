import json

import pytest

import llm_sae.lm.corpus as corpus
from llm_sae.errors import DataError


def _fake_stdlib(root):
    files = {
        "os.py": "import sys\n",
        "json/__init__.py": "def dumps(x):\n    return str(x)\n",
        "json/decoder.py": "class JSONDecodeError(ValueError):\n    pass\n",
        "test/test_os.py": "import unittest\n",
        "idlelib/editor.py": "x = 1\n",
        "site-packages/numpy/core.py": "y = 2\n",
        "lib2to3/tests/data/bad.py": "def (:\n",
        "encodings/cp1252.py": "table = ()\n",
        "_sysconfigdata__linux.py": "build = {}\n",
        "empty.py": "\n\n",
        "README.txt": "not python\n",
    }
    for i in range(40):
        files[f"pkg/mod{i}.py"] = f"VALUE_{i} = {i}\n"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_list_files_skips_non_library_code_and_is_sorted(tmp_path):
    root = _fake_stdlib(tmp_path)
    files = corpus.list_files(root)
    assert files == sorted(files)
    assert "os.py" in files and "json/decoder.py" in files
    for skipped in ("test/", "idlelib/", "site-packages/", "lib2to3/tests/", "encodings/", "_sysconfigdata"):
        assert not any(f.startswith(skipped) for f in files), skipped
    assert not any(f.endswith(".txt") for f in files)


def test_split_is_a_disjoint_partition_fixed_by_path(tmp_path):
    root = _fake_stdlib(tmp_path)
    train = [d.path for d in corpus.iter_documents("train", root)]
    test = [d.path for d in corpus.iter_documents("test", root)]
    every = [d.path for d in corpus.iter_documents("all", root)]
    assert not set(train) & set(test)
    assert sorted(train + test) == every
    assert "empty.py" not in every  # whitespace-only files carry nothing to learn
    # The split depends on the relative path only, so it survives a move of the root.
    moved = tmp_path / "elsewhere"
    _fake_stdlib(moved)
    assert [d.path for d in corpus.iter_documents("test", moved)] == test


def test_real_stdlib_splits_are_nonempty_disjoint_and_stable():
    files = corpus.list_files()
    test = [f for f in files if corpus.split_of(f) == "test"]
    train = [f for f in files if corpus.split_of(f) == "train"]
    assert len(files) > 100, "this Python should ship its library source"
    assert test and train and not set(test) & set(train)
    assert 0.01 < len(test) / len(files) < 0.15
    assert [f for f in corpus.list_files() if corpus.split_of(f) == "test"] == test
    texts = corpus.load_stdlib_corpus("test")
    assert len(texts) <= len(test) and all(isinstance(t, str) and t.strip() for t in texts)


def test_write_corpus_loads_with_datasets(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    paths = corpus.write_corpus(tmp_path / "out", root=root)
    rows = {s: [json.loads(line) for line in p.read_text().splitlines()] for s, p in paths.items()}
    every = [d.path for d in corpus.iter_documents("all", root)]
    assert sorted(r["path"] for s in rows for r in rows[s]) == every
    assert all(corpus.split_of(r["path"]) == s for s in rows for r in rows[s])
    import datasets

    ds = datasets.load_dataset("json", data_files={s: str(p) for s, p in paths.items()})
    assert ds["train"].num_rows == len(rows["train"])
    assert ds["train"][0]["text"] == rows["train"][0]["text"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        corpus.list_files(tmp_path / "missing")
    with pytest.raises(DataError, match="split"):
        list(corpus.iter_documents("validation", tmp_path))
    with pytest.raises(DataError, match="empty"):
        corpus.load_stdlib_corpus("train", root=tmp_path)
