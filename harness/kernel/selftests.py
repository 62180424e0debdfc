"""KVM's own selftests, built from a variant's tree (tools/testing/selftests/kvm) and cached by what they are made
of: a variant whose patches touch none of their inputs (the selftests, the tools headers, the UAPI headers) gets
the baseline's binaries without a compile."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..errors import BuildError
from ..util import atomic_dir, hash_file, hash_text, log, run

KVM = Path("tools/testing/selftests/kvm")
INPUTS = (
    KVM,
    Path("tools/testing/selftests/lib.mk"),
    Path("tools/include"),
    Path("tools/arch/x86/include"),
    Path("include/uapi"),
    Path("arch/x86/include/uapi"),
    Path("scripts/headers_install.sh"),
)
ARCH_DIRS = ("x86_64", "x86")  # where an x86 test lives (x86_64/ before 6.13, x86/ after)


def source_of(tree: Path, test: str) -> Path | None:
    """The test's .c under the tree's KVM selftests, relative to them (None: this source has no such test)."""
    for rel in (Path(f"{test}.c"), *(Path(d) / f"{test}.c" for d in ARCH_DIRS)):
        if (tree / KVM / rel).is_file():
            return rel
    return None


def inputs_id(tree: Path) -> str:
    """What the binaries are made of: every input file's path and content."""
    parts = []
    for top in INPUTS:
        root = tree / top
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root] if root.exists() else []
        parts += [f"{p.relative_to(tree)}\0{hash_file(p)}" for p in files]
    return hash_text(*parts)[:20]


def build(tree: Path, tests: list[str], cache: Path, jobs: int, what: str, version: str) -> Path:
    """The directory holding `tests` built from `tree` (cached); BuildError naming a test the source lacks."""
    where = {t: source_of(tree, t) for t in tests}
    if missing := [t for t, rel in where.items() if rel is None]:
        have = sorted(p.stem for d in ("", *ARCH_DIRS) for p in (tree / KVM / d).glob("*_test.c"))
        raise BuildError(
            f"{what}: its source (Linux {version}) has no KVM selftest {', '.join(map(repr, missing))} "
            f"in {KVM}; it has {', '.join(have[:12])}{' ...' if len(have) > 12 else ''}"
        )
    out = cache / "selftests" / hash_text(inputs_id(tree), *sorted(tests))[:20]
    if all((out / t).is_file() for t in tests):
        log(f"selftests for {what}: cached ({', '.join(tests)}) -> {out}")
        return out
    t0 = time.monotonic()
    with atomic_dir(out, replace=True) as tmp:
        headers = tmp / "usr"
        step = ["make", "-s", "-C", str(tree), f"O={tmp / 'hdr'}", "headers_install", f"INSTALL_HDR_PATH={headers}"]
        _make(step, what, "headers_install")
        targets = [str(tmp / "out" / where[t].with_suffix("")) for t in tests]  # type: ignore[union-attr]
        make = ["make", "-C", str(tree / KVM), f"-j{jobs}", f"OUTPUT={tmp / 'out'}"]
        make += [f"LINUX_HDR_PATH={headers}/include/", f"KHDR_INCLUDES=-isystem {headers}/include", *targets]
        _make(make, what, "the KVM selftests")
        for t, target in zip(tests, targets):
            shutil.copy2(target, tmp / t)
        for d in ("hdr", "usr", "out"):
            shutil.rmtree(tmp / d)
    log(f"selftests for {what}: built {', '.join(tests)} in {time.monotonic() - t0:.0f}s -> {out}")
    return out


def _make(cmd: list[str], what: str, step: str) -> None:
    r = run(cmd, capture=True, check=False)
    if r.returncode != 0:
        raise BuildError(f"{what}: building {step} failed:\n{(r.stdout + r.stderr)[-2000:]}")
