"""What to build: the kernel source, its config, a distribution's kernel, and the variants compared."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..util import what_is
from .base import Strict


class Source(Strict):
    """Where the kernel comes from. The tree is never modified: the harness works on a copy."""

    kind: Literal["tarball", "git", "local"] = Field(description="tarball file, git repository + ref, or local tree")
    path: str | None = Field(None, description="tarball file or local tree (tarball/local)")
    url: str | None = Field(None, description="git repository: URL or path (git)")
    ref: str = Field("HEAD", description="git ref to build (git)")
    package: str | None = Field(None, description="Debian package that provides the tarball (installed by `fab setup`)")

    @property
    def where(self) -> str:
        """The tarball, the local tree or the repository (the validator below made sure it is there)."""
        return str(self.url if self.kind == "git" else self.path)

    @model_validator(mode="after")
    def _needs_location(self) -> Source:
        if self.kind in ("tarball", "local") and not self.path:
            raise ValueError(f"source.kind={self.kind} needs source.path")
        if self.kind == "git" and not self.url:
            raise ValueError("source.kind=git needs source.url")
        for name, value in (("url", self.url), ("ref", self.ref)):
            if self.kind == "git" and str(value).startswith("-"):  # git would read it as an option
                raise ValueError(f"source.{name} may not start with '-': {value!r}")
        return self


MAX_KCONFIG_BYTES = 4 << 20  # a full .config is ~300 KiB


def kconfig_problem(path: Path) -> str | None:
    """Why a file is no kernel config (base or fragment): not a regular file, too large, or no CONFIG_ line."""
    if (kind := what_is(path)) != "a regular file":
        return kind
    if path.stat().st_size > MAX_KCONFIG_BYTES:
        return f"larger than {MAX_KCONFIG_BYTES >> 20} MiB"
    with open(path, "rb") as f:
        head = f.read(MAX_KCONFIG_BYTES).decode(errors="replace")
    if not re.search(r"^(# )?CONFIG_[A-Za-z0-9_]+( is not set|=)", head, re.M):
        return "no CONFIG_ line in it: not a kernel config"
    return None


class KernelConfig(Strict):
    base: str = Field("tinyconfig", description="make target (tinyconfig, defconfig, ...) or a config file path")

    @field_validator("base")
    @classmethod
    def _target_or_file(cls, base: str) -> str:
        if re.fullmatch(r"[a-z0-9_]*config", base):
            return base
        if why := kconfig_problem(Path(base).expanduser()):
            raise ValueError(f"{base!r} is neither a make *config target nor a kernel config file ({why})")
        return base

    fragments: list[str] = Field(
        default_factory=lambda: ["kernel/kvm-host.config"],
        description="fragments, relative to configs/ or absolute, merged in order",
    )


class DistroKernel(Strict):
    """The kernel under test as a distribution packages it: only KVM's modules are built (harness/distro.py)."""

    distro: Literal["debian"] = Field("debian", description="whose packages: image, headers and source")
    release: str = Field(
        "auto",
        pattern=r"^(auto|[0-9]+\.[0-9]+\.[0-9]+-[0-9]+-[a-z0-9]+)$",
        description="the image's ABI release (linux-image-<release>, e.g. 6.1.0-56-amd64), or auto: the installed "
        "one whose version is the source's",
    )


GIT_REF = r"^[A-Za-z0-9_/.~^@{}+-]+$"  # what `git rev-parse` takes as a revision (no leading '-': below)
# parts of the kernel command line the harness owns: a variant may not move the root, init or console
RESERVED_PARAMS = ("root", "rootfstype", "rootflags", "init", "rdinit", "console", "earlyprintk", "panic", "nestpress.")
PARAM = r"^[a-z0-9_]+$"
PARAM_VALUE = r"^[A-Za-z0-9_.,:+-]+$"


