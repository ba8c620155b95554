"""Trained fold models put to use: whole images by patch votes, whole slides as maps, the k-fold image report.

Modules: attention_maps, bag_report, fold_models, geojson, heatmap, image_report, predict, recipes, report_run,
slide_map, sweep_report, voting.
"""
