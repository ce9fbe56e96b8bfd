"""Pushing to the Hugging Face hub: whether a push can happen, and the upload of a finished directory."""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from selfie.errors import SelfieError


def require_hub_login() -> None:
    """Fail before any work when a push cannot happen: offline mode, or no token."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or huggingface_hub.constants.HF_HUB_OFFLINE:
        raise SelfieError("--push-to-hub: HF_HUB_OFFLINE is set; unset it to push, or export without --push-to-hub")
    if huggingface_hub.get_token() is None:
        raise SelfieError("--push-to-hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN")


def push(directory: Path, repo_id: str, private: bool, message: str) -> str:
    """Upload `directory` to the model repository `repo_id` (created when missing); returns the repository's URL."""
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=directory, commit_message=message, repo_type="model")
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise SelfieError(f"--push-to-hub {repo_id}: {str(e).splitlines()[0]} (the export in {directory} is complete)") from None
    return str(url)