class GitChange(Strict):
    """A variant from a git repository: the tree at a ref, or the commits of a range applied as patches."""

    repo: str | None = Field(
        None,
        description="repository (path, or URL for `ref`); default: the experiment's git source. Relative paths "
        "are relative to the config file",
    )
    ref: str | None = Field(
        None,
        pattern=GIT_REF,
        description="this variant's kernel is the tree at this ref (branch, tag, commit); in the experiment "
        "source's own repository it is built as the diff from the source's ref, on the same tree",
    )
    range: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_/.~^@{}+-]+\.\.[A-Za-z0-9_/.~^@{}+-]+$",
        description="`base..topic`: the range's commits (oldest first, no merges) applied as patches",
    )

    @model_validator(mode="after")
    def _one_of(self) -> GitChange:
        if (self.ref is None) == (self.range is None):
            raise ValueError("git: give exactly one of ref or range")
        if any(str(x).startswith("-") for x in (self.repo, self.ref, self.range) if x):  # git would read an option
            raise ValueError("git: repo, ref and range may not start with '-'")
        return self


class Variant(Strict):
    """A kernel to compare: the source (the experiment's or its own) with this variant's changes applied in
    order (series, then patch files, then a git range), booted with its own parameters. The first variant
    is the baseline the others are compared with."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    series: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="patch series under patches/")
    patch_variant: str = Field("auto", description="variant of the series, or auto to pick by kernel version")
    patches: list[str] = Field(
        default_factory=list,
        description="patch files, mbox files (several patches, as `git format-patch` or a list archive gives "
        "them) or directories of *.patch, applied in order; relative to the config file",
    )
    git: GitChange | None = Field(None, description="a ref or a range of a git repository")
    source: Source | None = Field(
        None, description="this variant's own kernel source (default: the experiment's); builds share nothing"
    )
    cmdline: list[str] = Field(
        default_factory=list, description="kernel parameters of this variant's kernel under test (no rebuild)"
    )
    module_params: dict[str, dict[str, str | int | bool]] = Field(
        default_factory=dict,
        description="module -> parameter -> value for the kernel under test, e.g. {kvm: {tdp_mmu: false}}; "
        "passed as module.param=value on its command line (no rebuild) and checked once it booted",
    )
    expect_removed: list[str] = Field(
        default_factory=list, description="strings the patches must remove from the files they touch (checked)"
    )
    expect_present: list[str] = Field(
        default_factory=list, description="strings the files the patches touch must hold afterwards (checked)"
    )

    @field_validator("patches")
    @classmethod
    def _paths(cls, paths: list[str]) -> list[str]:
        if bad := [p for p in paths if not p.strip() or "\0" in p]:
            raise ValueError(f"empty or NUL in patch paths: {bad!r}")
        return paths

    @field_validator("cmdline")
    @classmethod
    def _kernel_params(cls, params: list[str]) -> list[str]:
        for p in params:
            if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.,:=/+-]*", p):
                raise ValueError(f"{p!r}: one kernel parameter, no spaces or quotes")
            if p.split("=", 1)[0] in RESERVED_PARAMS or p.startswith("nestpress."):
                raise ValueError(f"{p!r}: the harness sets {p.split('=', 1)[0]} itself")
        return params

    @field_validator("module_params")
    @classmethod
    def _module_params(cls, mods: dict[str, dict[str, str | int | bool]]) -> dict[str, dict[str, str | int | bool]]:
        for mod, params in mods.items():
            if not re.fullmatch(PARAM, mod) or mod == "nestpress":
                raise ValueError(f"module name {mod!r}: lower-case letters, digits, _")
            for name, value in params.items():
                if not re.fullmatch(PARAM, name) or not re.fullmatch(PARAM_VALUE, param_value(value)):
                    raise ValueError(f"{mod}.{name}={value!r}: parameter names [a-z0-9_], values without spaces")
        return mods

    @model_validator(mode="after")
    def _one_source(self) -> Variant:
        if self.source is not None and self.git is not None and self.git.ref is not None:
            raise ValueError("give the variant's kernel as source or as git.ref, not both")
        return self

    def module_params_text(self) -> dict[str, dict[str, str]]:
        return {mod: {name: param_value(v) for name, v in ps.items()} for mod, ps in self.module_params.items()}

    def kernel_params(self) -> list[str]:
        """What this variant adds to its kernel under test's command line (after the harness's own)."""
        return [*self.cmdline] + [
            f"{mod}.{name}={v}" for mod, ps in self.module_params_text().items() for name, v in ps.items()
        ]


def param_value(value: str | int | bool) -> str:
    """A module parameter's value as the kernel command line takes it (booleans as Y/N, as sysfs shows them)."""
    return ("Y" if value else "N") if isinstance(value, bool) else str(value)
