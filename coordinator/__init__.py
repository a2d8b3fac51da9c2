"""Control plane: the Store contract, its backends, and job records on top."""
