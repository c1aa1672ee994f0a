"""Measurement tooling: benchmark, reliability checks, load generator, machine probe, report rendering."""
