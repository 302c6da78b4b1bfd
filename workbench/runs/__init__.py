"""Running it: the notebook runner, papermill sweeps, the demo."""
