"""Fetching checkpoints from the Hugging Face hub, with a clear message when offline."""

from __future__ import annotations

from pathlib import Path

from qwenlite.errors import QwenliteError

CHECKPOINT_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json",
                       "tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def download(repo: str, dest: str | Path) -> Path:
    """Download ``repo`` from the hub into ``dest`` and return ``dest``.

    Raises:
        QwenliteError: the hub cannot be reached (one line saying how to supply a local
            checkpoint instead) or the repository does not exist.
    """
    dest = Path(dest)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - a runtime dependency
        raise QwenliteError("huggingface_hub is not installed: pip install huggingface-hub") from exc
    try:
        snapshot_download(repo_id=repo, local_dir=str(dest), allow_patterns=CHECKPOINT_PATTERNS)
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; all mean "not fetched"
        name = type(exc).__name__
        if name in ("RepositoryNotFoundError", "RevisionNotFoundError"):
            raise QwenliteError(f"no repository {repo!r} on the Hugging Face hub") from exc
        raise QwenliteError(
            f"could not download {repo} from the Hugging Face hub ({name}); offline, pass a local "
            f"checkpoint directory with --weights DIR or set QWENLITE_WEIGHTS=DIR"
        ) from exc
    if not (dest / "config.json").is_file():
        raise QwenliteError(f"download of {repo} into {dest} has no config.json")
    return dest
