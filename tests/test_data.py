"""Text loading and packing: every source kind, determinism, resume positions, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llm_sae.errors import DataError
from llm_sae.lm.testing import make_text
from llm_sae.lm.text import StreamPos, dataset_spec, iter_documents, pack_contexts


@pytest.fixture(scope="module")
def tok(tiny_gpt2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt2_dir)


def test_every_local_source_kind_gives_the_documents(text_dir, tmp_path):
    docs = make_text()
    assert list(iter_documents(str(text_dir / "docs.jsonl"))) == docs
    assert list(iter_documents(text_dir / "docs.txt")) == ["\n\n".join(docs)]  # a .txt file is one document
    import datasets

    datasets.Dataset.from_dict({"body": docs[:5]}).to_parquet(tmp_path / "a.parquet")
    assert list(iter_documents(tmp_path / "a.parquet", text_column="body")) == docs[:5]
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second")
    (folder / "sub" / "a.txt").write_text("first")  # files sorted by path: b.txt < sub/a.txt
    assert list(iter_documents(folder, streaming=False)) == ["second", "first"]
    assert list(iter_documents(docs[:3])) == docs[:3]
    assert list(iter_documents(lambda: iter(docs[:2]))) == docs[:2]


def test_source_errors_say_what_to_do(text_dir, tmp_path):
    with pytest.raises(DataError, match=r"no column 'content'.*--text-column"):
        list(iter_documents(str(text_dir / "docs.jsonl"), text_column="content"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("x")
    (mixed / "b.jsonl").write_text(json.dumps({"text": "y"}))
    with pytest.raises(DataError, match="mixes file types"):
        list(iter_documents(mixed))
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="holds no"):
        list(iter_documents(tmp_path / "none"))
    with pytest.raises(DataError, match="cannot load dataset 'no-such/dataset-xyz'"):
        list(iter_documents("no-such/dataset-xyz"))
    with pytest.raises(DataError, match="must yield strings"):
        list(iter_documents([1, 2]))
    assert dataset_spec([]) ["name"] == "<python list>"


def test_packing_is_bos_first_fixed_length_and_lossless(tok):
    docs = make_text(30)
    ctxs = list(pack_contexts(docs, tok, 24))
    toks = np.stack([c for c, _ in ctxs])
    assert toks.shape[1] == 24 and (toks[:, 0] == tok.bos_token_id).all()
    eos = tok.eos_token_id
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [eos]]
    body = toks[:, 1:].reshape(-1).tolist()
    assert body == stream[: len(body)]
    assert len(stream) - len(body) < 23  # only the final partial context is dropped


def test_resume_from_any_position_continues_the_same_stream(tok):
    docs = make_text(30)
    ctxs = list(pack_contexts(docs, tok, 16, docs_per_call=7))
    for k in (0, 5, 17, len(ctxs) - 2):
        again = list(pack_contexts(docs, tok, 16, start=ctxs[k][1], docs_per_call=3))
        assert len(again) == len(ctxs) - k - 1
        assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(ctxs[k + 1 :], again, strict=True))
    assert ctxs[-1][1].doc <= 30 and isinstance(ctxs[0][1], StreamPos)
    with pytest.raises(DataError, match="at least 2"):
        list(pack_contexts(docs, tok, 1))
