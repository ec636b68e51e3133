#!/usr/bin/env python
"""Train the embedded default model, ``tiny-stdlib``: a small GPT-2 on the stdlib's own source.

Everything it needs ships with Python (the corpus) and with llm_sae's dependencies (the
tokenizer trainer, the model), so the result is reproducible offline on a CPU. The output
directory is a plain ``save_pretrained`` model + tokenizer, loadable by ``transformers`` and by
TransformerLens' ``TransformerBridge``, plus ``recipe.json`` (command, seed, versions, sizes,
held-out loss against unigram and bigram baselines) and ``MODEL_CARD.md``.

    python scripts/train_tiny_lm.py --out llm_sae/assets/tiny-stdlib --steps 6000

Training checkpoints to ``<out>/checkpoint.pt`` every ``--ckpt-every`` steps; rerunning the
same command resumes from it (the checkpoint is deleted once the model is saved).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

BOS = "<|endoftext|>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="llm_sae/assets/tiny-stdlib", help="output directory")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (incl. BOS)")
    p.add_argument("--d-model", type=int, default=128, help="residual stream width")
    p.add_argument("--n-layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--n-heads", type=int, default=4, help="attention heads per block")
    p.add_argument("--context", type=int, default=128, help="context length (BOS + 127 tokens)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=200,
                   help="linear warm-up steps; after them lr decays as 1/sqrt(step)")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="if > 0: stop early after this much training time (at a checkpoint "
                        "boundary); the recipe records the steps reached, which reproduce it")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--seed", type=int, default=0, help="seed for init, sampling, everything")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--eval-every", type=int, default=500, help="steps between held-out evals")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows per periodic eval")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between resumable checkpoints")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved weights (training is always float32)")
    p.add_argument("--device", default="cpu", help="torch device to train on")
    p.add_argument("--autocast", choices=["none", "bfloat16"], default="none",
                   help="mixed precision for forward/backward (weights and optimizer stay float32); "
                        "bf16 matmuls are ~4x faster on CPUs with AVX512-BF16/AMX")
    p.add_argument("--card-only", action="store_true",
                   help="only (re)write MODEL_CARD.md from the recipe.json already in --out")
    p.add_argument("--time-steps", type=int, default=0,
                   help="if > 0: time this many steps, print tokens/s, and exit without saving")
    return p.parse_args(argv)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A GPT-2-style byte-level BPE trained on ``texts``, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # GPT-2's own split regex keeps runs of spaces apart from the word after them, so
    # indentation becomes its own tokens (a feature users look for).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=BOS, pad_token=BOS,
    )


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All documents as one int32 stream, each preceded by BOS (the document separator)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = []
    for doc in ids:
        out.append(bos)
        out.extend(doc)
    return np.asarray(out, dtype=np.int32)


def eval_windows(stream: np.ndarray, context: int, bos: int, n: int | None) -> torch.Tensor:
    """Non-overlapping held-out windows [W, context], each BOS + context-1 tokens."""
    body = context - 1
    n_all = (len(stream) - 1) // body
    if n is not None and n < n_all:
        starts = np.linspace(0, n_all - 1, n).astype(np.int64) * body
    else:
        starts = np.arange(n_all, dtype=np.int64) * body
    rows = np.stack([stream[s : s + body] for s in starts])
    bos_col = np.full((len(rows), 1), bos, dtype=np.int32)
    return torch.from_numpy(np.concatenate([bos_col, rows], axis=1)).long()


def sample_batch(stream: np.ndarray, context: int, bos: int, batch: int, gen: torch.Generator):
    """Random training windows [B, context]: BOS then context-1 tokens from anywhere in the stream.

    Harvest prepends BOS to every context, so the model learns to start from BOS mid-text.
    """
    body = context - 1
    starts = torch.randint(0, len(stream) - body, (batch,), generator=gen).numpy()
    rows = np.stack([stream[s : s + body] for s in starts])
    bos_col = np.full((batch, 1), bos, dtype=np.int32)
    return torch.from_numpy(np.concatenate([bos_col, rows], axis=1)).long()


@torch.no_grad()
def model_loss(model, windows_WL: torch.Tensor, device: str, batch: int = 64) -> float:
    """Mean next-token loss (nats/token) over all positions after the BOS of each window."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows_WL), batch):
        x_BL = windows_WL[i : i + batch].to(device)
        logits_BLV = model(x_BL).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits_BLV[:, :-1].reshape(-1, logits_BLV.shape[-1]), x_BL[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x_BL[:, 1:].numel()
    model.train()
    return total / count


def ngram_baselines(train: np.ndarray, windows_WL: torch.Tensor, vocab: int) -> dict[str, float]:
    """Held-out cross-entropy (nats/token) of unigram and bigram models counted on train.

    Scored on exactly the targets the model is scored on. Unigram: add-one smoothed counts.
    Bigram: Dirichlet-smoothed toward the unigram, P(b|a) = (c(a,b) + α·P(b)) / (c(a) + α);
    the best α of a small grid is reported, which makes the baseline slightly optimistic.
    """
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    p_uni = counts / counts.sum()
    prev = windows_WL[:, :-1].reshape(-1).numpy()
    nxt = windows_WL[:, 1:].reshape(-1).numpy()
    uni = float(-np.log(p_uni[nxt]).mean())
    pair = train[:-1].astype(np.int64) * vocab + train[1:]
    keys, key_counts = np.unique(pair, return_counts=True)
    query = prev.astype(np.int64) * vocab + nxt
    idx = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    c_ab = np.where(keys[idx] == query, key_counts[idx], 0).astype(np.float64)
    c_a = np.bincount(train[:-1], minlength=vocab).astype(np.float64)[prev]
    best = min(
        float(-np.log((c_ab + alpha * p_uni[nxt]) / (c_a + alpha)).mean())
        for alpha in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    )
    return {"unigram": uni, "bigram": best}


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then inverse-square-root decay.

    The schedule does not depend on the total step count, so a run stopped by --max-minutes
    at step S is exactly the run ``--steps S`` (same seed), and the recipe can say so.
    """
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * math.sqrt(args.warmup / (step + 1))


def write_model_card(out: Path, recipe: dict) -> None:
    """MODEL_CARD.md: what the shipped model is, how good it is, how it was made."""
    m, h, c = recipe["model"], recipe["heldout"], recipe["corpus"]
    card = f"""# tiny-stdlib

The default model of llm_sae: a {m["n_layers"]}-layer GPT-2 (d_model {m["d_model"]}, {m["n_heads"]} heads,
context {m["context"]}, {m["params"]:,} parameters, byte-level BPE vocabulary of {m["vocab_size"]})
trained from scratch on the Python standard library's own source code, the one corpus every
Python installation carries. It exists so that the toolkit finds meaningful features offline,
on a CPU, with nothing downloaded: indentation, string literals, comments, `def`/`self.`,
brackets. It is a toy: do not expect it to write good code.

Load it by its short name: `llm_sae.models.load_bridge("tiny-stdlib")`, or from the
directory with `transformers.AutoModelForCausalLM.from_pretrained(...)`. Contexts start with
`<|endoftext|>` (BOS), which TransformerLens prepends.

## Quality (held-out stdlib files, nats/token, {h["targets"]:,} target tokens)

| model | loss |
|---|---|
| unigram (train counts) | {h["unigram_loss"]:.3f} |
| bigram (train counts, smoothed) | {h["bigram_loss"]:.3f} |
| **tiny-stdlib** | **{h["model_loss"]:.3f}** |

## Data

`llm_sae.corpus` ("stdlib"): the `.py` files under `sysconfig.get_paths()["stdlib"]` of Python
{recipe["versions"]["python"]}, without test suites, idlelib, site-packages, generated codec and doc
tables. {c["train_files"]} files ({c["train_tokens"]:,} tokens) for training; {c["test_files"]} files
({c["test_tokens"]:,} tokens) held out by a hash of their path.

## Training

{recipe["steps"]:,} AdamW steps of {recipe["args"]["batch_size"]} contexts ({recipe["tokens_seen"]:,} tokens,
{recipe["epochs"]} epochs), peak lr {recipe["args"]["lr"]}, warm-up {recipe["args"]["warmup"]} then 1/sqrt decay,
seed {recipe["seed"]}, {recipe["threads"]} CPU thread(s), {recipe["train_seconds"] / 60:.0f} minutes on a shared CPU.
Versions: {", ".join(f"{k} {v}" for k, v in recipe["versions"].items())}.
Reproduce (same versions and thread count give the same weights):

```
{recipe["reproduce"]}
```

The full record is `recipe.json` next to this file.
"""
    (out / "MODEL_CARD.md").write_text(card)


# Arguments that do not change the trajectory of training; a checkpoint resumes across them.
_NON_TRAJECTORY = {"threads", "steps", "max_minutes", "eval_every", "ckpt_every", "out", "time_steps", "dtype"}


def _trajectory_args(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in _NON_TRAJECTORY}


def _cli_args(args: argparse.Namespace, exclude: set[str]) -> list[str]:
    return [tok for k, v in vars(args).items() if k not in exclude and k != "time_steps"
            for tok in (f"--{k.replace('_', '-')}", str(v))]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    import tokenizers
    import transformers as tf
    from tqdm import tqdm

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llm_sae.lm.corpus import load_stdlib_corpus, stdlib_root

    out = Path(args.out)
    if args.card_only:
        write_model_card(out, json.loads((out / "recipe.json").read_text()))
        return
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_texts = load_stdlib_corpus("train")
    test_texts = load_stdlib_corpus("test")
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    bos = tokenizer.bos_token_id
    train_stream = token_stream(tokenizer, train_texts)
    test_stream = token_stream(tokenizer, test_texts)
    tokenizer.model_max_length = args.context  # set after tokenizing whole files, to not warn
    print(f"corpus: {len(train_texts)} train files, {len(train_stream):,} tokens; "
          f"{len(test_texts)} test files, {len(test_stream):,} tokens "
          f"(tokenized in {time.time() - t0:.1f}s)", flush=True)

    cfg = tf.GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.context, n_embd=args.d_model,
        n_layer=args.n_layers, n_head=args.n_heads, bos_token_id=bos, eos_token_id=bos,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )
    model = tf.GPT2LMHeadModel(cfg).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    eval_small = eval_windows(test_stream, args.context, bos, args.eval_windows)

    ckpt_path = out / "checkpoint.pt"
    start, history, train_seconds = 0, [], 0.0
    if ckpt_path.exists() and not args.time_steps:
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["args"] != _trajectory_args(args):
            raise SystemExit(f"{ckpt_path} was written with other arguments; delete it to start over")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        start, history, train_seconds = ck["step"], ck["history"], ck["train_seconds"]
        print(f"resumed from step {start}", flush=True)

    tokens_per_step = args.batch_size * (args.context - 1)
    n_steps = args.time_steps or args.steps
    model.train()
    bar = tqdm(range(start, n_steps), initial=start, total=n_steps, desc="train", mininterval=5)
    t_seg = time.time()
    ema = None
    done = start
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        x_BL = sample_batch(train_stream, args.context, bos, args.batch_size, gen).to(args.device)
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast != "none"):
            logits_BLV = model(x_BL).logits
        loss = torch.nn.functional.cross_entropy(
            logits_BLV[:, :-1].float().reshape(-1, logits_BLV.shape[-1]), x_BL[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr_at(step, args):.2e}", refresh=False)
        done = step + 1
        if args.time_steps:
            continue
        if done % args.eval_every == 0 or done == args.steps:
            held = model_loss(model, eval_small, args.device)
            history.append({"step": done, "train_loss_ema": round(ema, 4), "heldout_loss": round(held, 4)})
            print(f"\nstep {done}: train {ema:.3f}  held-out {held:.3f}", flush=True)
        if done % args.ckpt_every == 0 and done < args.steps:
            train_seconds += time.time() - t_seg
            t_seg = time.time()
            torch.save({
                "model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                "step": done, "history": history, "train_seconds": train_seconds,
                "args": _trajectory_args(args),
            }, ckpt_path)
            if args.max_minutes and train_seconds > 60 * args.max_minutes:
                print(f"\n--max-minutes reached at step {done}", flush=True)
                break
    bar.close()
    train_seconds += time.time() - t_seg
    if args.time_steps:
        n = args.time_steps
        print(f"{n} steps in {train_seconds:.1f}s: {n * tokens_per_step / train_seconds:,.0f} tokens/s, "
              f"{train_seconds / n * 1000:.0f} ms/step; params {n_params:,}")
        return

    print("evaluating on the whole held-out split...", flush=True)
    full = eval_windows(test_stream, args.context, bos, None)
    held = model_loss(model, full, args.device)
    base = ngram_baselines(train_stream, full, len(tokenizer))
    print(f"held-out loss {held:.4f} nats/token; unigram {base['unigram']:.4f}; bigram {base['bigram']:.4f}")

    model = model.to("cpu").to(getattr(torch, args.dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    given = argv if argv is not None else sys.argv[1:]
    recipe = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *given]),
        # The schedule ignores the total, so this reproduces the saved weights exactly
        # (same seed, same library versions, same thread count) even after --max-minutes.
        "reproduce": " ".join(["python", "scripts/train_tiny_lm.py", "--out", str(out),
                               *_cli_args(args, exclude={"out", "max_minutes", "steps"}),
                               "--steps", str(done)]),
        "steps": done,
        "args": {k: v for k, v in vars(args).items()},
        "seed": args.seed,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": tf.__version__, "tokenizers": tokenizers.__version__,
        },
        "corpus": {
            "name": "stdlib", "root": str(stdlib_root()),
            "train_files": len(train_texts), "test_files": len(test_texts),
            "train_tokens": int(len(train_stream)), "test_tokens": int(len(test_stream)),
        },
        "model": {
            "arch": "GPT2LMHeadModel", "params": n_params, "d_model": args.d_model,
            "n_layers": args.n_layers, "n_heads": args.n_heads, "context": args.context,
            "vocab_size": len(tokenizer), "saved_dtype": args.dtype,
        },
        "tokens_seen": done * tokens_per_step,
        "epochs": round(done * tokens_per_step / len(train_stream), 2),
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "heldout": {
            "windows": len(full), "targets": int(full[:, 1:].numel()),
            "model_loss": round(held, 4),
            "unigram_loss": round(base["unigram"], 4),
            "bigram_loss": round(base["bigram"], 4),
        },
        "history": history,
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    write_model_card(out, recipe)
    ckpt_path.unlink(missing_ok=True)
    print(f"saved to {out} in {time.time() - t0:.0f}s total")


if __name__ == "__main__":
    main()
