"""Running it: config, model sources, fitness tasks, Ray workers, the run store, export, the CLI."""

