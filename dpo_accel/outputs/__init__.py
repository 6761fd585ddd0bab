"""Outputs: checkpoints, the final export, the metrics log, the model card, the console and atomic writes.
Imports the configuration (and, to export a sharded model, the model's gathered copies); never a loop."""
