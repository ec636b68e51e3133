"""The ``llm-sae`` command: one subcommand per pipeline stage.

Each stage module defines ``add_cli(parser)`` and ``run_cli(args) -> int | None``; this
file only dispatches, and imports a stage (and so torch) only when it is asked for.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name: (module, one-line help). The order is the pipeline's.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("llm_sae.demo", "Run the whole pipeline on the embedded model, offline, in minutes."),
    "harvest": ("llm_sae.harvest.cli", "Record a model's activations at hook points into a store."),
    "store": ("llm_sae.store.cli", "Inspect (info) or check (verify) an activation store."),
    "train": ("llm_sae.train.cli", "Train a sparse autoencoder from an activation store."),
    "train-clt": ("llm_sae.train.clt", "Train a cross-layer transcoder from every layer's paired stores."),
    "analyze": ("llm_sae.analyze.cli", "Per-feature statistics and top-activating contexts."),
    "dashboard": ("llm_sae.dashboard.build", "Render analysis output into a static, offline site."),
    "serve": ("llm_sae.serve.server", "Serve a dashboard site locally, with an optional live view."),
    "explain": ("llm_sae.explain.run", "Explain features with an LLM and score the explanations."),
    "steer": ("llm_sae.serve.steer", "Generate text with SAE features added, clamped or ablated."),
    "eval": ("llm_sae.evaluate.cli", "Measure an SAE: reconstruction, downstream loss, sparsity."),
    "bench": ("llm_sae.bench.recovery", "Built-in benchmarks (ground-truth feature recovery)."),
    "export": ("llm_sae.interop.export", "Write an SAE in another library's format."),
}


def _available() -> dict[str, tuple[str, str]]:
    return {
        name: spec
        for name, spec in COMMANDS.items()
        if importlib.util.find_spec(spec[0]) is not None
    }


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-sae",
        description="Sparse autoencoders for language models: harvest → train → analyze → dashboard.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:
            importlib.import_module(module).add_cli(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    from llm_sae.errors import LlmSaeError

    try:
        return int(module.run_cli(args) or 0)
    except LlmSaeError as e:
        # Errors we raise on purpose say what is wrong and how to fix it; a traceback
        # would only bury that.
        print(f"llm-sae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llm-sae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
