"""Prefect tasks: thin wrappers around ``varmerge`` that pass references (paths, hashes), never
tensors, persist their outputs as files, log to MLflow and cache by content."""
