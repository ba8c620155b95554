"""Results as people read them: confusion matrices, curves and interval plots; fold tables; intervals over patients;
colour-only baselines.

Modules: colour_baseline, figures, intervals, regression, survival, tables.
"""
