"""The collector frame and one module per collector: its metric specs, families, problems and summary."""
