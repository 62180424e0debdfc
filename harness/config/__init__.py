"""Experiment configs: the schema (what a config may say), loading and expanding it into a matrix of cells, and
the reference generated from the schema."""

from .base import Strict, axis
from .kernels import DistroKernel, GitChange, KernelConfig, Source, Variant, param_value
from .matrix import (
    Cell,
    Matrix,
    anchored,
    axis_paths,
    describe,
    load,
    load_raw,
    parse_overrides,
    resolve_config_path,
    variant_summary,
)
from .schema import (
    PROBE_LEVELS,
    Attribution,
    Boot,
    Checks,
    Experiment,
    LevelSpec,
    Phase,
    Probe,
    Sampler,
    Topology,
    check_output,
)

__all__ = [
    "PROBE_LEVELS",
    "Attribution",
    "Boot",
    "Cell",
    "Checks",
    "DistroKernel",
    "Experiment",
    "GitChange",
    "KernelConfig",
    "LevelSpec",
    "Matrix",
    "Phase",
    "Probe",
    "Sampler",
    "Source",
    "Strict",
    "Topology",
    "Variant",
    "anchored",
    "axis",
    "axis_paths",
    "check_output",
    "describe",
    "load",
    "load_raw",
    "param_value",
    "parse_overrides",
    "resolve_config_path",
    "variant_summary",
]
