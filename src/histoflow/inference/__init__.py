"""Trained fold models put to use: whole images by patch votes, whole slides as maps, the k-fold image report, and
bag models deployed on new cohorts (external validation where labels exist).

Modules: attention_maps, bag_heads, bag_predict, bag_report, cached_votes, cohort_predict, deploy, external_report,
fold_models, geojson, heatmap, image_report, model_settings, predict, recipes, report_run, slide_map, slide_outputs,
sweep_report, target_report, task_report, voting, window_inputs.
"""
