"""What every stage shares: errors shown as one line with the fix, config sections read and checked, progress bars, the
machine (devices, worker counts). Imports nothing of histoflow.

Modules: config, errors, files, machine, progress.
"""
