"""provenance auditor: which training images, and so which contributors, influenced each generated image.

A library with a thin CLI over it (auditor/cli/); importing it changes no process-wide setting (see runtime.py).
"""

__version__ = "0.2.0.dev0"
