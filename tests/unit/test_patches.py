"""The shrinker-removal series: faithful to the mail, its variants chosen by kernel version. (Applied to the real
sources: tests/kernel/test_patches_apply.py.)"""

import subprocess
from pathlib import Path

import pytest

from harness.errors import PatchError, UnsupportedKernel
from harness.kernel.patches import PATCHES_DIR, Expectations, load_series
from harness.kernel.source import KernelVersion

SERIES = load_series("shrinker-removal")
MMU = "arch/x86/kvm/mmu/mmu.c"
REMOVES_SHRINKER = Expectations(removed=SERIES.verify_absent)


def numstat(patch: Path) -> str:
    return subprocess.run(
        ["git", "apply", "--numstat", str(patch)], capture_output=True, text=True, cwd="/"
    ).stdout.strip()


def test_rfc_is_faithful_to_the_mail():
    rfc = PATCHES_DIR / "shrinker-removal/rfc/0001-KVM-x86-mmu-Remove-KVM-memory-shrinker.patch"
    text = rfc.read_text()
    assert numstat(rfc) == f"3\t96\t{MMU}"
    assert "Subject: [PATCH RFC] KVM: x86/mmu: Remove KVM memory shrinker" in text
    assert "From: Vipin Sharma <vipinsh@google.com>" in text
    assert "Date: Tue, 03 May 2022 18:14:15 -0500" in text
    assert "Overall, this feature existed for many\nyears without providing meaningful benefit." in text
    assert "\n-\t\t * unfair on small ones\n" in text  # tabs restored


@pytest.mark.parametrize(
    "version, variant",
    [
        ("5.9.0", "rfc"),
        ("5.19.17", "rfc"),
        ("6.1.192", "v6.0-6.6"),
        ("6.6.1", "v6.0-6.6"),
        ("6.7.0", "v6.7-6.12"),
        ("6.12.117", "v6.7-6.12"),
    ],
)
def test_variant_selected_by_version(version, variant):
    v = KernelVersion(*map(int, version.split(".")))
    assert SERIES.select(v).name == variant


def test_upstream_and_unsupported_versions_are_explained():
    with pytest.raises(UnsupportedKernel, match=r"upstream since 6\.13"):
        SERIES.select(KernelVersion(6, 13, 0))
    with pytest.raises(UnsupportedKernel, match="no variant"):
        SERIES.select(KernelVersion(5, 4, 0))
    with pytest.raises(PatchError, match="no variant 'nope'"):
        SERIES.select(KernelVersion(6, 1, 0), "nope")
