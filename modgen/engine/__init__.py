"""The step loop and its seams: the Engine (requests, schedule -> execute -> commit), the
Scheduler and KVAllocator interfaces it plans with, the Sequence and StepPlan they share, the
RaggedBatch a model runs, the Executor interface (real or simulated) and its Clock, the Sampler,
step features and the cost-model interface, and the AsyncEngine front for servers."""

from modgen.engine.engine import Engine, StepStats

__all__ = ["Engine", "StepStats"]
