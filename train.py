"""`python train.py [overrides]`: the same as `histoflow train` (histoflow/commands/train.py says more)."""

from histoflow.commands.train import main

if __name__ == "__main__":
    main()
