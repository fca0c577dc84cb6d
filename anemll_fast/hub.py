"""Find a model: a local directory or a Hugging Face repo id, unpacked safely.

Downloads go through huggingface_hub (its cache, its progress bars,
`HF_HUB_OFFLINE` honoured). ANEMLL publishes compiled parts as
`*.mlmodelc.zip`; they are unzipped next to the archive, refusing entries that
would escape the target, absolute paths and symlinks, and never leaving a
half-written directory that later passes as complete.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import List, Optional, Union

from anemll_fast.errors import HubError

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Written inside an unpacked directory once every entry is in place.
_COMPLETE_MARK = ".anemll_fast_unzipped"


def is_repo_id(text: str) -> bool:
    """True for `owner/name` strings that are not an existing local path."""
    return bool(_REPO_ID_RE.match(text)) and not os.path.exists(text) and ".." not in text


def resolve(
    model: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    unzip: bool = True,
) -> Path:
    """Local directory holding the model, downloading it first for a repo id.

    Every `*.mlmodelc.zip` in the directory is unpacked (once) when `unzip`.
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HubError(f"model path {text!r} is not a directory")
        local = path.resolve()
    elif is_repo_id(text):
        local = _download(text, revision=revision, cache_dir=cache_dir)
    else:
        raise HubError(
            f"model {text!r} is neither an existing directory nor a Hugging Face repo id (owner/name)"
        )
    if unzip:
        unzip_parts(local)
    for bundle in sorted(local.glob("*.mlmodelc")):
        check_compiled_model(bundle)
    return local


# A weight reference in a compiled model's model.mil.
_BLOB_REF_RE = re.compile(r'BLOBFILE\(path\s*=\s*string\("@model_path/([^"]+)"\),\s*offset\s*=\s*uint64\((\d+)\)\)')


def check_compiled_model(bundle: Union[str, os.PathLike]) -> None:
    """Raise HubError if a compiled `.mlmodelc` directory is incomplete, e.g. a partial download of a repo that
    publishes unzipped bundles: model.mil missing, or a weight file missing or shorter than the blobs model.mil
    references (checked at the last blob of each file, where a truncated download ends)."""
    from anemll_fast.mil.blobfile import BlobReader
    from anemll_fast.mil.errors import WeightFileError

    bundle = Path(bundle)
    if not bundle.is_dir():
        return
    if not (bundle / "model.mil").is_file():
        raise HubError(f"{bundle}: incomplete compiled model, model.mil missing "
                       f"(an interrupted download? delete it and download again)")
    last: dict = {}
    with open(bundle / "model.mil", "r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            for rel, offset in _BLOB_REF_RE.findall(line):
                last[rel] = max(last.get(rel, 0), int(offset))
    for rel, offset in sorted(last.items()):
        path = bundle / rel
        if not _inside(bundle, path):
            raise HubError(f"{bundle}: model.mil references weights outside the bundle ({rel!r})")
        if not path.is_file():
            raise HubError(f"{bundle}: incomplete compiled model, weight file {rel} missing "
                           f"(an interrupted download? delete it and download again)")
        try:
            reader = BlobReader(str(path))
            try:
                reader.metadata(offset)
            finally:
                reader.close()
        except WeightFileError as exc:
            raise HubError(f"{bundle}: incomplete or corrupt weight file {rel}: {exc}") from None


def _download(repo_id: str, revision: Optional[str], cache_dir: Optional[Union[str, os.PathLike]]) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - a hard dependency
        raise HubError(f"huggingface_hub is needed to download {repo_id!r}: {exc}") from None
    try:
        path = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
        )
    except LocalEntryNotFoundError as exc:
        raise HubError(
            f"model {repo_id!r} is not in the Hugging Face cache and cannot be downloaded "
            f"(offline, or HF_HUB_OFFLINE=1): {exc}"
        ) from None
    except HfHubHTTPError as exc:
        raise HubError(f"downloading {repo_id!r} failed: {exc}") from None
    except (OSError, ValueError) as exc:
        raise HubError(f"downloading {repo_id!r} failed: {exc}") from None
    return Path(path)


def unzip_parts(directory: Union[str, os.PathLike]) -> List[Path]:
    """Unpack every `*.mlmodelc.zip` in `directory` that is not unpacked yet."""
    directory = Path(directory)
    done = []
    for archive in sorted(directory.glob("*.mlmodelc.zip")):
        target = directory / archive.name[: -len(".zip")]
        done.append(safe_unzip(archive, target))
    return done


