"""Loops: the step engine (the one place that steps an optimizer) and the ways of training that plug into it
(offline, online, reward) or drive it (iterative). The top floor below the entry point: nothing else in the
package imports a loop."""
