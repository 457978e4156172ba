"""Fail fast, in one line, when a model or dataset the command needs is on the Hub and the Hub cannot be reached.

Without this, transformers and datasets retry for about a minute and end in a long traceback. A name that is a
local path, ``hmt-testing:<type>`` or already in the Hugging Face cache is left alone (the libraries then read the
cache). Otherwise, with ``HF_HUB_OFFLINE=1`` the answer is immediate; online, one metadata request (no retries,
short timeout) tells an unreachable Hub, a misspelt id and a gated repository apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

TESTING_SCHEME = "hmt-testing:"
_CONNECTION_ERRORS = {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "TransportError",
                      "ConnectionError", "Timeout", "ProxyError"}
_checked: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class HubSource:
    """A name the command will load: ``flag`` is the command-line flag that sets it (named in the error), and
    ``local_hint`` is what to pass instead, e.g. ``--data_files /path/to/docs.jsonl``."""

    flag: str
    name: str
    repo_type: str = "model"  # or "dataset"
    local_hint: str = ""


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", "\\")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _offline(repo_type: str) -> bool:
    from huggingface_hub import constants

    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE" if repo_type == "model" else "HF_DATASETS_OFFLINE"]
    flags = [os.environ.get(n, "").upper() in ("1", "ON", "YES", "TRUE") for n in names]
    return bool(constants.HF_HUB_OFFLINE) or any(flags)


def _cached(name: str, repo_type: str) -> bool:
    from huggingface_hub import constants

    if os.path.isdir(os.path.join(constants.HF_HUB_CACHE, f"{repo_type}s--{name.replace('/', '--')}")):
        return True
    if repo_type == "dataset":  # datasets also keeps prepared copies in its own cache
        cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
        return os.path.isdir(os.path.join(cache, name.replace("/", "___")))
    return False


def _probe(source: HubSource) -> str:
    """'' when the Hub answers for ``source`` (or fails in a way the loading library reports better); otherwise
    the reason it cannot be reached. `ValueError` for a repository that does not exist or is gated."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        HfApi().repo_info(source.name, repo_type=source.repo_type, timeout=10)
    except GatedRepoError:
        raise ValueError(
            f"{source.flag} {source.name!r} is a gated Hub repository: accept its terms on huggingface.co and log in "
            f"(`hf auth login` or HF_TOKEN), or pass a local copy with {source.local_hint}."
        ) from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"{source.flag} {source.name!r} is neither a local path nor a Hub {source.repo_type} you can access: check "
            f"the spelling (a private repository needs `hf auth login`), or pass a local copy with {source.local_hint}."
        ) from None
    except HfHubHTTPError:
        return ""
    except OfflineModeIsEnabled:
        return "HF_HUB_OFFLINE is set"
    except Exception as exc:  # noqa: BLE001  (the HTTP client's connection errors differ between hub versions)
        names = {c.__name__ for c in type(exc).__mro__}
        if isinstance(exc, (OSError, TimeoutError)) or names & _CONNECTION_ERRORS:
            return f"{type(exc).__name__}: {exc}"
    return ""


def check_hub_sources(sources: Sequence[HubSource]) -> None:
    """`ValueError` (one line, naming the flags to pass instead) when a source is on the Hub, not cached, and the
    Hub is offline or unreachable; also for a local-looking path that does not exist."""
    missing, reason = [], ""
    for source in sources:
        name = source.name
        if not name or name.startswith(TESTING_SCHEME) or os.path.exists(os.path.expanduser(name)):
            continue
        if _looks_like_path(name):
            raise ValueError(f"{source.flag} {name!r}: no such local path (a Hub id reads 'org/name').")
        if (name, source.repo_type) in _checked or _cached(name, source.repo_type):
            continue
        why = "HF_HUB_OFFLINE is set" if _offline(source.repo_type) else _probe(source)
        if why:
            missing.append(source)
            reason = reason or why
        else:
            _checked.add((name, source.repo_type))
    if missing:
        names = ", ".join(repr(s.name) for s in missing)
        hints = " ".join(s.local_hint for s in missing)
        raise ValueError(
            f"the Hugging Face Hub is unreachable ({reason}) and {names} {'is' if len(missing) == 1 else 'are'} not "
            f"in the local cache: pass local copies instead, e.g. {hints}"
        )
