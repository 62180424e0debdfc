"""Variants from patch files, mbox files, git ranges, git refs, own sources and parameters, resolved and tried
on a small real git repository shaped like a kernel tree (the kernel-sized checks are in test_own_patches)."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import git

from harness import REPO_ROOT
from harness.config import Experiment, load
from harness.errors import ConfigError, PatchError, SourceError
from harness.kernel.build import Builder
from harness.kernel.patches import split_mbox, touched_files

MMU = "arch/x86/kvm/mmu/mmu.c"
BASE = """// mmu
static struct percpu_counter kvm_total_used_mmu_pages;

static unsigned long mmu_shrink_scan(void)
{
\treturn 0;
}

static int keep_me(void)
{
\treturn 1;
}
"""
STEP1 = BASE.replace("static unsigned long mmu_shrink_scan(void)\n{\n\treturn 0;\n}\n\n", "")
STEP2 = STEP1.replace("static struct percpu_counter kvm_total_used_mmu_pages;\n\n", "")


def commit(repo: Path, text: str, msg: str) -> None:
    (repo / MMU).write_text(text)
    git(repo, "commit", "-qam", msg)


@pytest.fixture
def kernel_repo(tmp_path: Path) -> Path:
    """A git repository with a kernel Makefile and mmu.c: tag base, then two commits up to tag topic."""
    r = tmp_path / "linux"
    (r / MMU).parent.mkdir(parents=True)
    (r / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 7\nEXTRAVERSION =\n")
    (r / MMU).write_text(BASE)
    git(r, "init", "-q")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "base")
    git(r, "tag", "base")
    commit(r, STEP1, "KVM: x86/mmu: Stop registering the shrinker")
    commit(r, STEP2, "KVM: x86/mmu: Drop the global count")
    git(r, "tag", "topic")
    return r


def experiment(repo: Path, *variants: dict, ref: str = "base") -> Experiment:
    return Experiment.model_validate(
        {
            "name": "t",
            "source": {"kind": "git", "url": str(repo), "ref": ref},
            "variants": [{"name": "baseline"}, *variants],
            "phases": [{"name": "steady", "duration_s": 1}],
        }
    )


def resolved(exp: Experiment, cache: Path):
    return Builder(exp, cache).resolved()


def test_one_change_as_a_file_an_mbox_a_git_range_and_a_git_ref_is_one_build(kernel_repo, tmp_path):
    diff = tmp_path / "whole.patch"
    diff.write_text(git(kernel_repo, "diff", "base", "topic"))
    mbox = tmp_path / "series.mbox"
    mbox.write_text(git(kernel_repo, "format-patch", "--stdout", "--cover-letter", "base..topic"))
    patch_dir = tmp_path / "dir"
    git(kernel_repo, "format-patch", "-q", "-o", str(patch_dir), "base..topic")
    exp = experiment(
        kernel_repo,
        {"name": "file", "patches": [str(diff)], "expect_removed": ["mmu_shrink_scan"]},
        {"name": "mbox", "patches": [str(mbox)]},
        {"name": "directory", "patches": [str(patch_dir)]},
        {"name": "range", "git": {"range": "base..topic"}},
        {"name": "ref", "git": {"ref": "topic"}},
    )
    builder = Builder(exp, tmp_path / "cache")
    res = builder.resolved()
    assert [len(res[n].patches) for n in ("file", "mbox", "directory", "range", "ref")] == [1, 2, 2, 2, 1]
    assert "Drop the global count" in res["mbox"].patches[1].origin  # the cover letter was skipped
    assert res["range"].patches[0].origin.startswith("git ") and "(base..topic)" in res["range"].patches[0].origin
    assert not res["ref"].own_source and res["ref"].source.identity == res["baseline"].source.identity
    ids = {n: r.trial.result_id for n, r in res.items()}
    assert ids["baseline"] == "" and len({ids[n] for n in ids if n != "baseline"}) == 1
    keys = {n: repr(sorted(builder.inputs(r).items())) for n, r in res.items()}
    assert len({keys[n] for n in keys if n != "baseline"}) == 1 and keys["baseline"] != keys["file"]
    assert res["file"].trial.evidence == ("'mmu_shrink_scan' removed from arch/x86/kvm/mmu/mmu.c",)
    # the tree the build starts from was not touched by trying
    assert (res["file"].source.tree / MMU).read_text() == BASE


def test_a_patch_that_does_not_apply_is_named_with_its_variant_and_hunk_before_any_build(kernel_repo, tmp_path):
    rename = tmp_path / "0001-rename.patch"  # applies once; the second time its hunk finds no keep_me
    rename.write_text(
        f"--- a/{MMU}\n+++ b/{MMU}\n@@ -9,3 +9,3 @@\n \n-static int keep_me(void)\n+static int kept(void)\n {{\n"
    )
    exp = experiment(kernel_repo, {"name": "mine", "patches": [str(rename), str(rename)]})
    with pytest.raises(PatchError) as e:
        resolved(exp, tmp_path / "c")
    msg = str(e.value)
    assert "variant mine" in msg and "0001-rename.patch does not apply" in msg and f"{MMU}, hunk #1 (@@ -9,3" in msg
    assert not (tmp_path / "c" / "builds").exists()


def test_expectations_must_be_able_to_fail(kernel_repo, tmp_path):
    diff = tmp_path / "d.patch"
    diff.write_text(git(kernel_repo, "diff", "base", "topic"))
    with pytest.raises(PatchError, match="'mmu_shrink_cnt' is in none of the files the patches touch"):
        resolved(
            experiment(kernel_repo, {"name": "p", "patches": [str(diff)], "expect_removed": ["mmu_shrink_cnt"]}),
            tmp_path / "c",
        )
    with pytest.raises(PatchError, match="no file it touches holds 'new_helper'"):
        resolved(
            experiment(kernel_repo, {"name": "p", "patches": [str(diff)], "expect_present": ["new_helper"]}),
            tmp_path / "c",
        )
    ok = resolved(
        experiment(kernel_repo, {"name": "p", "patches": [str(diff)], "expect_present": ["keep_me"]}), tmp_path / "c"
    )
    assert ok["p"].trial.evidence == ("'keep_me' in arch/x86/kvm/mmu/mmu.c",)


def test_git_inputs_are_checked(kernel_repo, tmp_path):
    with pytest.raises(SourceError, match="ref 'nope' not found"):
        resolved(experiment(kernel_repo, {"name": "p", "git": {"ref": "nope"}}), tmp_path / "c")
    with pytest.raises(PatchError, match="holds no commits"):
        resolved(experiment(kernel_repo, {"name": "p", "git": {"range": "topic..base"}}), tmp_path / "c")
    with pytest.raises(PatchError, match="nothing differs"):
        resolved(experiment(kernel_repo, {"name": "p", "git": {"ref": "base"}}), tmp_path / "c")
    git(kernel_repo, "checkout", "-q", "-b", "side", "base")
    (kernel_repo / "README").write_text("side\n")
    git(kernel_repo, "add", "README")
    git(kernel_repo, "commit", "-qm", "side")
    git(kernel_repo, "checkout", "-q", "topic")
    git(kernel_repo, "merge", "-q", "--no-edit", "side")
    with pytest.raises(PatchError, match="merge commits"):
        resolved(experiment(kernel_repo, {"name": "p", "git": {"range": "base..HEAD"}}), tmp_path / "c")


def test_a_ref_of_another_repository_or_an_own_source_is_a_build_of_its_own(kernel_repo, tmp_path):
    other = tmp_path / "upstream"
    subprocess.run(["git", "clone", "-q", str(kernel_repo), str(other)], check=True)
    (other / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 13\nSUBLEVEL = 0\nEXTRAVERSION =\n")
    git(other, "commit", "-qam", "v6.13")
    git(other, "tag", "v6.13")
    exp = experiment(
        kernel_repo,
        {"name": "clone-ref", "git": {"repo": str(other), "ref": "v6.13"}},
        {"name": "upstream", "source": {"kind": "git", "url": str(other), "ref": "v6.13"}},
    )
    res = resolved(exp, tmp_path / "c")
    for name in ("clone-ref", "upstream"):
        assert res[name].own_source and str(res[name].source.version) == "6.13.0" and not res[name].patches
        assert res[name].source.identity != res["baseline"].source.identity
    assert "shares nothing" in "\n".join(res["upstream"].describe())


def test_mbox_splitting_skips_the_cover_letter_and_refuses_what_holds_no_diff(tmp_path):
    msgs = split_mbox(REPO_ROOT / "configs/examples/shrinker-removal-in-two.mbox")
    assert [s for s, _ in msgs] == [
        "[PATCH 1/2] KVM: x86/mmu: Stop registering the x86-mmu shrinker",
        "[PATCH 2/2] KVM: x86/mmu: Drop the global count of shadow pages",
    ]
    gz = tmp_path / "t.mbox.gz"  # as lore gives a thread
    gz.write_bytes(gzip.compress((REPO_ROOT / "configs/examples/shrinker-removal-in-two.mbox").read_bytes()))
    assert split_mbox(gz) == msgs
    notes = tmp_path / "notes.txt"
    notes.write_text("just words\n")
    with pytest.raises(PatchError, match="holds no diff"):
        split_mbox(notes)
    evil = tmp_path / "evil.patch"
    evil.write_text("--- a/../../etc/passwd\n+++ b/../../etc/passwd\n@@ -1 +1 @@\n-x\n+y\n")
    with pytest.raises(PatchError, match="outside the tree"):
        touched_files(evil)


def test_variant_parameters_are_checked_and_rendered():
    def variant(**kw):
        return Experiment.model_validate(
            {
                "name": "t",
                "source": {"kind": "local", "path": "/"},
                "variants": [{"name": "v", **kw}],
                "phases": [{"name": "s", "duration_s": 1}],
            }
        ).variants[0]

    v = variant(cmdline=["kvm.mmio_caching=0"], module_params={"kvm": {"tdp_mmu": False}, "kvm_amd": {"avic": 1}})
    assert v.kernel_params() == ["kvm.mmio_caching=0", "kvm.tdp_mmu=N", "kvm_amd.avic=1"]
    for bad in (
        {"cmdline": ["init=/bin/sh"]},
        {"cmdline": ["nestpress.level=l1"]},
        {"cmdline": ["a b"]},
        {"cmdline": ["--"]},
        {"module_params": {"kvm": {"tdp_mmu": "0 init=/bin/sh"}}},
        {"module_params": {"Kvm;": {"x": 1}}},
        {"git": {"ref": "a", "range": "a..b"}},
        {"git": {"ref": "--upload-pack=x"}},
        {"git": {"repo": "-oProxyCommand=x", "ref": "a"}},
        {"git": {"ref": "main"}, "source": {"kind": "local", "path": "/"}},
        {"git": {"ref": "main"}},  # no repo, and the experiment's source is no git repository
    ):
        with pytest.raises(ValueError):
            variant(**bad)


def test_patch_paths_are_relative_to_the_config_and_every_example_is_a_valid_config(tmp_path):
    cfg = tmp_path / "sub" / "mine.yaml"
    cfg.parent.mkdir()
    cfg.write_text(
        "name: mine\nsource: {kind: local, path: /}\nphases: [{name: s, duration_s: 1}]\n"
        "variants: [{name: baseline}, {name: p, patches: [fix.patch, ../d/], git: {repo: clone, range: a..b}}]\n"
    )
    v = load(cfg).experiment.variants[1]
    assert v.patches == [str(cfg.parent / "fix.patch"), str(tmp_path / "d")]
    assert v.git is not None and v.git.repo == str(cfg.parent / "clone")
    examples = sorted((REPO_ROOT / "configs/examples").glob("*.yaml"))
    assert len(examples) >= 6
    for example in examples:
        assert len(load(example).experiment.variants) >= 2
    with pytest.raises(ConfigError, match="give exactly one of ref or range"):
        load(cfg, ["variants.p.git={repo: x}"])


def test_the_git_refs_example_builds_the_other_ref_as_a_diff_on_the_same_tree(kernel_repo, tmp_path):
    git(kernel_repo, "tag", "v6.6", "base")
    git(kernel_repo, "branch", "my-kvm-topic", "topic")
    m = load(REPO_ROOT / "configs/examples/git-refs.yaml", [f"source.url={kernel_repo}"])
    res = resolved(m.experiment, tmp_path / "c")
    (diff,) = res["my-branch"].patches
    base, topic = (git(kernel_repo, "rev-parse", r).strip() for r in ("v6.6^{commit}", "topic"))
    assert diff.origin == f"git diff {base}..{topic} (my-kvm-topic)" and not res["my-branch"].own_source
    assert res["my-branch"].trial.touched == (MMU,)


def test_a_configs_hash_does_not_depend_on_where_it_lies(tmp_path):
    """A resume compares the config's hash: a checkout moved (or shipped to a new code directory on a lab
    host) must not make the same config another experiment, though its patch paths are anchored there."""
    text = (REPO_ROOT / "configs/examples/mbox.yaml").read_text()
    hashes = []
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "mbox.yaml").write_text(text)
        m = load(tmp_path / d / "mbox.yaml")
        assert m.experiment.variants[1].patches == [str(tmp_path / d / "shrinker-removal-in-two.mbox")]
        hashes.append(m.config_hash())
    assert hashes[0] == hashes[1]


def test_a_config_from_outside_the_harness_ships_with_its_own_patches(tmp_path):
    from harness.lab.shipping import config_files

    (tmp_path / "fixes").mkdir()
    (tmp_path / "fixes" / "0001-a.patch").write_text("--- a/x\n+++ b/x\n")
    (tmp_path / "one.patch").write_text("--- a/y\n+++ b/y\n")
    mbox = REPO_ROOT / "configs/examples/shrinker-removal-in-two.mbox"
    cfg = tmp_path / "ab.yaml"
    cfg.write_text(
        "name: t\nsource: {kind: local, path: /}\nphases: [{name: s, duration_s: 1}]\n"
        f"variants: [{{name: b}}, {{name: p, patches: [fixes, one.patch, {tmp_path / 'one.patch'}, {mbox}]}}]\n"
    )
    (tmp_path / "out").mkdir()
    rel, files = config_files(cfg, tmp_path / "out")
    assert rel == "shipped/ab.yaml"
    names = {name for name, _ in files}
    assert {n.split("/")[-1] for n in names} == {"ab.yaml", "0001-a.patch", "one.patch"}
    shipped = yaml.safe_load(dict(files)["shipped/ab.yaml"].read_text())["variants"][1]["patches"]
    assert shipped[0].startswith("patches/") and f"shipped/{shipped[0]}/0001-a.patch" in names
    assert shipped[1] == shipped[2] and f"shipped/{shipped[1]}" in names  # one file, named two ways
    assert shipped[3] == "../configs/examples/shrinker-removal-in-two.mbox"  # in the harness tree: it is there
    inside = REPO_ROOT / "configs/examples/mbox.yaml"
    assert config_files(inside, tmp_path) == ("configs/examples/mbox.yaml", [("configs/examples/mbox.yaml", inside)])
