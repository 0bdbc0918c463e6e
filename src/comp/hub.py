"""Model locations: a local directory, or a Hugging Face Hub id resolved through its cache.

Every loader (``CompVisionModel``, ``CompImageProcessor``, ``CompForConditionalGeneration``,
``CompProcessor``, the CLI commands, the recipes) calls ``resolve_model_dir`` first, so one
rule holds everywhere: an existing path is used as is; otherwise ``org/name`` (optionally
``org/name@revision``) is fetched with ``huggingface_hub.snapshot_download``, which follows
its own rules for the cache (``HF_HUB_CACHE`` / ``HF_HOME``), the token (``HF_TOKEN`` or
``hf auth login``) and ``HF_HUB_OFFLINE=1`` (cache only, no network).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# What a CoMP loader reads: configs, tokenizer files, chat templates, safetensors weights.
# PyTorch .bin / Flax / TF / ONNX copies in the same repository are not downloaded.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def split_revision(name: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); without ``@`` the revision is None."""
    repo_id, sep, revision = name.partition("@")
    return repo_id, (revision or None) if sep else None


def is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(split_revision(name)[0]))


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory (or file) as is, else the cached snapshot of a Hub id.

    Raises FileNotFoundError with what to do when the name is neither, or when the Hub id is
    not in the cache and the network is off (``HF_HUB_OFFLINE=1``) or unreachable.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if not is_repo_id(name):
        raise FileNotFoundError(f"{name}: no such file or directory (and not a Hugging Face Hub id "
                                "of the form org/name[@revision])")
    repo_id, rev_in_name = split_revision(name)
    revision = revision or rev_in_name
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    shown = repo_id + (f"@{revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError as err:
        why = ("HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE
               else "the Hub could not be reached")
        raise FileNotFoundError(
            f"{shown}: not a local directory and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and {why}; download it where there is a network "
            f"(`hf download {repo_id}`) and copy the cache, or pass a local directory") from err
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise FileNotFoundError(
            f"{shown}: the Hub has no such repository, or it is gated/private and this machine "
            "has no token for it (set HF_TOKEN or run `hf auth login`)") from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"{shown}: the repository has no revision {revision!r}") from err