def is_unpacked(target: Union[str, os.PathLike], archive: Union[str, os.PathLike, None] = None) -> bool:
    """True when `target` was completely unpacked (from `archive` as it is now, when given)."""
    mark = Path(target) / _COMPLETE_MARK
    if not mark.is_file():
        return False
    if archive is None:
        return True
    try:
        return mark.read_text(encoding="utf-8", errors="replace").strip() == _archive_key(Path(archive))
    except OSError:
        return False


def _archive_key(archive: Path) -> str:
    """What identifies the archive a directory was unpacked from: a replaced
    archive (new size or modification time) is unpacked again."""
    st = archive.stat()
    return f"{archive.name} size={st.st_size} mtime_ns={st.st_mtime_ns}"


def _umask() -> int:
    # No way to read the umask without setting it; restored at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def safe_unzip(archive: Union[str, os.PathLike], target: Union[str, os.PathLike]) -> Path:
    """Unpack `archive` (a zipped `X.mlmodelc`) into `target` atomically.

    The archive may hold `X.mlmodelc/...` (as ANEMLL zips them) or the bundle's
    contents at its root. Entries escaping the target, absolute paths and
    symlinks are refused. Unpacking happens in a temporary sibling directory
    renamed into place when complete, so an interrupted run leaves nothing that
    passes as unpacked.
    """
    archive = Path(archive)
    target = Path(target)
    stale = False
    if target.exists():
        # We only ever rename a finished directory into place, so an existing
        # one is either ours (marked) or the user's own unpacked bundle.
        if is_unpacked(target):
            if is_unpacked(target, archive):
                return target
            stale = True  # the archive was replaced since: unpack it again
        elif (target / "model.mil").is_file():
            return target
        else:
            raise HubError(
                f"{target} exists but is not a complete compiled model (no model.mil); "
                f"remove it to unpack {archive.name} again"
            )
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise HubError(f"{archive}: not a readable zip archive ({exc})") from None
    with zf:
        members = zf.infolist()
        strip = _common_prefix(members, target.name)
        plan = []
        for info in members:
            name = info.filename
            _check_member(archive, info)
            rel = PurePosixPath(name)
            if strip:
                rel = PurePosixPath(*rel.parts[1:]) if len(rel.parts) > 1 else PurePosixPath(".")
            if str(rel) in (".", ""):
                continue
            plan.append((info, rel))
        if not any(str(rel) == "model.mil" and not info.is_dir() for info, rel in plan):
            what = "is empty" if not plan else "holds no model.mil at the bundle's root"
            raise HubError(f"{archive}: {what}, so it is not a compiled Core ML model (.mlmodelc)")
        key = _archive_key(archive)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            for info, rel in plan:
                dest = tmp.joinpath(*rel.parts)
                if not _inside(tmp, dest):
                    raise HubError(f"{archive}: entry {info.filename!r} escapes the target directory")
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            (tmp / _COMPLETE_MARK).write_text(key + "\n", encoding="utf-8")
            # mkdtemp makes it 0700: give it the mode any new directory gets, so that
            # other users can load a model unpacked in a shared place.
            os.chmod(tmp, 0o777 & ~_umask())
            if stale:
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
                os.replace(target, old / target.name)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise HubError(f"{archive}: corrupt zip archive ({exc})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _check_member(archive: Path, info: zipfile.ZipInfo) -> None:
    name = info.filename
    if "\x00" in name:
        raise HubError(f"{archive}: entry {name!r} has a NUL byte in its name")
    if name.startswith("/") or name.startswith("\\") or re.match(r"^[A-Za-z]:", name):
        raise HubError(f"{archive}: entry {name!r} is an absolute path")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        raise HubError(f"{archive}: entry {name!r} escapes the target directory")
    mode = (info.external_attr >> 16) & 0xFFFF
    if stat.S_ISLNK(mode):
        raise HubError(f"{archive}: entry {name!r} is a symbolic link")


def _common_prefix(members: List[zipfile.ZipInfo], bundle_name: str) -> bool:
    """True when every entry sits under `bundle_name/` (ANEMLL's zips)."""
    if not members:
        return False
    for info in members:
        first = PurePosixPath(info.filename.replace("\\", "/")).parts
        if not first or first[0] != bundle_name:
            return False
    return True


def _inside(root: Path, path: Path) -> bool:
    root_s = os.path.realpath(root)
    path_s = os.path.realpath(path)
    return os.path.commonpath([root_s, path_s]) == root_s
