"""Built-in executors: the real model, and the simulator."""
