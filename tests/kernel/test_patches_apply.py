"""The shrinker-removal series applied to the real Debian kernel sources (6.1 and 6.12)."""

import hashlib
import subprocess
from pathlib import Path

import pytest

from harness.config import Source
from harness.errors import PatchError
from harness.kernel.patches import Expectations, PatchFile, apply, load_series, trial
from harness.kernel.source import makefile_version, prepare

SERIES = load_series("shrinker-removal")
MMU = "arch/x86/kvm/mmu/mmu.c"
REMOVES_SHRINKER = Expectations(removed=SERIES.verify_absent)


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
