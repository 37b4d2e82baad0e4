"""analysis.stages."""
