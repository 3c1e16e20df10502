"""Running it: config, model sources, fitness tasks, Ray workers, the run store, export, the CLI."""
from . import datasets as _datasets  # noqa: F401  (registers the generated sets as text sources)
