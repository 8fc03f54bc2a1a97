"""Benchmarks that compare this project with reference implementations (commands, not tests)."""
