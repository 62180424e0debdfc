"""The shrinker-removal series against the real Debian kernel sources."""

import hashlib
import subprocess
from pathlib import Path

import pytest

from harness.config import Source
from harness.errors import PatchError, UnsupportedKernel
from harness.kernel.patches import PATCHES_DIR, Expectations, PatchFile, apply, load_series, trial
from harness.kernel.source import KernelVersion, makefile_version, prepare

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


def _copy_tree(src: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-al", f"{src}/.", str(dest)], check=True)
    return dest


@pytest.fixture(scope="module")
def tree61(src61, cache_dir):
    return prepare(Source(kind="tarball", path=str(src61)), cache_dir).tree


@pytest.fixture(scope="module")
def tree612(src612, cache_dir):
    return prepare(Source(kind="tarball", path=str(src612)), cache_dir).tree


@pytest.mark.kernel
@pytest.mark.parametrize("which, variant", [("tree61", "v6.0-6.6"), ("tree612", "v6.7-6.12")])
def test_variant_applies_to_debian_tree_and_removes_shrinker(request, tmp_path, which, variant):
    pristine = request.getfixturevalue(which)
    before = hashlib.sha256((pristine / MMU).read_bytes()).hexdigest()
    tree = _copy_tree(pristine, tmp_path / "t")
    pv = SERIES.select(makefile_version(tree))
    assert pv.name == variant
    patches = [PatchFile(p, p.name) for p in pv.patches]
    evidence = trial(tree, patches, REMOVES_SHRINKER, "series").evidence  # on copies: the tree is untouched
    assert (tree / MMU).read_bytes() == (pristine / MMU).read_bytes()
    apply(tree, patches, "series")
    text = (tree / MMU).read_text()
    assert "mmu_shrink_scan" not in text and '"x86-mmu"' not in text and evidence
    # the shared pristine tree was not touched through the hard links
    assert hashlib.sha256((pristine / MMU).read_bytes()).hexdigest() == before


@pytest.mark.kernel
def test_wrong_variant_fails_cleanly_naming_patch_file_and_hunk(tree612, tmp_path):
    tree = _copy_tree(tree612, tmp_path / "t")
    before = (tree / MMU).read_bytes()
    with pytest.raises(PatchError) as e:
        apply(tree, [PatchFile(p, p.name) for p in SERIES.select(makefile_version(tree), "v6.0-6.6").patches], "x")
    msg = str(e.value)
    assert "0001-KVM-x86-mmu-Remove-KVM-memory-shrinker.patch" in msg and MMU in msg and "hunk #" in msg
    assert (tree / MMU).read_bytes() == before  # nothing half-applied


@pytest.mark.kernel
def test_a_patch_that_does_not_remove_what_it_should_is_caught(tree61, tmp_path):
    comment = tmp_path / "comment.patch"
    comment.write_text(
        f"--- a/{MMU}\n+++ b/{MMU}\n@@ -1,1 +1,2 @@\n+/* harmless */\n "
        + (tree61 / MMU).read_text().splitlines(True)[0]
    )
    with pytest.raises(PatchError, match="still hold 'mmu_shrink_scan': it did not take effect"):
        trial(tree61, [PatchFile(comment, "comment.patch")], REMOVES_SHRINKER, "variant v")


@pytest.mark.kernel
def test_kernel_version_from_makefile(tree61, tree612):
    assert makefile_version(tree61).mm == (6, 1)
    assert makefile_version(tree612).mm == (6, 12)
