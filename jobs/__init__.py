"""Batch-generation jobs: a source, the engine and a writer, wired together and configured by Hydra."""
