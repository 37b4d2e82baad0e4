"""analysis package of refusal-sae."""
