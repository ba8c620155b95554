"""One fold trained: the LightningModule, fit and test, checkpoints (read safely, once), resume, callbacks, loggers,
W&B tracking, and the summary of a multirun's folds.

Modules: bag_outputs, callbacks, checkpoints, fold_summary, loggers, losses, module, outputs, resume, run,
target_outputs, task_module, tracking.
"""
