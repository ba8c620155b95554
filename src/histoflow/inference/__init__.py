"""Trained fold models and what a training sweep's k-fold report makes of them: the models loaded with their
preprocessing, whole images by patch votes, each fold's held-out images predicted (a prediction run's frame, which
deployment shares), the k-fold image, bag and survival/regression reports, attention maps, sweeps side by side.

Modules: attention_maps, bag_report, cached_votes, fold_models, heatmap, held_out, image_report, model_settings,
recipes, report_run, sweep_report, target_report, task_report, voting, window_inputs.
"""
