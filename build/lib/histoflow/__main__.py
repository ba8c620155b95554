"""`python -m histoflow <command> [overrides]`: the same as the `histoflow` console script."""

from histoflow.cli import main

main()
