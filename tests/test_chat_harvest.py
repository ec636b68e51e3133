"""Harvest of conversation data through the model's own chat template."""

from __future__ import annotations

import json

import pytest
import torch

from llm_sae.errors import DataError
from llm_sae.harvest.config import HarvestConfig
from llm_sae.harvest.run import harvest
from llm_sae.lm.text import chat_renderer, iter_documents, template_special_ids
from llm_sae.store.store import open_store

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_gpt2_dir):
    """tiny_gpt2 with ChatML special tokens and template (embeddings grown to fit)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("models") / "tiny_chat"
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def conversations(n=40):
    return [[{"role": "user", "content": f"def f{i}(x):\n    return x + {i}"},
             {"role": "assistant", "content": f"class Point{i}:\n    pass"}] for i in range(n)]


def test_chat_harvest_renders_the_template_and_leaves_its_tokens_out(chat_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert {start, end} <= set(template_special_ids(tok))
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations()))
    d = harvest(HarvestConfig(model=str(chat_model_dir), hook=["blocks.0.hook_resid_post"],
                              dataset=str(path), chat_template=True, tokens=200, out=str(tmp_path / "s"),
                              context_length=32, batch_size=4, device="cpu", progress=False))
    st = open_store(d["blocks.0.hook_resid_post"])
    assert st.n_rows == 200 and st.manifest["dataset"]["text_column"] == "messages"
    assert st.manifest["harvest"]["chat_template"] is True
    tokens = st.token_ids(0, 200)
    # The contexts hold the template's tokens; the rows never do.
    ctx = st.sequence_tokens(torch.unique(st.positions(0, 200)[:, 0]))
    assert (ctx == start).any() and (ctx == end).any()
    assert not set(tokens.tolist()) & {start, end}
    assert "user" in tok.decode(ctx[0])  # the role names are the template's text
    # eval's downstream contexts continue the same conversations, rendered the same way.
    from llm_sae.evaluate.config import EvalConfig
    from llm_sae.evaluate.downstream import eval_contexts

    more, info = eval_contexts(st, tok, EvalConfig(sae=["unused"], store=str(st.path), n_contexts=2))
    assert len(more) == 2 and (more == start).any() and info["source"].endswith("after the harvested text")


def test_chat_template_errors_are_one_line_and_early(tiny_gpt2_dir, tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    with pytest.raises(DataError, match="no chat template"):
        chat_renderer(plain)
    plain.chat_template = CHATML
    docs = iter_documents(["not a conversation"], render=chat_renderer(plain))
    with pytest.raises(DataError, match="role, content"):
        next(docs)
    with pytest.raises(DataError, match="no chat template"):
        harvest(HarvestConfig(model=str(tiny_gpt2_dir), hook=["blocks.0.hook_resid_post"],
                              dataset=conversations(), chat_template=True, tokens=50,
                              out=str(tmp_path / "x"), context_length=32, device="cpu", progress=False))
    assert not (tmp_path / "x").exists()
