"""Kernels: sources, patches and variants resolved before anything builds, and cached builds."""
