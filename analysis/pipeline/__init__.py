"""analysis.pipeline.main."""
