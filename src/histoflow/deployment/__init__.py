"""Trained models put to work on new data: new images (patch votes, or heads on image bags), new slides as maps, a
slide- or patient-bag multirun on a new cohort; external validation where the new data carry labels or targets.
`histoflow predict`'s entry is deploy.predict; the k-fold report of a sweep's own held-out data is inference's.

Modules: bag_heads, bag_predict, cohort_predict, deploy, external_report, geojson, predict, slide_map, slide_outputs,
slide_predict.
"""
