"""Resolving ``--model`` (hub id or local folder) to a local diffusers-format folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorakit.errors import LorakitError

HUB_TIMEOUT_S = 30


def read_model_index(path: Path) -> dict:
    index = path / "model_index.json"
    if not index.is_file():
        return {}
    try:
        return json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise LorakitError(f"{index} is not valid JSON ({exc.msg}); re-download the model.") from None


def resolve_model(model: str, flag: str = "--model", arch: str | None = None, model_config: str | None = None,
                  revision: str | None = None, variant: str | None = None) -> Path:
    """A local folder for ``model``: the folder itself, or a hub snapshot (cached or downloaded),
    or, given the ``arch``, the diffusers folder a single-file checkpoint converts to
    (:mod:`lorakit.singlefile`, configs from ``model_config``).

    Hub ids take the same path as local folders after download. Without network the
    hub is not retried for minutes: an offline cache miss fails at once with the fix.
    ``revision`` (hub ids) picks a branch, tag or commit; ``variant`` (hub ids and folders)
    the weight files ``*.VARIANT.safetensors`` (:mod:`lorakit.variants`).
    """
    return _resolve(model, flag, arch, model_config, revision, variant)[0]


def resolve_run_model(config) -> Path:
    """The model folder of a run's ``--model`` (with ``--model-config``, ``--revision``, ``--variant``);
    a single file's sha256 is recorded in the config (``model_sha256``) so a resume checks it."""
    path, sha = _resolve(config.model, "--model", config.arch, getattr(config, "model_config", None),
                         getattr(config, "revision", None), getattr(config, "variant", None))
    if sha is not None:
        config.model_sha256 = sha
    return path


def _resolve(model, flag, arch, model_config, revision, variant) -> tuple[Path, str | None]:
    path = Path(model).expanduser()
    if path.exists():
        if revision:
            raise LorakitError(f"--revision applies to hub ids; {flag} {model} is a local path.")
        if not path.is_dir():
            if arch is None:
                raise LorakitError(f"{flag} {model} is a file; pass a diffusers model folder or a hub id.")
            if variant:
                raise LorakitError(f"--variant applies to diffusers folders and hub ids; {flag} {model} is a single file.")
            from lorakit.singlefile import model_folder

            return model_folder(path, arch, model_config, flag)
        if model_config and arch is not None:
            raise LorakitError(f"--model-config applies to single-file checkpoints; {flag} {model} is a folder.")
        return _with_variant(path, variant, flag), None
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise LorakitError(f"{flag} {model} does not exist; pass a local diffusers model folder or a hub id.")
    if model_config and arch is not None:
        raise LorakitError(f"--model-config applies to single-file checkpoints; {flag} {model} is a hub id.")
    return _with_variant(_snapshot(model, flag, revision, variant), variant, flag), None


def _with_variant(path: Path, variant: str | None, flag: str) -> Path:
    if not variant:
        return path
    from lorakit.variants import variant_folder

    return variant_folder(path, variant, flag)


def resolve_config_source(model_config: str, flag: str = "--model-config") -> Path:
    """A local folder with the configs and tokenizers of ``model_config`` (a folder, or a hub id
    of which only those files are fetched: a single file brings its own weights)."""
    if Path(model_config).expanduser().exists():
        return resolve_model(model_config, flag=flag)
    if model_config.startswith((".", "/", "~")) or model_config.count("/") != 1:
        raise LorakitError(f"{flag} {model_config} does not exist; pass a local diffusers model folder or a hub id.")
    return _snapshot(model_config, flag, configs_only=True)


def _snapshot(repo_id: str, flag: str = "--model", revision: str | None = None, variant: str | None = None,
              configs_only: bool = False) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise LorakitError("loading a hub id needs huggingface_hub; pip install huggingface_hub.") from None
    patterns = ["*.json", "*.txt", "*.model", "*.safetensors", "tokenizer*/*", "*/*.json", "*/*.safetensors"]
    if configs_only:
        patterns = [p for p in patterns if not p.endswith(".safetensors")]
    elif variant:  # only that variant's weights (repos often hold fp32 and fp16 side by side)
        patterns = [p for p in patterns if not p.endswith(".safetensors")]
        patterns += [f"*.{variant}.safetensors", f"*.{variant}-*.safetensors", f"*/*.{variant}.safetensors",
                     f"*/*.{variant}-*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, revision=revision, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        at = f" at revision {revision}" if revision else ""
        raise LorakitError(
            f"{flag} {repo_id}{at} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "download it first or pass a local folder."
        )
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(HUB_TIMEOUT_S))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(HUB_TIMEOUT_S))
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(snapshot_download, repo_id, allow_patterns=patterns, revision=revision)
    try:
        # A reachable hub answers the first request in seconds; a closed network retries for minutes.
        return Path(future.result(timeout=None if _hub_reachable() else 0))
    except concurrent.futures.TimeoutError:
        raise LorakitError(
            f"cannot reach the Hugging Face Hub to fetch {flag} {repo_id}; check the network "
            "or pass a local diffusers model folder."
        ) from None
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LorakitError(f"{flag} {repo_id} could not be downloaded: {first}") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _hub_reachable(timeout: float = 5.0) -> bool:
    import socket
    import concurrent.futures

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]

    def probe():
        with socket.create_connection((endpoint, 443), timeout=timeout):
            return True

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(probe).result(timeout=timeout)
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


def check_model_matches(path: Path, arch: str, pm, other_archs) -> dict:
    """Refuse a folder the arch does not recognise, naming the arch it belongs to if any.

    ``other_archs`` is an iterable of ``(arch_id, plugin_manager_factory)`` for suggestions.
    """
    index = read_model_index(path)
    if pm.hook.recognizes_model.get_hookimpls() and pm.hook.recognizes_model(model_index=index):
        return index
    if not pm.hook.recognizes_model.get_hookimpls():
        return index
    if not index and not any(path.iterdir()):
        raise LorakitError(f"--model {path} is an empty folder; pass a diffusers model folder.")
    found = index.get("_class_name") or "no model_index.json"
    for other_id, make_pm in other_archs:
        if other_id == arch:
            continue
        try:  # a broken or unrelated plugin must not hide the real problem
            matches = bool(make_pm().hook.recognizes_model(model_index=index))
        except Exception:
            continue
        if matches:
            raise LorakitError(
                f"--model {path} is a {found} model, which --arch {arch} cannot train; use --arch {other_id}."
            )
    info = pm.hook.arch_info()
    expected = getattr(info, "pipeline_class", "") or "a model of this arch"
    raise LorakitError(
        f"--model {path} is not a diffusers model that --arch {arch} can train ({found}; expected "
        f"{expected}); pass a diffusers-format folder or hub id."
    )


def load_components(pm, model_path, config, device, weight_dtype) -> dict:
    """The arch's ``load_components``, every module frozen; a damaged model folder is one line."""
    import torch

    from lorakit import sharding

    on = sharding.load_device(config, device)  # a base to be sharded never lands whole on a device
    try:
        components = pm.hook.load_components(model_path=model_path, config=config, device=on,
                                             weight_dtype=weight_dtype)
    except OSError as exc:  # a missing or damaged weight/config file inside the folder
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LorakitError(f"--model {config.model} could not be loaded: {first}; re-download it.") from None
    for value in components.values():
        if isinstance(value, torch.nn.Module):
            value.requires_grad_(False)
    if on != device:
        sharding.place(components, pm.hook.arch_info().denoiser, device)
    return components
