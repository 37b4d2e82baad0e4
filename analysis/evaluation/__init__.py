"""analysis.evaluation."""
