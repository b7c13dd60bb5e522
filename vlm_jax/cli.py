"""The `vlm-jax` command: one name for everything a user does with a run.

  vlm-jax train   --config=configs/<method>.py[:args] --workdir=DIR    # = python launch/main.py ...
  vlm-jax eval    --workdir=DIR                                        # the run's evaluation, no training
  vlm-jax predict --workdir=DIR IMAGE... | --folder=DIR                # classes, embeddings or answers
  vlm-jax export  --workdir=DIR --out=DIR                              # trained weights as HF / PEFT files
  vlm-jax plan    --config=...                                         # memory per device before a run

Each subcommand is a module with `main(argv)` (its own absl flags, defined when it is imported: only the chosen
one is); what their entry points share is `vlm_jax/programs/commands.py`. This module imports nothing heavy:
`vlm-jax --help` is fast.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line description). The one table of subcommands.
COMMANDS = {
    "train": ("vlm_jax.programs.train", "train a config into a workdir (python launch/main.py does the same)"),
    "eval": ("vlm_jax.programs.evaluate", "rerun a workdir's evaluation on its kept checkpoints, without training"),
    "predict": ("vlm_jax.programs.predict", "classes, embeddings or answers of a trained workdir for images"),
    "export": ("vlm_jax.programs.export", "write a workdir's trained weights as Hugging Face / PEFT files"),
    "plan": ("vlm_jax.programs.plan", "estimate per-device memory of a config before loading anything"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vlm-jax <command> [flags]   (vlm-jax <command> --help: its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The console script: `vlm-jax <command> [flags]`; an unknown command is one `error:` line, exit 2."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; known: {', '.join(COMMANDS)} (vlm-jax --help)", file=sys.stderr)
        sys.exit(2)
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:   # the module exists but something it imports does not: a real failure
            raise
        print(f"error: vlm-jax {name} is not available in this build", file=sys.stderr)
        sys.exit(2)
    module.main([f"vlm-jax {name}", *argv[2:]])


if __name__ == "__main__":
    main()
