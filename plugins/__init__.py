"""modgen's built-in plugins. They are imported explicitly, by this list, when the registry
first loads plugins; third-party packages register through the ``modgen.plugins`` entry points."""

BUILTIN = (
    "modgen.plugins.models.llama",
    "modgen.plugins.kv.blocked",
    "modgen.plugins.kv.prefix",
    "modgen.plugins.schedulers.splitfuse",
    "modgen.plugins.schedulers.splitfuse_priority",
    "modgen.plugins.schedulers.splitfuse_spf",
    "modgen.plugins.schedulers.continuous",
    "modgen.plugins.schedulers.static",
    "modgen.plugins.attention.torch_ref",
    "modgen.plugins.attention.triton",
    "modgen.plugins.attention.cpu",
    "modgen.plugins.attention.auto",
    "modgen.plugins.workloads.lengths",
    "modgen.plugins.workloads.prefix",
    "modgen.plugins.workloads.trace",
    "modgen.plugins.executors.model",
    "modgen.plugins.executors.sim",
    "modgen.plugins.cost_models.roofline",
    "modgen.plugins.cost_models.profiled",
    "modgen.tasks.generate",
    "modgen.tasks.bench",
    "modgen.tasks.profile",
    "modgen.tasks.fidelity",
    "modgen.serve.task",
)
