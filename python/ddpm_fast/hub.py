"""Finding files: a file path, a local folder (optionally with a subfolder), or a Hugging Face hub id.

Hub ids go through ``huggingface_hub`` when it is installed (it also serves ``HF_HUB_OFFLINE=1`` from its
cache); without it a hub id gives a clear error.
"""

from __future__ import annotations

import os

HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies")


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "/", "~")) and not os.path.isabs(name)


def _hub_download(repo_id: str, filename: str, subfolder: str | None, **hub_kwargs) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise OSError(
            f"{repo_id!r} is not a local path, and loading hub ids needs huggingface_hub: "
            "`pip install huggingface_hub`, or pass the path of a local folder"
        ) from None
    kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None}
    try:
        return hf_hub_download(repo_id, filename=filename, subfolder=subfolder or None, **kwargs)
    except Exception as e:  # huggingface_hub raises many types; users need one message
        raise OSError(
            f"could not get {filename!r} for {repo_id!r} from the Hugging Face hub or its cache "
            f"({type(e).__name__}: {e}). Pass a local folder instead, or check the id and your network."
        ) from None


def is_hub_id(path_or_id: str | os.PathLike) -> bool:
    s = _check_path_args(path_or_id, None)
    return not os.path.exists(s) and looks_like_hub_id(s)


def _check_path_args(path_or_id, subfolder) -> str:
    if isinstance(path_or_id, bytes) or not isinstance(path_or_id, (str, os.PathLike)):
        raise TypeError(
            f"pretrained_model_name_or_path must be a folder path or a hub id, got {type(path_or_id).__name__} "
            f"{path_or_id!r}"
        )
    if subfolder is not None and not isinstance(subfolder, str):
        raise TypeError(f"subfolder must be a folder name or None, got {type(subfolder).__name__} {subfolder!r}")
    s = os.fspath(path_or_id)
    if not s:
        raise FileNotFoundError("pretrained_model_name_or_path is empty; pass a folder path or a hub id")
    return s


def resolve_file(path_or_id: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs) -> str:
    """Return a local path to ``filename`` inside ``path_or_id`` (or ``path_or_id/subfolder``).

    Errors name what was looked for and where: FileNotFoundError for a missing path or file, OSError from the
    hub, TypeError for arguments that are not paths.
    """
    s = _check_path_args(path_or_id, subfolder)
    if os.path.isfile(s):
        return s
    if os.path.isdir(s):
        candidates = [os.path.join(s, subfolder, filename)] if subfolder else []
        candidates.append(os.path.join(s, filename))
        for c in candidates:
            if os.path.isfile(c):
                return c
        where = os.path.join(s, subfolder) if subfolder else s
        raise FileNotFoundError(f"no file named {filename!r} in {where!r}")
    if looks_like_hub_id(s):
        return _hub_download(s, filename, subfolder, **hub_kwargs)
    raise FileNotFoundError(f"pretrained_model_name_or_path {s!r} does not exist")
