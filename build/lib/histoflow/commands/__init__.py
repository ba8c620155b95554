"""The commands, one module each: `histoflow <verb>` (or `python -m histoflow.commands.<verb>`) runs its main()."""
