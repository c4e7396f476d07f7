"""Built-in cost models of the simulated executor."""
