"""Serve's checks before deploying: a bad drafter, a head made for another target or an empty API-key variable
fail in seconds with one line, before anything is deployed (and, except for the key, before Ray starts). Real
MLflow stores (file and SQLite) on disk; the key check runs on a real local Ray cluster."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
import torch

from conftest import char_tokenizer, tiny_llama
from pipeline.config import ConfigError, HeadConfig
from pipeline.heads import HeadLoadError, build_head, save_head, target_identity_dict
from pipeline.target import TargetLoadError
from pipeline.tracking import Run
from serve.app import run_serve
from serve.checks import check_before_deploy
from serve.config import ServeConfig

FAST_S = 15.0  # the checks take about a second; the budget leaves room for a busy machine


def _save_head_for(model, directory: Path, name: str) -> Path:
    torch.manual_seed(0)
    head = build_head(HeadConfig(head_type="eagle", num_layers=1, num_heads=3), model)
    return save_head(head, directory, target_identity=target_identity_dict(model, name))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny target, a head for it, and heads made for targets of another hidden size and another vocabulary."""
    root = tmp_path_factory.mktemp("serve-checks")
    model = tiny_llama()
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    return {
        "model": root / "model",
        "head": _save_head_for(model, root / "head", str(root / "model")),
        "wider_head": _save_head_for(tiny_llama(hidden_size=96), root / "wider_head", "wider-llama"),
        "bigger_vocab_head": _save_head_for(tiny_llama(vocab_size=90), root / "bigger_vocab_head", "bigger-vocab"),
    }


def _config(models: dict[str, Path], **fields) -> ServeConfig:
    return ServeConfig.from_dict({"target": {"spec": str(models["model"]), "device": "cpu"}, "use_gpu": "no",
                                  "port": 18777, **fields})


def _fails_fast(config: ServeConfig, error_type: type[Exception], match: str) -> tuple[str, float]:
    """run_serve's error (one line, matching `match`) and how long it took; nothing is deployed."""
    started = time.perf_counter()
    with pytest.raises(error_type, match=match) as raised:
        run_serve(config)
    elapsed = time.perf_counter() - started
    message = str(raised.value)
    assert "\n" not in message, message
    assert elapsed < FAST_S, f"took {elapsed:.1f} s: {message}"
    return message, elapsed


