"""Uploading a run to the Hugging Face Hub (``--push-to-hub``), through huggingface_hub.

Everything that can be checked is checked before the model loads: offline mode, a token
(huggingface_hub's own lookup: ``HF_TOKEN``, then ``hf auth login``'s file), that the token
is valid (``whoami``) and that the repo exists or can be made (``create_repo(exist_ok=True)``),
so a run never trains for hours to fail at the upload.

At the end the main process uploads, in one commit, the files lorakit wrote for the run (the
manifest says which): the LoRA file(s), the model card (as the repo's ``README.md``), the run
config and the sample images; never checkpoints, tracker logs or a user's other files in
``--output``. With ``--push-checkpoints`` each checkpoint is uploaded as it is saved, in the
background (one commit after another, on huggingface_hub's own worker thread): the loop does
not wait. A checkpoint is uploaded from hard links made when it is saved, so pruning it
(``--checkpoints-limit``) meanwhile does not take its files away from the upload. A failed
upload at the end loses nothing: the files are on disk, and the error line gives the
``hf upload`` command that retries it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from lorakit import fsutil
from lorakit.errors import LorakitError

log = logging.getLogger("lorakit")

#: where a checkpoint's hard links wait for their upload (a leftover goes at the next start)
STAGING = f".hub-upload{fsutil.TMP_SUFFIX}"
_TRUE = {"1", "on", "yes", "true"}


def check_options(config) -> None:
    """The Hub flags make sense together (called by validate, before anything loads)."""
    if config.push_to_hub:
        if config.push_checkpoints and not config.checkpoint_every:
            raise LorakitError("--push-checkpoints uploads checkpoints, but no --checkpoint-every is set; "
                               "add --checkpoint-every N or drop --push-checkpoints.")
        repo = config.hub_model_id
        if repo is not None and (repo.count("/") > 1 or not all(repo.split("/")) or " " in repo):
            raise LorakitError(f"--hub-model-id {repo!r} is not a repo id; use USER/NAME (or NAME for your own account).")
        return
    given = [f for f, on in (("--hub-model-id", config.hub_model_id), ("--hub-private", config.hub_private),
                             ("--push-checkpoints", config.push_checkpoints)) if on]
    if given:
        raise LorakitError(f"{given[0]} needs --push-to-hub; add --push-to-hub or drop {given[0]}.")


def offline() -> bool:
    """huggingface_hub's offline mode (read at its import), or ``HF_HUB_OFFLINE`` set since."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def prepare(config, output_dir: Path, main: bool) -> "HubPush":
    """The run's uploader, with the credentials and the repo checked now, before the model
    loads (without ``--push-to-hub`` one that uploads nothing). Only the main process talks to
    the Hub."""
    if not config.push_to_hub:
        return HubPush(None, "", output_dir, main=False)
    if offline():
        raise LorakitError("--push-to-hub cannot reach the Hub: HF_HUB_OFFLINE is set; unset it, "
                           "or drop --push-to-hub and upload later with `hf upload`.")
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise LorakitError("--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN "
                           "(a token with write access); nothing was trained.")
    if not main:
        return HubPush(None, config.hub_model_id or "", output_dir, main=False)  # the main process uploads
    api = HfApi(token=token)
    try:
        user = api.whoami()
    except Exception as exc:
        raise LorakitError(f"--push-to-hub: the Hub refused the token ({_first_line(exc)}); run `hf auth login` "
                           "or set HF_TOKEN to a valid token with write access.") from None
    role = ((user.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":  # it would pass every check and fail only at the upload, after training
        raise LorakitError("--push-to-hub: your Hugging Face token is read-only; make a token with write access "
                           "(huggingface.co/settings/tokens), then `hf auth login` or set HF_TOKEN.")
    repo_id = config.hub_model_id or Path(output_dir).expanduser().resolve().name
    if "/" not in repo_id:
        repo_id = f"{user.get('name')}/{repo_id}"
    try:
        repo_id = api.create_repo(repo_id, private=bool(config.hub_private) or None, exist_ok=True).repo_id
    except Exception as exc:
        raise LorakitError(f"--push-to-hub: cannot create or use the repo {repo_id} ({_first_line(exc)}); "
                           "check --hub-model-id and that your token may write there.") from None
    log.info("will upload to https://huggingface.co/%s at the end", repo_id)
    return HubPush(api, repo_id, output_dir, main=True, checkpoints=bool(config.push_checkpoints))


def final_files(output_dir: Path, logging_dir: Path | None = None) -> dict:
    """``{path in repo: local path}`` of what the end of a run uploads: every file the manifest
    records, except checkpoints and tracker logs; the card always as ``README.md``."""
    from lorakit import outputs
    from lorakit.state import CHECKPOINT_RE

    output_dir = Path(output_dir)
    logs = None
    if logging_dir is not None:
        try:
            logs = Path(logging_dir).resolve().relative_to(output_dir.resolve()).parts[:1]
        except ValueError:
            logs = None
    files = {}
    for rel in outputs.recorded(output_dir) or ():
        parts = Path(rel).parts
        path = output_dir / rel
        if not parts or CHECKPOINT_RE.match(parts[0]) or (logs and parts[:1] == logs) or parts[0].startswith("."):
            continue
        if path.is_file() and not path.is_symlink():
            files["README.md" if rel == outputs.CARD_FALLBACK else rel] = path
    return dict(sorted(files.items()))


class HubPush:
    """Uploads of one run: checkpoints in the background as they are saved, the rest at the end."""

    def __init__(self, api, repo_id: str, output_dir: Path, main: bool = True, checkpoints: bool = False):
        #: ``main``: this process uploads; ``checkpoints``: each checkpoint too (--push-checkpoints)
        self.api, self.repo_id, self.output_dir, self.main = api, repo_id, Path(output_dir), main
        self.checkpoints = checkpoints
        self.pending: list = []  # (checkpoint name, future)

    def checkpoint_saved(self, path: Path) -> None:
        """Start uploading checkpoint ``path`` to ``checkpoint-N/`` in the repo; returns at once."""
        if not (self.main and self.checkpoints):
            return
        from huggingface_hub import CommitOperationAdd

        path = Path(path)
        staged = self.output_dir / STAGING / path.name
        fsutil.remove_tree(staged)
        staged.mkdir(parents=True)
        operations = []
        for src in sorted(p for p in path.rglob("*") if p.is_file()):
            link = staged / src.relative_to(path)
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, link)
            except OSError:  # a filesystem without hard links: a copy
                shutil.copy2(src, link)
            operations.append(CommitOperationAdd(f"{path.name}/{src.relative_to(path).as_posix()}", str(link)))
        future = self.api.run_as_future(self._upload_checkpoint, path.name, staged, operations)
        self.pending.append((path.name, future))

    def _upload_checkpoint(self, name: str, staged: Path, operations: list) -> None:
        """(on huggingface_hub's worker thread) one checkpoint's commit; a failure is a warning."""
        try:
            self.api.create_commit(self.repo_id, operations, commit_message=f"lorakit: {name}")
        except Exception as exc:
            log.warning("upload of %s to %s failed (%s); training goes on, the checkpoint is on disk",
                        name, self.repo_id, _first_line(exc))
            raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def wait(self) -> list[str]:
        """Wait for the checkpoint uploads still running; the names of those that failed."""
        failed = [name for name, future in self.pending if future.exception() is not None]
        self.pending.clear()
        staging = self.output_dir / STAGING
        if staging.is_dir() and not any(staging.iterdir()):
            staging.rmdir()
        return failed

    def finish(self, logging_dir: Path | None = None) -> None:
        """Upload the run's final files in one commit (after the checkpoints still on their way)."""
        if not self.main:
            return
        from huggingface_hub import CommitOperationAdd

        failed = self.wait()
        files = final_files(self.output_dir, logging_dir)
        operations = [CommitOperationAdd(repo_path, str(local)) for repo_path, local in files.items()]
        try:
            self.api.create_commit(self.repo_id, operations, commit_message="lorakit: trained LoRA")
        except Exception as exc:
            raise LorakitError(
                f"training finished and its files are in {self.output_dir}, but the upload to {self.repo_id} failed "
                f"({_first_line(exc)}); retry with `{retry_command(self.repo_id, self.output_dir, files)}`."
            ) from None
        note = f" (checkpoint uploads that failed: {', '.join(failed)})" if failed else ""
        log.info("uploaded %d files to https://huggingface.co/%s%s", len(operations), self.repo_id, note)


def retry_command(repo_id: str, output_dir: Path, files: dict) -> str:
    """The ``hf upload`` command that uploads what the run would have (its own files only)."""
    import shlex

    patterns = sorted({"samples/*" if r.startswith("samples/") else str(Path(p).relative_to(output_dir))
                       for r, p in files.items()})
    include = " ".join(f"--include {shlex.quote(p)}" for p in patterns)
    return f"hf upload {repo_id} {shlex.quote(str(output_dir))} . {include}".rstrip()
