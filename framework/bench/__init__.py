"""`mode=bench`: the standard workloads against transformers, measured in one run."""
