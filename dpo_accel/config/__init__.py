"""Configuration: the recipe schema (the one home of every default), YAML and ``--set`` overrides, flat
handbook / TRL recipes, dataset mixtures, each loop kind's rules, and `preflight`, which resolves a recipe into
the Plan every other part reads. The bottom floor: it imports no loop and no training code (a check may look up
a scorer by name)."""
