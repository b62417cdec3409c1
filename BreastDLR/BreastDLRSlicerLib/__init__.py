"""Helpers of the BreastDLR Slicer module, kept out of ``BreastDLR.py`` so that it stays thin.

They live in this sub-package (Slicer's ``<Module>Lib`` convention) because Slicer tries to load every
``.py`` file next to a scripted module as a module of its own.  ``process``, ``dependencies`` (its helper
part), ``samples`` (its helper part), ``models`` and ``clinical_form`` (its helper part) are plain Python;
nothing here is imported at Slicer start-up except by the module's functions.
"""
