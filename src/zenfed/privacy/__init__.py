"""Privacy tools: packed CKKS aggregation (``he``) and differential privacy (``dp``)."""
