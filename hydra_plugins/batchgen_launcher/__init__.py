"""Hydra launchers for batchgen: submitit's local and Slurm launchers that skip shards already complete."""
