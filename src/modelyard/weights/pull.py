"""`modelyard pull MODEL`: download a model's weights before its first start needs them.

Through `huggingface_hub`, the library vLLM itself downloads with, so the files land where the
engine will look (`HF_HOME`, `HF_HUB_CACHE`) and `HF_TOKEN` and `HF_ENDPOINT` mean what they
mean to vLLM. The library reads those variables when it is imported: the model's own engine
environment (`env:` in the config) is applied first, then it is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from modelyard.config.schema import GatewayConfig
from modelyard.runtime.weights_cache import folder_bytes

# The engine environment that decides where and how weights are downloaded.
HUB_VARIABLES = (
    "HF_TOKEN",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
    "HF_HUB_DISABLE_PROGRESS_BARS",
)


class PullError(Exception):
    """A pull that cannot be done, said in one line a user can act on."""


@dataclass(frozen=True)
class PullRequest:
    repo_id: str
    revision: str | None
    environ: dict[str, str]  # the hub variables to use


def pull_request_for(
    name: str, config: GatewayConfig | None, revision: str | None, environ: Mapping[str, str]
) -> PullRequest:
    """What to download for `name`: a model of the config (its `model:` and engine env), or a
    hub repo id such as `Qwen/Qwen2.5-0.5B-Instruct`."""
    hub_env = {key: environ[key] for key in HUB_VARIABLES if environ.get(key)}
    if config is not None and name in config.models:
        model = config.models[name]
        engine_env = {**config.defaults.env, **model.env}
        hub_env.update({key: engine_env[key] for key in HUB_VARIABLES if engine_env.get(key)})
        if model.model is None:
            raise PullError(f"model {name!r} has no weights to pull (engine: {model.engine})")
        name = model.model
    if name.startswith(("/", ".", "~")):
        if Path(name).expanduser().exists():
            raise PullError(f"{name!r} is a local folder: there is nothing to download")
        raise PullError(f"{name!r} is a local path that does not exist; a pull needs a hub name")
    if name.count("/") != 1:
        raise PullError(
            f"{name!r} is neither a model of the config nor a hub name such as 'org/model'"
        )
    return PullRequest(name, revision, hub_env)


def pull(request: PullRequest, environ: MutableMapping[str, str] | None = None) -> Path:
    """Download (or complete) the snapshot, with huggingface_hub's progress bars; its path."""
    environ = os.environ if environ is None else environ
    environ.update(request.environ)
    # Imported here: it reads HF_ENDPOINT, HF_HOME and friends once, when first imported.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(request.repo_id, revision=request.revision))
    except GatedRepoError:
        raise PullError(
            f"{request.repo_id}: access is restricted; set HF_TOKEN to a token that may read it"
        ) from None
    except RepositoryNotFoundError:
        hint = "" if "HF_TOKEN" in request.environ else " (or it is private: set HF_TOKEN)"
        raise PullError(f"{request.repo_id}: no such repository{hint}") from None
    except RevisionNotFoundError:
        raise PullError(f"{request.repo_id}: no revision {request.revision!r}") from None
    except LocalEntryNotFoundError as error:
        raise PullError(f"{request.repo_id}: the hub could not be reached ({error})") from None
    except HfHubHTTPError as error:
        raise PullError(f"{request.repo_id}: {str(error).splitlines()[0]}") from None


def pulled_bytes(path: Path) -> int:
    """The snapshot's size, for the closing line (blobs, not the links to them)."""
    return folder_bytes(path.parent.parent / "blobs")
