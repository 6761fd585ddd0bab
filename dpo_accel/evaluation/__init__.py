"""Evaluation: held-out metrics, generation (a sharded policy gathered first), behaviour scorers, verifiers, the
reward-model judge, plots. Imports configuration, data, model, objectives and outputs; never a loop."""
