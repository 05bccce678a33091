"""--push-to-hub: the checks before training, what is uploaded and when.

The Hub is stubbed at the network boundary only: ``HfApi.whoami``, ``HfApi.create_repo`` and
``HfApi.create_commit`` (every upload is one commit; huggingface_hub's own ``run_as_future``
worker runs the background ones). lorakit's choice of files and timing is the real code.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi

from lorakit import hub
from lorakit.errors import LorakitError
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer

REPO = "someone/my-lora"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from lorakit.tiny import make_tiny_model

    return make_tiny_model("sd15", tmp_path_factory.mktemp("hub") / "model")


class FakeHub:
    """Stands in for the Hub's HTTP API; records each commit (paths, thread, time)."""

    def __init__(self):
        self.commits: list[dict] = []
        self.repos: list[tuple] = []
        self.block: dict = {}  # commit message -> Event the commit waits for
        self.fail: set = set()  # commit messages that fail

    def install(self, monkeypatch, tmp_path, token="hf_fake"):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        else:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        fake = self

        def whoami(api, token=None, **kwargs):
            if api.token == "hf_read":
                return {"name": "someone", "type": "user", "auth": {"accessToken": {"role": "read"}}}
            if api.token != "hf_fake":
                raise PermissionError("401 Client Error: Unauthorized (invalid token)")
            return {"name": "someone", "type": "user", "auth": {"accessToken": {"role": "write"}}}

        def create_repo(api, repo_id, *, private=None, exist_ok=False, **kwargs):
            fake.repos.append((repo_id, private, exist_ok))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(api, repo_id, operations, *, commit_message, **kwargs):
            operations = list(operations)
            entry = {"repo": repo_id, "message": commit_message, "thread": threading.current_thread().name,
                     "paths": sorted(op.path_in_repo for op in operations), "started": time.monotonic()}
            # what the upload reads: the bytes of each file (a hard link survives the checkpoint's pruning)
            entry["sizes"] = {op.path_in_repo: Path(op.path_or_fileobj).stat().st_size for op in operations}
            if commit_message in fake.block:
                entry["waited"] = fake.block[commit_message].wait(timeout=60)
                entry["sizes_after_wait"] = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes().__len__()
                                             for op in operations}
            fake.commits.append(entry)
            if commit_message in fake.fail:
                raise ConnectionError("500 Server Error: the Hub is down")
            return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/1",
                                              commit_message=commit_message, commit_description="", oid="1" * 40)

        monkeypatch.setattr(HfApi, "whoami", whoami)
        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        return self


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    return FakeHub().install(monkeypatch, tmp_path)


class StepWatch:
    """A progress display that records each step and sets an event when ``at`` is reached."""

    def __init__(self, at: int):
        self.at, self.reached, self.steps = at, threading.Event(), []

    def start(self, total, completed=0):
        pass

    def update(self, step, **kwargs):
        self.steps.append((step, time.monotonic()))
        if step >= self.at:
            self.reached.set()

    def note(self, text):
        pass

    def finish(self):
        pass


def config(model, output, **overrides):
    values = dict(report_to="none", push_to_hub=True, hub_model_id=REPO)
    values.update(overrides)
    return tiny_config("sd15", model, example_data(), output, **values)


def test_the_end_uploads_only_the_files_the_run_wrote(model, tmp_path, fake_hub):
    pytest.importorskip("tensorboard")
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("my own notes, not for the Hub\n")
    Trainer(config(model, out, max_steps=2, checkpoint_every=1, report_to="tensorboard",
                   validation_prompt="a red circle", validation_every=2)).setup().run()
    assert fake_hub.repos == [(REPO, None, True)]
    assert len(fake_hub.commits) == 1  # no --push-checkpoints: checkpoints stay local
    final = fake_hub.commits[0]
    assert final["repo"] == REPO and final["thread"] == threading.main_thread().name
    paths = set(final["paths"])
    assert {"README.md", "pytorch_lora_weights.safetensors", "lorakit_config.json"} <= paths
    assert any(p.startswith("samples/") and p.endswith(".png") for p in paths)
    assert not any(p.startswith(("checkpoint-", "logs/", ".")) for p in paths) and "notes.txt" not in paths
    assert (out / "logs").is_dir() and (out / "checkpoint-1").is_dir()  # there, but not uploaded
    assert final["sizes"]["pytorch_lora_weights.safetensors"] == (out / "pytorch_lora_weights.safetensors").stat().st_size


def test_checkpoints_upload_in_the_background_while_training_goes_on(model, tmp_path, fake_hub):
    out = tmp_path / "o"
    watch = StepWatch(at=6)
    fake_hub.block["lorakit: checkpoint-2"] = watch.reached  # its upload ends only once step 6 is done
    Trainer(config(model, out, max_steps=6, checkpoint_every=2, checkpoints_limit=1, push_checkpoints=True,
                   hub_model_id="my-lora"), progress=watch).setup().run()
    messages = [c["message"] for c in fake_hub.commits]
    assert fake_hub.repos[0][0] == "someone/my-lora"  # NAME alone: the token's account
    assert sorted(messages[:3]) == ["lorakit: checkpoint-2", "lorakit: checkpoint-4", "lorakit: checkpoint-6"]
    assert messages[3] == "lorakit: trained LoRA"  # the final files after every checkpoint
    first = next(c for c in fake_hub.commits if c["message"] == "lorakit: checkpoint-2")
    assert first["waited"] is True  # the loop reached step 6 while checkpoint-2 was still uploading
    assert first["thread"] != threading.main_thread().name
    assert first["paths"] == sorted(f"checkpoint-2/{p.name}" for p in (out / "checkpoint-6").iterdir())
    # checkpoint-2 was pruned (--checkpoints-limit 1) during its upload: the upload still read every byte
    assert not (out / "checkpoint-2").exists() and first["sizes_after_wait"] == first["sizes"]
    assert not (out / hub.STAGING).exists()  # the hard links are gone once uploaded
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]


