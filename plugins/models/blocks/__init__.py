"""Built-in model blocks, registered in the block registries of ``modgen.blocks``."""
