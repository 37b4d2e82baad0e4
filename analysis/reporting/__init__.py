"""analysis.reporting."""
