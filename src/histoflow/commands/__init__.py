"""The commands, one module each: `histoflow <verb>` (or `python -m histoflow.commands.<verb>`) runs its main().

Modules: audit, checks, embed, predict, prepare, summary, train, view.
"""
