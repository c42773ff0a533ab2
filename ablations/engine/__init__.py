"""The engine: turns a study file into queued Optuna trials and runs them on workers (study,
queue, trial, worker, launch, progress, storage). The only layer that trains; results and the
design never import it."""
