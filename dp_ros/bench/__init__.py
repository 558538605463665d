"""Benchmarks behind `dp-ros bench`: they print figures; timing targets never live in tests."""
