"""Data sources (ViZDoom recorder, generic Gymnasium recorder) and the Gymnasium env over a model."""
