"""Chat backends: any OpenAI-compatible chat-completions endpoint, or a local HF causal LM.

The endpoint client is the ``openai`` package, the field's own client for this protocol
(vLLM, Ollama, llama.cpp's server and OpenAI all speak it), rather than a hand-written
one: it owns the wire format, typed errors and ``usage``, and its retries are the ones
people already trust: 408/409/429/5xx, timeouts and dropped connections are retried with
exponential back-off and jitter (0.5 s doubling to 8 s), and a server's ``Retry-After``
or ``retry-after-ms`` wins. On top we add what a long run needs: one semaphore that bounds
the requests in flight whatever the caller's thread count, token counts from every answer,
and one-line errors that say what to fix.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from llm_sae.errors import ExplainError

#: HTTP statuses the openai client retries: rate limits and the server's transient failures.
RETRY_STATUS = frozenset({408, 409, 429})

Message = dict[str, str]

__all__ = ["ChatBackend", "ChatClient", "ExplainError", "HFChatBackend", "Message", "Reply", "Usage", "base_url"]


@dataclass
class Usage:
    """Tokens and requests spent; ``cost`` turns tokens into money at the given prices."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, prompt: int, completion: int, requests: int = 1, retries: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += int(prompt)
            self.completion_tokens += int(completion)
            self.requests += int(requests)
            self.retries += int(retries)

    def cost(self, price_in: float, price_out: float) -> float:
        """USD, with prices per million prompt / completion tokens."""
        return (self.prompt_tokens * price_in + self.completion_tokens * price_out) / 1e6

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "requests": self.requests, "retries": self.retries}


@dataclass
class Reply:
    """One model answer and what it cost."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0


class ChatBackend(Protocol):
    """What the explainer and the scorers need from a chat model."""

    model: str
    usage: Usage

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float) -> Reply: ...


def base_url(endpoint: str) -> str:
    """The API base the openai client wants: ``http://host:8000/v1`` (a full
    ``…/chat/completions`` URL is cut back to it); ExplainError for anything not http(s)."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ExplainError(
            f"--endpoint {endpoint!r} is not an http(s) URL; give the API base, e.g. "
            "http://127.0.0.1:8000/v1 (vLLM), http://127.0.0.1:11434/v1 (Ollama) or "
            "https://api.openai.com/v1"
        )
    return endpoint.rstrip("/").removesuffix("/chat/completions")


class ChatClient:
    """A thread-safe client of one chat-completions endpoint, through ``openai.OpenAI``.

    At most ``concurrency`` requests are open at once (callers beyond that wait, and a
    request keeps its slot while it backs off, so retries do not add load). The openai
    client retries up to ``max_retries`` times; any other error is raised at once, since
    repeating a bad request or a wrong key only burns time.
    """

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        max_retries: int = 6,
        timeout: float = 120.0,
        seed: int | None = 0,
    ) -> None:
        import openai

        self.url = base_url(endpoint)
        self.model = model
        self.max_retries = max(0, int(max_retries))
        self.seed = seed
        self.usage = Usage()
        self.slots = threading.BoundedSemaphore(max(1, int(concurrency)))
        # Local servers (vLLM, Ollama, llama.cpp) ignore the key, but the client wants one.
        self.api = openai.OpenAI(base_url=self.url, api_key=api_key or "unused",
                                 max_retries=self.max_retries, timeout=float(timeout))

    def complete(self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0) -> Reply:
        import openai

        extra: dict[str, Any] = {} if self.seed is None else {"seed": int(self.seed)}
        try:
            with self.slots:
                raw = self.api.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages, max_tokens=int(max_tokens),
                    temperature=float(temperature), **extra)
            answer = raw.parse()
        except openai.APIStatusError as e:
            code = e.status_code
            retried = code in RETRY_STATUS or code >= 500
            self.usage.add(0, 0, retries=self.max_retries if retried else 0)
            raise ExplainError(status_hint(self.url, code, str(e.message), self.model, retried and self.max_retries)) from None
        except openai.APIConnectionError as e:  # also timeouts; retried by the client first
            self.usage.add(0, 0, retries=self.max_retries)
            raise ExplainError(f"{self.url} failed {self.max_retries + 1} times, last with {type(e).__name__}: "
                               f"{e}; check that the server is up, or raise --timeout / --max-retries") from None
        retries = int(getattr(raw, "retries_taken", 0))  # openai >= 1.42 reports it
        try:
            text = answer.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            raise ExplainError(f"{self.url} answered with no choices[0].message.content; is it a "
                               "chat-completions endpoint?") from None
        u = answer.usage
        reply = Reply(str(text), int(getattr(u, "prompt_tokens", 0) or 0),
                      int(getattr(u, "completion_tokens", 0) or 0), retries)
        self.usage.add(reply.prompt_tokens, reply.completion_tokens, retries=retries)
        return reply


def status_hint(url: str, code: int, detail: str, model: str, retried: int | bool = 0) -> str:
    """One line for an HTTP error: what came back and what to change."""
    if retried:
        return (f"{url} failed {int(retried) + 1} times, last with HTTP {code} ({detail[:200]}); check that "
                "the server is up, or lower --concurrency / raise --max-retries")
    fix = {
        401: "set the API key in the environment variable named by --api-key-env",
        403: "the key may not use this model; check the key or --model",
        404: f"check --endpoint (the API base, ending in /v1) and that the server serves --model {model!r}",
    }.get(code, "check --endpoint, --model and the server's log")
    return f"{url} answered HTTP {code} ({detail[:200]}); {fix}"


class HFChatBackend:
    """A local Hugging Face causal LM as the chat model (no server, one request at a time).

    Greedy decoding, so a run is reproducible. Uses the tokenizer's chat template when it
    has one; otherwise the messages are joined as plain ``role: text`` lines.
    """

    def __init__(self, model: str, *, device: str = "cpu", max_new_tokens: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llm_sae.lm.models import resolve_model

        path = resolve_model(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.lm = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        except OSError as e:
            raise ExplainError(f"cannot load the explainer model {model!r} ({e}); give a local "
                               "model directory or a cached hub name") from None
        self.model, self.device = str(model), device
        self.max_new_tokens = max_new_tokens
        self.usage = Usage()
        self._lock = threading.Lock()

    def _prompt_ids(self, messages: list[Message]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
        return list(self.tokenizer(text)["input_ids"])

    def complete(self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0) -> Reply:
        import torch

        ids = self._prompt_ids(messages)
        n_ctx = getattr(self.lm.config, "max_position_embeddings", None) or getattr(self.lm.config, "n_positions", None)
        new = int(self.max_new_tokens or max_tokens)
        if n_ctx:  # keep the end of a prompt too long for a small model's context
            new = max(1, min(new, int(n_ctx) // 2))
            ids = ids[-(int(n_ctx) - new):]
        with self._lock, torch.no_grad():
            x = torch.tensor([ids], device=self.device)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            out = self.lm.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                   do_sample=False, pad_token_id=pad)
        gen = out[0, len(ids):].tolist()
        self.usage.add(len(ids), len(gen))
        return Reply(self.tokenizer.decode(gen, skip_special_tokens=True), len(ids), len(gen))
