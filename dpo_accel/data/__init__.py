"""Data: datasets in any supported format -> {prompt, chosen, rejected} (or unpaired rows), tokenisation and
truncation, collation, samplers, pairs from generated answers, and the shipped tasks. Imports the configuration
(and the log-prob module's ignore index) only; never a model, an objective or a loop."""
