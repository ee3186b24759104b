"""Applications built on the core: nothing under ``rectdiff`` outside ``apps`` imports it."""
