"""Models: encoder loading and the shared encoder with one head per task."""
