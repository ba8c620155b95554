"""Frozen features: a frozen encoder over prepared patches (embeddings), or over a cohort's slides (cohort, its job,
index and embedder; slide_features: the per-slide file), embedded once and found afterwards; bags of them (bags,
slide_bags) for attention MIL.

Modules: bag_targets, bags, cohort, cohort_index, cohort_job, embeddings, slide_bags, slide_embedder,
slide_features.
"""
