"""Running it: `run/` (candidate, loop, modes, scoring, weights, workers, store), `tuning/`
(Optuna), `fitness/` (task kinds, staged statistics), `models/` (sources, experts, data sets,
safetensors I/O), `results/` (export, report); `config`, `schema`, `errors`, `preflight`,
`merge`, `cli`, `demo`."""

__all__: list[str] = []
