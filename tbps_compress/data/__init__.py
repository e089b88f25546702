"""Datasets: one record format, readers for the TBPS benchmarks, the SynthPedes generator, transforms."""
