"""A run's state on disk: checkpoints (orbax) and their checksums, resume and its config check, the run
dir's lock and files, stop signals, metrics.jsonl / TensorBoard / W&B."""
