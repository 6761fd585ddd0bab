"""Objectives: the registry of preference losses, pure tensor functions with their formula, paper and
hyperparameters in one place. Imports the configuration only."""
