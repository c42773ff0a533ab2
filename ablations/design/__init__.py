"""The study file and its design: what a study is (spec), which runs it has (designs,
fractional), what each fix toggles (fixes) and how a run is named (identity). Imports no other
layer: the engine, tracking and results all read the design."""
