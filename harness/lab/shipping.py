"""What goes to a lab host: the harness as git tracks it (never an untracked file), owned by root and written by
nobody else, and a config with the patch files it names; named by content, so the same tree ships once."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import yaml

from .. import REPO_ROOT
from ..config import anchored, load_raw
from ..errors import RemoteError

SHIP_EXCLUDE = (".venv", "results", ".git", "__pycache__", ".pytest_cache", "build")


def project_files() -> list[str]:
    """Files to ship: what git tracks (never untracked files: a stray secret would travel to every host);
    outside a git checkout, a walk minus build outputs."""
    r = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files"], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return [f for f in r.stdout.splitlines() if (REPO_ROOT / f).is_file()]
    out = []
    for root, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if d not in SHIP_EXCLUDE and not d.endswith(".egg-info")]
        out += [os.path.relpath(os.path.join(root, f), REPO_ROOT) for f in files]
    return out


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Shipped code belongs to root and nobody else may write it: root runs it on the lab host."""
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode &= ~0o022
    return info


def config_files(config: Path, scratch: Path) -> tuple[str, list[tuple[str, Path]]]:
    """The config's path in the shipped tree, and the files it brings. A config of the harness tree keeps its
    place (its relative patch paths hold there). One from elsewhere goes to shipped/, with its variants'
    patch files beside it (shipped/patches/<id>/<name>) and rewritten to name them there (written to
    scratch): a user's own patch travels with the config that names it."""
    cfg = config.resolve()
    if cfg.is_relative_to(REPO_ROOT):
        rel = cfg.relative_to(REPO_ROOT).as_posix()
        return rel, [(rel, cfg)]
    _, raw = load_raw(cfg)
    rel = f"shipped/{cfg.name}"
    extra: list[tuple[str, Path]] = []
    variants = raw.get("variants")
    for v in variants if isinstance(variants, list) else []:
        if not isinstance(v, dict) or not isinstance(v.get("patches"), list):
            continue
        named = []
        for given in v["patches"]:
            local = Path(anchored(cfg.parent, str(given)))
            if local.is_relative_to(REPO_ROOT):
                named.append(os.path.relpath(local, REPO_ROOT / "shipped"))
                continue
            if not local.exists():
                raise RemoteError(f"{cfg}: variant {v.get('name')}: patch path {local} does not exist")
            tag = hashlib.sha256(str(local).encode()).hexdigest()[:12]
            members = sorted(local.glob("*.patch")) if local.is_dir() else [local]
            extra += [(f"shipped/patches/{tag}/{f.name}", f) for f in members]
            named.append(f"patches/{tag}" + ("" if local.is_dir() else f"/{local.name}"))
        v["patches"] = named
    if not any(isinstance(v, dict) and v.get("patches") for v in variants or []):
        return rel, [(rel, cfg)]  # nothing to rewrite: the config as written, comments and all
    rewritten = scratch / cfg.name
    rewritten.write_text(yaml.safe_dump(raw, sort_keys=False))
    return rel, [(rel, rewritten), *extra]


def content_id(files: list[tuple[str, Path]]) -> str:
    """Names what is shipped by what it is (names, shipped modes, bytes): the same tree ships once."""
    h = hashlib.sha256()
    for arcname, path in sorted(files):
        data = path.read_bytes()
        mode = stat.S_IMODE(path.stat().st_mode) & ~0o022
        h.update(f"{arcname}\0{mode:o}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def tarball(files: list[tuple[str, Path]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for arcname, path in files:
            tar.add(str(path), arcname=arcname, recursive=False, filter=_root_owned)
    return buf.getvalue()
