"""The registry of published data sources (``scripts/data/sources.yaml``) and the Hub files
behind each: listing with sizes, revision resolved to a commit, resumable downloads.

Downloads go through huggingface_hub into its cache (``HF_HUB_CACHE`` / ``HF_HOME``), with
its token (``HF_TOKEN``) and offline rules: with ``HF_HUB_OFFLINE=1`` (or no network) the
files come from a cached snapshot of the revision, and a file that is not there is an error
that says so.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from comp.errors import UserError

FORMATS = {
    "llava_json": ("records", "archives"),
    "parquet": ("files",),
    "caption_jsonl": ("records", "archives", "prompt"),
}
SOURCE_KEYS = {"repo", "revision", "image_prefix", "expected_records", "subset", "parts"}


@dataclass(frozen=True)
class Part:
    format: str
    records: str | None = None  # a file in the repo
    archives: tuple[str, ...] = ()  # patterns
    files: tuple[str, ...] = ()  # patterns
    prompt: str = ""


@dataclass(frozen=True)
class SourceSpec:
    json_path: str
    repo: str
    revision: str
    image_prefix: str
    expected_records: int | None
    parts: tuple[Part, ...]
    subset_count: int | None = None
    subset_seed: int = 0

    @property
    def slug(self) -> str:
        return self.json_path.replace("/", "__")


def default_registry(stage_yaml: str | os.PathLike) -> Path:
    """``sources.yaml`` beside the stage YAML (where scripts/data keeps it)."""
    return Path(stage_yaml).parent / "sources.yaml"


def load_registry(path: str | os.PathLike) -> dict[str, SourceSpec]:
    """json_path -> SourceSpec; every mistake is a UserError naming the file and the entry."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError("no source registry", path, "pass --sources FILE (scripts/data/sources.yaml)") from None
    except yaml.YAMLError as err:
        raise UserError(f"the source registry is not valid YAML: {err}", path, "fix the file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), dict):
        raise UserError("the source registry has no 'sources:' mapping", path,
                        "write sources: {json_path: {repo, revision, parts, ...}}")
    return {key: _source(key, entry, path) for key, entry in doc["sources"].items()}


def _source(key: str, entry, path: Path) -> SourceSpec:
    def bad(what: str) -> UserError:
        return UserError(f"source {key!r}: {what}", path, "see the comment at the top of the registry")

    if not isinstance(entry, dict):
        raise bad("expected a mapping")
    unknown = set(entry) - SOURCE_KEYS
    if unknown or not {"repo", "parts", "image_prefix"} <= set(entry):
        raise bad(f"needs repo, image_prefix, parts (allowed keys: {sorted(SOURCE_KEYS)}); got {sorted(entry)}")
    parts = []
    for k, part in enumerate(entry["parts"] or []):
        if not isinstance(part, dict) or part.get("format") not in FORMATS:
            raise bad(f"part {k}: 'format' must be one of {sorted(FORMATS)}")
        allowed = {"format", *FORMATS[part["format"]]}
        if set(part) - allowed:
            raise bad(f"part {k}: unknown keys {sorted(set(part) - allowed)} for {part['format']}")
        parts.append(Part(part["format"], part.get("records"), tuple(part.get("archives") or ()),
                          tuple(part.get("files") or ()), str(part.get("prompt") or "")))
    if not parts:
        raise bad("no parts")
    subset = entry.get("subset") or {}
    if subset and not (isinstance(subset, dict) and isinstance(subset.get("count"), int)
                       and subset["count"] > 0):
        raise bad("subset must be {count: N > 0, seed: S}")
    expected = entry.get("expected_records")
    if expected is not None and not (isinstance(expected, int) and expected >= 0):
        raise bad("expected_records must be a count or null")
    return SourceSpec(key, str(entry["repo"]), str(entry.get("revision") or "main"),
                      str(entry["image_prefix"]).strip("/"), expected, tuple(parts),
                      subset.get("count"), int(subset.get("seed", 0)))


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    cached: bool


class HubRepo:
    """One dataset repository at one revision: which files match, how big, and their local copies."""

    def __init__(self, repo: str, revision: str):
        self.repo, self.revision = repo, revision
        self.commit: str | None = None
        self._listing: dict[str, RemoteFile] | None = None
        self._snapshot: Path | None = None

    def listing(self) -> dict[str, RemoteFile]:
        """Every file of the revision (name -> RemoteFile); online from the Hub's metadata,
        offline from the cached snapshot."""
        if self._listing is None:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import DryRunError, LocalEntryNotFoundError, OfflineModeIsEnabled

            try:
                infos = snapshot_download(self.repo, repo_type="dataset", revision=self.revision,
                                          dry_run=True)
                self.commit = infos[0].commit_hash if infos else self.revision
                self._listing = {i.filename: RemoteFile(i.filename, i.file_size, i.is_cached) for i in infos}
            except (DryRunError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError):
                self._listing = self._cached_listing()
            except Exception as err:  # gated, missing repo, bad revision: huggingface_hub's own words
                raise UserError(f"cannot list {self.repo}@{self.revision} on the Hub: {err}", None,
                                "check the repo id and revision, and HF_TOKEN for gated data") from None
        return self._listing

    def _cached_listing(self) -> dict[str, RemoteFile]:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            snapshot = Path(snapshot_download(self.repo, repo_type="dataset", revision=self.revision,
                                              local_files_only=True))
        except LocalEntryNotFoundError:
            raise UserError(f"{self.repo}@{self.revision} is not in the Hugging Face cache and the "
                            "Hub cannot be reached", constants.HF_HUB_CACHE,
                            "run where there is a network, or unset HF_HUB_OFFLINE") from None
        self._snapshot, self.commit = snapshot, snapshot.name
        files = {}
        for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
            name = path.relative_to(snapshot).as_posix()
            files[name] = RemoteFile(name, path.stat().st_size, True)
        return files

    def match(self, patterns: tuple[str, ...] | list[str]) -> list[RemoteFile]:
        """Files matching any pattern (fnmatch, as huggingface_hub's allow_patterns), sorted;
        a pattern that matches nothing is an error."""
        listing = self.listing()
        found: dict[str, RemoteFile] = {}
        for pattern in patterns:
            hits = [f for name, f in listing.items() if fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                raise UserError(f"{self.repo}@{self.commit or self.revision} has no file matching "
                                f"{pattern!r}", None,
                                "the dataset's layout changed: fix scripts/data/sources.yaml or pin "
                                "the revision it describes")
            found.update((f.name, f) for f in hits)
        return [found[name] for name in sorted(found)]

    def fetch(self, name: str) -> Path:
        """The local copy of one file (downloaded, resumably, when not cached)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        self.listing()
        try:
            return Path(hf_hub_download(self.repo, name, repo_type="dataset",
                                        revision=self.commit or self.revision))
        except LocalEntryNotFoundError:
            if self._snapshot is not None and (self._snapshot / name).is_file():
                return self._snapshot / name
            raise UserError(f"{self.repo}/{name} is not in the Hugging Face cache and the Hub cannot "
                            "be reached", None, "run with a network (downloads resume), or copy "
                            "the cache from a machine that has it") from None
