"""Test-only helpers, shipped so that tests/, benchmarks/ and tools/ share them; no stage of the package imports this.

    synthetic_slide   made-up pyramidal TIFF slides of any size (glass with round H&E-coloured sections)
    cohort_fixture    a cohort of small pyramidal TIFFs cut from the real slides of ../shared/data/wsi, with its table
    slide_shards      a slide's tiles written as WebDataset shards in prepare's sample format
    stain             skimage-compatible H&E-DAB unmixing in torch, the reference the HED jitter is tested against

It sits above every stage: it may import any of them (tests/test_layout.py holds that no stage imports it).

Modules: cohort_fixture, slide_shards, stain, synthetic_slide, synthetic_targets.
"""
