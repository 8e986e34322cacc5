"""Benchmarks: backbone speed vs PyTorch, model FLOPs, input pipeline (results/ holds JSONs)."""
