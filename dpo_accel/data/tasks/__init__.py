"""The shipped preference tasks (arithmetic, one-word capitals): dataset generators and behaviour scorers."""
