"""sae package of refusal-sae."""
