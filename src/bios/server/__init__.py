"""`bios serve`: the engine behind HTTP, speaking Tinker's wire protocol."""
