"""The viewer: a run's report and slides served to a browser (deep zoom, overlays) or exported as static pages.

Modules: deepzoom, export, overlays, pages, run_folder, server, site, view.
"""
