"""The ``likeness`` command line: composes the contract, the engine, the pipeline,
training, evaluation and the service into commands."""