@pytest.fixture
def file_store(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this opt-in
    return (tmp_path / "mlruns").as_uri()


def _register(uri: str, head_dir: Path, model_name: str) -> None:
    """Logs `head_dir` as a run's `head` artifact and registers it as version 1 of `model_name`, alias champion."""
    from mlflow.tracking import MlflowClient

    run = Run.start(uri, experiment="serve-checks", run_name=model_name, params={})
    run.log_artifact(head_dir, "head")
    run.end()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(model_name)
    version = client.create_model_version(model_name, source=f"runs:/{run.run_id}/head", run_id=run.run_id)
    client.set_registered_model_alias(model_name, "champion", version.version)


@pytest.fixture(autouse=True)
def no_ray_running():
    assert not ray.is_initialized(), "these tests check what fails before Ray starts (or start their own)"
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.parametrize("store", ["file", "sqlite"])
def test_unknown_registered_drafter_fails_in_seconds_before_ray_starts(models, file_store, tmp_path, store):
    uri = file_store if store == "file" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = _config(models, drafter="models:/no-such-model@champion", tracking={"uri": uri})
    message, _ = _fails_fast(config, HeadLoadError, "does not resolve in the MLflow registry")
    assert "no-such-model" in message and uri in message and "pass a head directory" in message
    assert not ray.is_initialized()


def test_registered_drafter_is_checked_against_the_target(models, file_store):
    _register(file_store, models["head"], "koala-drafter")
    _register(file_store, models["wider_head"], "wider-drafter")
    check_before_deploy(_config(models, drafter="models:/koala-drafter@champion", tracking={"uri": file_store}))
    check_before_deploy(_config(models, drafter="models:/koala-drafter/1", tracking={"uri": file_store}))
    _fails_fast(_config(models, drafter="models:/koala-drafter@no-such-alias", tracking={"uri": file_store}),
                HeadLoadError, "alias no-such-alias not found")
    _fails_fast(_config(models, drafter="models:/wider-drafter@champion", tracking={"uri": file_store}),
                HeadLoadError, "made for target 'wider-llama' with hidden_size=96, but target .* has hidden_size=64")
    assert not ray.is_initialized()


def test_a_registered_drafter_is_loaded_without_leaving_its_download_behind(models, file_store, tmp_path,
                                                                           monkeypatch):
    """Every replica start downloaded the head to a new temporary directory that nothing removed."""
    import tempfile

    from serve.engine import load_engine

    _register(file_store, models["head"], "koala-drafter")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    engine = load_engine(_config(models, drafter="models:/koala-drafter@champion", tracking={"uri": file_store}))
    try:
        assert engine.drafter is not None and list(scratch.iterdir()) == []
    finally:
        engine.close()


@pytest.mark.parametrize(("head", "match"), [
    ("wider_head", "hidden_size=96, but target .* has hidden_size=64; use a head trained for this target"),
    ("bigger_vocab_head", "vocab_size=90, but target .* has vocab_size=80; use a head trained for this target"),
])
def test_head_made_for_another_target_fails_in_seconds(models, head, match):
    _fails_fast(_config(models, drafter=str(models[head])), HeadLoadError, match)
    assert not ray.is_initialized()


def test_missing_head_directory_or_target_fails_in_seconds(models, tmp_path):
    _fails_fast(_config(models, drafter=str(tmp_path / "no-head")), HeadLoadError,
                "drafter directory .*no-head does not exist; create one with `koala head init`")
    no_target = _config(models, use_drafter=False, target={"spec": str(tmp_path / "gone")})
    _fails_fast(no_target, TargetLoadError, "no such model directory")
    check_before_deploy(_config(models, drafter=str(models["head"])))  # the matching head passes
    assert not ray.is_initialized()


def test_empty_api_key_variable_fails_in_seconds_before_ray_starts(models, monkeypatch):
    """Without a cluster, run_serve would start a local one, which inherits this environment: checked here."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("KOALA_EMPTY_TEST_KEY", "")
    config = _config(models, drafter=str(models["head"]), api_key_env="KOALA_EMPTY_TEST_KEY")
    message, _ = _fails_fast(config, ConfigError, "serve.api_key_env: environment variable KOALA_EMPTY_TEST_KEY is "
                                                  "empty or unset in this shell")
    assert "clear api_key_env" in message
    assert not ray.is_initialized()


def test_api_key_is_checked_where_the_replicas_run(models, monkeypatch):
    """On a running cluster the key is read by a task in the job's environment, as the replicas read it: set in
    this shell but emptied by the job's runtime_env, it is missing there."""
    monkeypatch.setenv("KOALA_EMPTY_TEST_KEY", "set-here")
    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"KOALA_EMPTY_TEST_KEY": ""}})
    config = _config(models, drafter=str(models["head"]), api_key_env="KOALA_EMPTY_TEST_KEY")
    _fails_fast(config, ConfigError, "KOALA_EMPTY_TEST_KEY is empty or unset on the Ray cluster's workers")
    named = {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)}
    assert not any("SERVE" in name for name in named), named  # Serve was not even started


def test_koala_serve_prints_one_line_for_an_unknown_registered_model(models, file_store, capsys):
    from pipeline.cli import main

    argv = ["serve", "--target", str(models["model"]), "--drafter", "models:/no-such-model@champion",
            "--tracking-uri", file_store]
    started = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - started < FAST_S
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("koala serve: error: drafter models:/no-such-model@champion "
                                                   "does not resolve"), lines
    assert not ray.is_initialized()
