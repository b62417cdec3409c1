"""Neural networks of BreastDLR (torch).  Import the submodules directly, e.g.
``from BreastDLRLib.networks.classifiers import build_classifier``; nothing heavy is imported here."""
