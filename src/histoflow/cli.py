"""`histoflow <verb> [overrides]`: one entry point for every command (histoflow.commands.<verb>).

The verb's module runs as if started by `python -m histoflow.commands.<verb>`: its Hydra app reads the overrides
from sys.argv, and Lightning's DDP launcher, which starts each further device's process with the command that
started this one, re-runs that module with the same overrides.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

VERBS = {
    "prepare": "cut patches, assign folds, audit the split, write shards",
    "train": "train on one fold (-m fold=1,2,3,4,5: every fold, then the k-fold reports)",
    "predict": "classify images by patch votes, report folds, map slides",
    "embed": "embed every prepared patch, or a slide table's tissue tiles, with a frozen encoder, once",
    "audit": "the leak audit of a data set's folds",
    "summary": "the cross-validation summary of multirun folders, recipes side by side",
    "view": "a run's report and slides in the browser (deep zoom, heatmaps, attention), or exported as pages",
}


def usage() -> str:
    width = max(map(len, VERBS))
    return "usage: histoflow <command> [key=value ...] [--help]\n\ncommands:\n" + "\n".join(
        f"  {verb:<{width}}  {what}" for verb, what in VERBS.items())


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        sys.exit(f"histoflow: unknown command {verb!r}\n\n{usage()}")
    name = f"histoflow.commands.{verb}"
    command = importlib.import_module(name)
    sys.argv = [f"histoflow {verb}", *rest]
    main_module = sys.modules["__main__"]
    main_module.__spec__ = importlib.util.find_spec(name)  # what Lightning's DDP launcher re-runs: -m <name>
    command.main()


if __name__ == "__main__":
    main()
