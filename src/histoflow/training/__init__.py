"""One fold trained: the LightningModule, fit and test, checkpoints (read safely, once), resume, callbacks, loggers,
W&B tracking, and the summary of a multirun's folds."""