def test_a_failed_final_upload_keeps_the_files_and_says_how_to_retry(model, tmp_path, fake_hub):
    out = tmp_path / "o"
    fake_hub.fail.add("lorakit: trained LoRA")
    with pytest.raises(LorakitError) as caught:
        Trainer(config(model, out, max_steps=1)).setup().run()
    message = str(caught.value)
    assert "\n" not in message, repr(message)
    assert "the Hub is down" in message, message
    assert f"its files are in {out}" in message and f"hf upload {REPO} {out} . --include README.md" in message
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file()


def test_a_failed_checkpoint_upload_does_not_stop_training(model, tmp_path, fake_hub, caplog):
    fake_hub.fail.add("lorakit: checkpoint-1")
    result = Trainer(config(model, tmp_path / "o", max_steps=2, checkpoint_every=1, push_checkpoints=True)).setup().run()
    assert result.global_step == 2 and fake_hub.commits[-1]["message"] == "lorakit: trained LoRA"
    assert "upload of checkpoint-1" in caplog.text


# ---------------------------------------------------------------------------- before the model loads


def _refused_before_loading(model, tmp_path, match, **overrides):
    trainer = Trainer(config(model, tmp_path / "o", max_steps=1, **overrides))
    with pytest.raises(LorakitError, match=match) as caught:
        trainer.setup()
    assert "\n" not in str(caught.value) and not hasattr(trainer, "components")
    assert not (tmp_path / "o" / "pytorch_lora_weights.safetensors").exists()
    return str(caught.value)


def test_offline_is_refused_before_the_model_loads(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    _refused_before_loading(model, tmp_path, "--push-to-hub cannot reach the Hub: HF_HUB_OFFLINE is set")


def test_no_token_is_refused_before_the_model_loads(model, tmp_path, monkeypatch):
    FakeHub().install(monkeypatch, tmp_path, token=None)
    _refused_before_loading(model, tmp_path, "needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")


def test_an_invalid_token_is_refused_before_the_model_loads(model, tmp_path, monkeypatch):
    FakeHub().install(monkeypatch, tmp_path, token="hf_revoked")
    _refused_before_loading(model, tmp_path, "the Hub refused the token .*401")


def test_a_read_only_token_is_refused_before_the_model_loads(model, tmp_path, monkeypatch):
    fake = FakeHub().install(monkeypatch, tmp_path, token="hf_read")
    _refused_before_loading(model, tmp_path, "token is read-only; make a token with write access")
    assert fake.repos == []


def test_the_cli_refuses_offline_in_one_line_before_loading(model, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lorakit.cli import app

    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    args = ["train", "--arch", "sd15", "--model", str(tmp_path / "not-loaded-yet"), "--data", str(example_data()),
            "--output", str(tmp_path / "o"), "--push-to-hub", "--hub-model-id", REPO, "--report-to", "none"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    # the model path does not exist: the Hub check came first
    assert len(lines) == 1 and lines[0].startswith("error: --push-to-hub cannot reach the Hub"), result.output


@pytest.mark.parametrize("overrides, match", [
    (dict(push_to_hub=False, hub_model_id=REPO), "--hub-model-id needs --push-to-hub"),
    (dict(push_to_hub=False, hub_model_id=None, push_checkpoints=True), "--push-checkpoints needs --push-to-hub"),
    (dict(push_checkpoints=True), "--push-checkpoints uploads checkpoints, but no --checkpoint-every"),
    (dict(hub_model_id="a/b/c"), "is not a repo id"),
])
def test_hub_flags_that_do_not_fit_together(model, tmp_path, overrides, match):
    from lorakit.config import validate

    with pytest.raises(LorakitError, match=match):
        validate(config(model, tmp_path / "o", **overrides))


def test_final_files_skip_checkpoints_logs_and_the_users_files(tmp_path):
    from lorakit import outputs

    out = tmp_path / "o"
    for rel in ("pytorch_lora_weights.safetensors", "lorakit_model_card.md", "samples/step-000001-0.png",
                "checkpoint-1/optimizer.pt", "logs/run/events", "mine.txt"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"x")
    outputs.record(out, "pytorch_lora_weights.safetensors", "lorakit_model_card.md", "samples",
                   "samples/step-000001-0.png", "checkpoint-1", "logs", "logs/run", "logs/run/events")
    files = hub.final_files(out, out / "logs")
    assert list(files) == ["README.md", "pytorch_lora_weights.safetensors", "samples/step-000001-0.png"]
    assert files["README.md"] == out / "lorakit_model_card.md"  # the user's README.md stayed theirs


def test_hub_private_creates_a_private_repo_and_other_processes_upload_nothing(model, tmp_path, fake_hub):
    Trainer(config(model, tmp_path / "o", max_steps=1, hub_private=True)).setup().run()
    assert fake_hub.repos == [(REPO, True, True)] and len(fake_hub.commits) == 1
    # a process other than the main one checks the token but never calls the Hub
    other = hub.prepare(config(model, tmp_path / "o", checkpoint_every=1, push_checkpoints=True), tmp_path / "o",
                        main=False)
    other.checkpoint_saved(tmp_path / "o")
    other.finish()
    assert fake_hub.repos == [(REPO, True, True)] and len(fake_hub.commits) == 1
