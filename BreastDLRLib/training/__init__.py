"""Training of the segmenter, the classifiers and the clinical fusion heads; presets; model cards."""
