"""The run format: configs (spec), checkpoints, exports and ensemble files (store), a run's data."""
