"""Model weights on this machine: fetching them ahead of a start (`modelyard pull`)."""
