"""`python predict.py [overrides]`: the same as `histoflow predict` (histoflow/commands/predict.py says more)."""

from histoflow.commands.predict import main

if __name__ == "__main__":
    main()
