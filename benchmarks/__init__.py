"""Benchmarks of dpo_accel (run as modules: ``python -m benchmarks.bench_dpo_step``)."""
