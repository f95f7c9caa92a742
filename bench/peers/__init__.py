"""Minimal peer servers for side-by-side benchmarks, each as small as its own docs show."""
