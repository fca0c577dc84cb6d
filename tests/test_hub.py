"""hub.resolve and the safe unzip of *.mlmodelc.zip parts; never the network."""
import os
import stat
import zipfile
from pathlib import Path

import pytest

from anemll_fast import hub
from anemll_fast.errors import HubError


def make_bundle_zip(path: Path, bundle: str, files: dict, prefix: bool = True) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"{bundle}/{name}" if prefix else name, data)
    return path


def test_resolve_local_directory_and_unzips(tmp_path):
    make_bundle_zip(tmp_path / "a.mlmodelc.zip", "a.mlmodelc",
                    {"model.mil": "program(1.3)\n", "weights/weight.bin": b"\0" * 64})
    path = hub.resolve(tmp_path)
    assert path == tmp_path.resolve()
    assert (tmp_path / "a.mlmodelc" / "model.mil").read_text() == "program(1.3)\n"
    assert (tmp_path / "a.mlmodelc" / "weights" / "weight.bin").stat().st_size == 64
    assert hub.is_unpacked(tmp_path / "a.mlmodelc")
    # Idempotent: a second resolve keeps what is there.
    (tmp_path / "a.mlmodelc" / "model.mil").write_text("kept")
    hub.resolve(tmp_path)
    assert (tmp_path / "a.mlmodelc" / "model.mil").read_text() == "kept"


def test_zip_with_contents_at_root(tmp_path):
    make_bundle_zip(tmp_path / "b.mlmodelc.zip", "b.mlmodelc", {"model.mil": "x"}, prefix=False)
    hub.unzip_parts(tmp_path)
    assert (tmp_path / "b.mlmodelc" / "model.mil").read_text() == "x"


@pytest.mark.parametrize("entry, why", [
    ("../evil.txt", "escapes"),
    ("c.mlmodelc/../../evil.txt", "escapes"),
    ("/etc/evil.txt", "absolute"),
    ("C:/evil.txt", "absolute"),
])
def test_zip_slip_and_absolute_paths_refused(tmp_path, entry, why):
    archive = tmp_path / "c.mlmodelc.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("c.mlmodelc/model.mil", "ok")
        zf.writestr(entry, "evil")
    with pytest.raises(HubError, match=why) as err:
        hub.unzip_parts(tmp_path)
    assert "c.mlmodelc.zip" in str(err.value) and entry in str(err.value)
    assert not (tmp_path / "c.mlmodelc").exists()
    assert not (tmp_path.parent / "evil.txt").exists()
    assert not list(tmp_path.glob(".c.mlmodelc.partial-*"))


def test_containment_check_rejects_a_sibling_sharing_the_prefix(tmp_path):
    # Zip entries with ".." are refused before this check, so it is tested directly: the last guard of
    # every unpacked path must not be a string-prefix comparison ("m" is a prefix of "m_evil").
    (tmp_path / "m").mkdir()
    (tmp_path / "m_evil").mkdir()
    assert hub._inside(tmp_path / "m", tmp_path / "m" / "a" / "b")
    assert not hub._inside(tmp_path / "m", tmp_path / "m_evil" / "model.mil")
    assert not hub._inside(tmp_path / "m", tmp_path / "m" / ".." / "m_evil")
    (tmp_path / "m" / "link").symlink_to(tmp_path / "m_evil")
    assert not hub._inside(tmp_path / "m", tmp_path / "m" / "link" / "x")


def test_symlink_entries_refused(tmp_path):
    archive = tmp_path / "d.mlmodelc.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("d.mlmodelc/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(HubError, match="symbolic link"):
        hub.unzip_parts(tmp_path)
    assert not (tmp_path / "d.mlmodelc").exists()


def test_corrupt_zip_leaves_nothing_that_looks_complete(tmp_path):
    archive = make_bundle_zip(tmp_path / "e.mlmodelc.zip", "e.mlmodelc",
                              {"model.mil": "x" * 10000, "weights/weight.bin": os.urandom(10000)})
    data = bytearray(archive.read_bytes())
    # Damage the compressed data of the second member (CRC fails on read).
    where = data.find(b"weights/weight.bin") + 40
    data[where:where + 200] = b"\0" * 200
    archive.write_bytes(bytes(data))
    with pytest.raises(HubError, match="e.mlmodelc.zip"):
        hub.unzip_parts(tmp_path)
    assert not (tmp_path / "e.mlmodelc").exists()
    assert not list(tmp_path.glob(".e.mlmodelc.partial-*"))
    (tmp_path / "e.mlmodelc.zip").write_bytes(b"not a zip")
    with pytest.raises(HubError, match="not a readable zip"):
        hub.unzip_parts(tmp_path)


def test_interrupted_unzip_is_not_taken_for_complete(tmp_path, monkeypatch):
    archive = make_bundle_zip(tmp_path / "f.mlmodelc.zip", "f.mlmodelc", {"model.mil": "x", "w.bin": "y"})
    calls = {"n": 0}
    real = hub.shutil.copyfileobj

    def dying_copy(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(hub.shutil, "copyfileobj", dying_copy)
    with pytest.raises(KeyboardInterrupt):
        hub.safe_unzip(archive, tmp_path / "f.mlmodelc")
    assert not (tmp_path / "f.mlmodelc").exists()
    monkeypatch.undo()
    assert hub.safe_unzip(archive, tmp_path / "f.mlmodelc") == tmp_path / "f.mlmodelc"
    assert hub.is_unpacked(tmp_path / "f.mlmodelc")


def test_existing_incomplete_target_is_reported_not_deleted(tmp_path):
    archive = make_bundle_zip(tmp_path / "g.mlmodelc.zip", "g.mlmodelc", {"model.mil": "x"})
    (tmp_path / "g.mlmodelc").mkdir()
    (tmp_path / "g.mlmodelc" / "notes.txt").write_text("mine")
    with pytest.raises(HubError, match="not a complete compiled model"):
        hub.safe_unzip(archive, tmp_path / "g.mlmodelc")
    assert (tmp_path / "g.mlmodelc" / "notes.txt").read_text() == "mine"


def test_bad_targets(tmp_path):
    with pytest.raises(HubError, match="neither an existing directory nor a Hugging Face repo id"):
        hub.resolve(tmp_path / "missing" / "dir")
    f = tmp_path / "file.txt"
    f.write_text("")
    with pytest.raises(HubError, match="not a directory"):
        hub.resolve(f)


def test_repo_id_offline_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE at import; patch its constant too.
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="anemll/not-a-real-model"):
        hub.resolve("anemll/not-a-real-model", cache_dir=tmp_path / "cache")


def test_repo_id_from_local_fake_cache(tmp_path, monkeypatch):
    """A repo already in the huggingface_hub cache resolves offline, and is unzipped."""
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    repo_dir = cache / "models--anemll--fake-model"
    commit = "0" * 40
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    (snap / "meta.yaml").write_text("model_info: {}\n")
    make_bundle_zip(snap / "h.mlmodelc.zip", "h.mlmodelc", {"model.mil": "x"})
    path = hub.resolve("anemll/fake-model", cache_dir=cache)
    assert path == snap
    assert (snap / "h.mlmodelc" / "model.mil").is_file()


def test_is_repo_id():
    assert hub.is_repo_id("anemll/anemll-Qwen-Qwen3-0.6B-ctx512_0.3.4")
    assert not hub.is_repo_id("../x")
    assert not hub.is_repo_id("a/b/c")
