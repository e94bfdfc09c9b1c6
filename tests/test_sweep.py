"""The Ray Tune sweep and the full pipeline on a local Ray cluster with a tiny model: every trial trains and is
measured, MLflow holds the parent and child runs, plots and the registered champion; an interrupted sweep resumes
without retraining; a second pipeline run reuses every stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import PipelineConfig, SweepConfig
from tune.sweep import register_winner, run_sweep

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["hello there", "the quick brown fox", "what is two plus two?", "tell me a story", "why is the sky blue?",
           "name three colors", "count to five", "say something nice"]
QUESTIONS = ["hello there", "what is the capital of france?", "describe a cat", "list four fruits"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-inputs")
    (root / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"conversations": [{"from": "human", "value": p}]}) for p in PROMPTS) + "\n")
    (root / "questions.jsonl").write_text(
        "\n".join(json.dumps({"question_id": i, "category": "c", "turns": [q]}) for i, q in enumerate(QUESTIONS)) + "\n")
    return root


@pytest.fixture(scope="module")
def distilled(ray_cluster, inputs, tiny_model_dir, tmp_path_factory):
    from pipeline.config import DistillConfig
    from pipeline.stages.distill import run_distill

    out = tmp_path_factory.mktemp("sweep-data")
    run_distill(DistillConfig.from_dict({
        "prompts": [str(inputs / "prompts.jsonl")], "out_dir": str(out), "shard_size": 4, "batch_size": 4,
        "max_new_tokens": 24, "target": {"spec": str(tiny_model_dir), "device": "cpu"},
        "tracking": {"enabled": False},
    }), use_ray=False)
    return out


def sweep_values(tiny_model_dir, inputs, root, **overrides):
    values = {
        "grid": {"head.head_type": ["medusa", "eagle"], "adv_weight": [0.0, 0.1]},
        "train": {"head": {"num_layers": 1, "num_heads": 2}, "max_steps": 3, "batch_size": 2,
                  "cpus_per_worker": 1, "val_fraction": 0.25, "checkpoint_every_steps": 3, "log_every_steps": 1,
                  "target": {"spec": str(tiny_model_dir), "device": "cpu"},
                  "tracking": {"run_dir": str(root / "mlruns")}},
        "eval": {"questions": str(inputs / "questions.jsonl"), "per_category": 0, "max_new_tokens": 8, "cpus": 1,
                 "warmup_prompts": 0},
        "out_dir": str(root / "sweeps"),
        "max_concurrent_trials": 2,
        "champion_min_speedup": 0.0,  # random heads on a tiny model: any lossless head may be champion here
    }
    values.update(overrides)
    return values


def test_training_data_is_known_by_content_and_its_prompts_are_never_evaluated(tmp_path, inputs, tiny_model_dir):
    """Data that koala distill did not write (one Parquet file; teacher-forced ids that hash the whole
    conversation): its prompts are still dropped from the evaluation, and the sweep's key follows its content, the
    training workers count and the tracking settings, so none of them reuses another sweep's heads or runs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import content_hash
    from tune.sweep import evaluation_questions, sweep_key

    data = tmp_path / "answers.parquet"
    opening = [{"role": "user", "content": "hello there"}]

    def write(answer):
        pq.write_table(pa.Table.from_pylist([{
            "prompt_id": content_hash([*opening, {"role": "assistant", "content": "hi"}]),
            "split_id": content_hash(opening), "input_ids": [5, 6, *answer], "loss_mask": [0, 0] + [1] * len(answer),
        }]), data)

    def key(**train):
        values = sweep_values(tiny_model_dir, inputs, tmp_path)
        values["train"].update(train)
        return sweep_key(SweepConfig.from_dict(values), [str(data)], questions, incumbent_sha1=None)

    write([7, 8])
    config = SweepConfig.from_dict(sweep_values(tiny_model_dir, inputs, tmp_path))
    questions, dropped = evaluation_questions(config.eval, [str(data)], [data])
    assert dropped == 1 and [q.prompt for q in questions] == QUESTIONS[1:]
    first = key()
    write([7, 9])
    assert key() != first
    write([7, 8])
    assert key() == first
    assert len({first, key(num_workers=2), key(tracking={"enabled": False})}) == 3


def test_a_trial_whose_evaluation_fails_ends_its_run_as_failed(tmp_path, monkeypatch):
    """Not left RUNNING when Tune's retries run out; a retry that succeeds ends it again, as FINISHED."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrainConfig
    from pipeline.tracking import Run
    from tune import sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = Run.start(uri, experiment="koala", run_name="eagle", params={})
    trial_dir = tmp_path / "trials" / "eagle"
    (trial_dir / "head").mkdir(parents=True)
    (trial_dir / "train_summary.json").write_text(json.dumps({
        "head_dir": str(trial_dir / "head"), "mlflow_run_id": run.run_id, "metrics": {}, "wall_time_s": 1.0}))
    config = TrainConfig.from_dict({"data_dirs": ["unused"], "out_dir": str(trial_dir)})
    context = {"trials": {"eagle": config.to_dict()}, "questions": [], "mlflow_uri": uri}

    def failing(context, head_dir):
        raise RuntimeError("the evaluation task died")

    monkeypatch.setattr(sweep, "_evaluate", failing)
    with pytest.raises(RuntimeError, match="died"):
        sweep.run_trial({"trial": "eagle"}, context=context)
    assert MlflowClient(tracking_uri=uri).get_run(run.run_id).info.status == "FAILED"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mlflow_client(root):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def train_runs(client, experiment="koala"):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], "tags.`koala.stage` = 'train'")


def test_sweep_measures_every_trial_tracks_them_and_registers_the_fastest(distilled, tiny_model_dir, inputs, tmp_path):
    config = SweepConfig.from_dict(sweep_values(tiny_model_dir, inputs, tmp_path))
    summary = run_sweep(config, data_dirs=[str(distilled)])

    rows = summary["rows"]
    assert sorted(r["trial"] for r in rows) == sorted(
        ["medusa-lambda0", "medusa-lambda0.1", "eagle-lambda0", "eagle-lambda0.1"])
    for row in rows:
        assert not row.get("error"), row
        assert row["speedup"] > 0 and row["tau"] >= 1.0 and row["exact_match"] == 1.0
        assert row["eval_prompts"] == 3  # "hello there" is a training prompt: dropped
    assert summary["eval_prompts_dropped"] == 1
    best = max(rows, key=lambda r: (r["speedup"], r["tau"]))
    assert summary["winner"]["trial"] == best["trial"]

    client, uri = mlflow_client(tmp_path)
    children = train_runs(client)
    assert len(children) == 4
    parent_ids = {run.data.tags["mlflow.parentRunId"] for run in children}
    assert len(parent_ids) == 1
    parent = client.get_run(parent_ids.pop())
    assert parent.data.metrics["best/speedup"] == pytest.approx(best["speedup"])
    assert parent.data.metrics["best/tau"] == pytest.approx(best["tau"])
    assert "**Champion:" in parent.data.tags["mlflow.note.content"] and best["trial"] in parent.data.tags["mlflow.note.content"]
    experiment = client.get_experiment_by_name("koala")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's training-runs view
    for run in children:
        assert {"eval/speedup", "eval/tau", "eval/alpha_1", "train/loss_distill", "val/tau"} <= set(run.data.metrics)
        assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/trials.md", "sweep/plots"} <= artifacts
    for plot in summary["plots"]:
        data = Path(plot).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, plot
    assert len(Path(summary["sweep_dir"], "trials.csv").read_text().splitlines()) == 5

    registered = register_winner(summary, model_name="koala-drafter", tracking_uri=uri,
                                 target=config.train.target)
    champion = client.get_model_version_by_alias("koala-drafter", "champion")
    assert champion.version == registered["version"]
    assert champion.run_id == summary["winner"]["mlflow_run_id"]
    assert json.loads(champion.tags["metrics"])["speedup"] == pytest.approx(best["speedup"])

    from pipeline.heads import load_head
    from pipeline.target import load_target
    from pipeline.tracking import download_registered_head

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)  # resolving a registered head leaves no default store (mlflow.db) behind
        head_dir = download_registered_head(uri, "models:/koala-drafter@champion", tmp_path / "download")
        config_only = download_registered_head(uri, "models:/koala-drafter@champion", tmp_path / "config-only",
                                               only="head_config.json")
    assert not (tmp_path / "mlflow.db").exists()
    assert sorted(p.name for p in config_only.iterdir()) == ["head_config.json"]  # serve's checks skip the weights
    assert json.loads((config_only / "head_config.json").read_text()) == \
        json.loads((head_dir / "head_config.json").read_text())
    load_head(head_dir, load_target(str(tiny_model_dir), device="cpu").model, target_name=str(tiny_model_dir))

    again = run_sweep(config, data_dirs=[str(distilled)])
    assert again["cached"] and again["winner"]["trial"] == best["trial"]


def incumbent_head(tiny_model_dir, directory: Path) -> Path:
    """A fresh EAGLE head for the tiny target, to stand in as the incumbent a sweep must beat."""
    from pipeline.config import HeadConfig
    from pipeline.heads import build_head, save_head, target_identity_dict
    from pipeline.target import load_target

    target = load_target(str(tiny_model_dir), device="cpu")
    return save_head(build_head(HeadConfig(head_type="eagle", num_heads=2), target.model), directory,
                     target_identity=target_identity_dict(target.model, str(tiny_model_dir)))


def test_interrupted_sweep_resumes_without_retraining_finished_trials(distilled, tiny_model_dir, inputs, tmp_path):
    values = sweep_values(tiny_model_dir, inputs, tmp_path, max_concurrent_trials=1,
                          incumbent=str(incumbent_head(tiny_model_dir, tmp_path / "incumbent")))
    config_path = tmp_path / "sweep.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(values))
    command = [sys.executable, "-m", "pipeline.cli", "tune", "--config", str(config_path), "--data", str(distilled)]
    log = tmp_path / "first-run.log"
    with log.open("w") as output:  # a file, not a pipe: Ray logs enough to fill a pipe and block the process
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                                   env={**os.environ, "RAY_ADDRESS": "local"}, start_new_session=True)
    trials = tmp_path / "sweeps"
    deadline = time.monotonic() + 240
    while len(list(trials.glob("*/trials/*/eval.json"))) < 2:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the sweep did not finish two trials in time"
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 130, log.read_text()[-3000:]
    assert "run the same command again to resume" in log.read_text()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in trials.glob("*/trials/*/train_summary.json")
                if (p.parent / "eval.json").is_file()}
    assert len(finished) >= 2
    assert not list(trials.glob("*/results.json")), "the sweep was not interrupted"
    incumbent_eval = next(trials.glob("*/incumbent/eval.json"))  # measured first, before any trial
    incumbent_measured = incumbent_eval.stat().st_mtime_ns

    summary = run_sweep(SweepConfig.from_dict(values), data_dirs=[str(distilled)])
    assert len(summary["rows"]) == 5 and all(not r.get("error") for r in summary["rows"])
    for name, mtime in finished.items():
        assert next(trials.glob(f"*/trials/{name}/train_summary.json")).stat().st_mtime_ns == mtime, name
    assert incumbent_eval.stat().st_mtime_ns == incumbent_measured  # the resumed sweep reused its measurement
    client, _ = mlflow_client(tmp_path)
    names = sorted(run.info.run_name for run in train_runs(client))
    assert len(names) == len(set(names)) == 4, names  # no trial trained twice
    experiment_id = client.get_experiment_by_name("koala").experiment_id
    assert len(client.search_runs([experiment_id], "tags.`koala.stage` = 'incumbent'")) == 1  # logged once


def pipeline_config(tiny_model_dir, inputs, tmp_path, **sweep_overrides) -> PipelineConfig:
    sweep = sweep_values(tiny_model_dir, inputs, tmp_path, **{"grid": {"head.head_type": ["medusa", "eagle"]},
                                                               **sweep_overrides})
    sweep["train"].pop("target")
    sweep["train"].pop("tracking")
    sweep.pop("out_dir")
    return PipelineConfig.from_dict({
        "run_dir": str(tmp_path / "runs"), "tracking": {"run_dir": str(tmp_path / "runs")},
        "serve_options": {"port": free_port(), "cpus_per_replica": 1},
        "target": {"spec": str(tiny_model_dir), "device": "cpu"},
        "distill": {"prompts": [str(inputs / "prompts.jsonl")], "shard_size": 4, "batch_size": 4,
                    "max_new_tokens": 16, "cpus_per_actor": 1},
        "sweep": sweep,
    })


def test_second_pipeline_run_reuses_every_stage_and_keeps_the_real_costs(ray_cluster, inputs, tiny_model_dir,
                                                                          tmp_path):
    from mlflow.tracking import MlflowClient

    from jobs.full_pipeline import run_pipeline

    config = pipeline_config(tiny_model_dir, inputs, tmp_path)
    first = run_pipeline(config)
    assert not any(stage["cached"] for stage in first["stages"].values())
    assert first["champion"] and first["registered"]["model_uri"] == "models:/koala-drafter@champion"
    assert first["serve"]["smoke_completion_tokens"] >= 1  # the champion answered over HTTP
    assert first["serve"]["drafter"] == f"models:/koala-drafter/{first['registered']['version']}"  # not the alias
    client = MlflowClient(tracking_uri=first["mlflow_uri"])
    parent_id = first["mlflow_parent_run_id"]
    costs = {k: v for k, v in client.get_run(parent_id).data.metrics.items() if k.startswith("time/")}
    assert costs["time/stage_distill_s"] == first["stages"]["distill"]["seconds"] > 0
    assert costs["time/wall_time_s"] == first["wall_time_s"]

    second = run_pipeline(config)
    assert all(stage["cached"] for name, stage in second["stages"].items() if name != "serve")
    for name in ("distill", "sweep", "register"):  # each reused stage reports the cost of the run that made it
        assert second["stages"][name]["original_seconds"] == first["stages"][name]["seconds"], name
    assert second["winner"]["trial"] == first["winner"]["trial"]
    assert second["mlflow_parent_run_id"] == parent_id
    metrics = client.get_run(parent_id).data.metrics
    assert {k: metrics[k] for k in costs} == costs  # the real costs survive the cached re-run
    assert metrics["time/rerun_wall_time_s"] == second["wall_time_s"]
    assert "reused cached distill, sweep, register" in client.get_run(parent_id).data.tags["koala.last_rerun"]
    summary_path = client.download_artifacts(parent_id, "pipeline_summary.json", str(tmp_path))
    assert json.loads(Path(summary_path).read_text())["wall_time_s"] == first["wall_time_s"]

    assert len(train_runs(client)) == 2
    stages = client.search_runs([client.get_experiment_by_name("koala").experiment_id], "tags.`koala.stage` = 'distill'")
    assert len(stages) == 1


def test_without_a_head_that_beats_plain_decoding_there_is_no_champion(ray_cluster, inputs, tiny_model_dir, tmp_path,
                                                                        capsys):
    """A floor no head reaches: the best head is registered without the champion alias (tagged with why), the
    target is served with plain decoding, the end of the output says so, and the tiny evaluation is flagged."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from jobs.full_pipeline import run_pipeline

    summary = run_pipeline(pipeline_config(tiny_model_dir, inputs, tmp_path, champion_min_speedup=100.0))
    assert not summary["champion"] and "a champion must exceed 100.00x" in summary["no_champion_reason"]
    registered = summary["registered"]
    assert not registered["champion"] and registered["model_uri"] == f"models:/koala-drafter/{registered['version']}"
    client = MlflowClient(tracking_uri=summary["mlflow_uri"], registry_uri=summary["mlflow_uri"])
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("koala-drafter", "champion")
    version = client.get_model_version("koala-drafter", registered["version"])
    assert version.tags["koala.champion"] == "false" and "100.00x" in version.tags["koala.no_champion_reason"]
    assert summary["serve"]["drafter"] is None and summary["serve"]["smoke_completion_tokens"] >= 1
    assert "too small to separate trials" in summary["eval_warning"]  # 3 prompts x 8 tokens
    parent = client.get_run(summary["mlflow_parent_run_id"]).data.tags
    assert parent["koala.champion"] == "false" and "too small" in parent["koala.eval_warning"]
    output = capsys.readouterr().out
    assert "[pipeline] no head beat plain decoding: the best head" in output
    assert "serving the target with plain decoding" in output


def test_an_incumbent_no_trained_head_beats_is_registered_and_served(ray_cluster, inputs, tiny_model_dir, tmp_path,
                                                                     capsys):
    """The sweep measures the incumbent like a trial; when every trained head fails (here: training breaks at its
    first step and may not retry), it is the winner, registered from its own child run and served."""
    from mlflow.tracking import MlflowClient

    from jobs.full_pipeline import run_pipeline

    incumbent = incumbent_head(tiny_model_dir, tmp_path / "incumbent")
    config = pipeline_config(tiny_model_dir, inputs, tmp_path, grid={"head.head_type": ["medusa"]},
                             incumbent=str(incumbent), max_trial_failures=0)
    config = config.replace(sweep=config.sweep.replace(
        train=config.sweep.train.replace(fail_once_at_step=1, max_failures=0)))
    summary = run_pipeline(config)

    rows = {r["trial"]: r for r in json.loads(Path(summary["sweep_dir"], "results.json").read_text())["rows"]}
    assert rows["medusa"].get("error")
    assert rows["incumbent"]["incumbent"] == str(incumbent) and rows["incumbent"]["exact_match"] == 1.0
    assert rows["incumbent"]["head.head_type"] == "eagle" and rows["incumbent"]["tau"] >= 1.0
    assert summary["winner"]["trial"] == "incumbent" and summary["champion"]
    client = MlflowClient(tracking_uri=summary["mlflow_uri"], registry_uri=summary["mlflow_uri"])
    version = client.get_model_version_by_alias("koala-drafter", "champion")
    assert version.tags["koala.incumbent"] == str(incumbent) and len(version.tags["koala.incumbent_sha1"]) == 40
    run = client.get_run(version.run_id)
    assert run.data.tags["koala.stage"] == "incumbent" and run.data.params["incumbent"] == str(incumbent)
    assert run.data.metrics["eval/speedup"] == pytest.approx(rows["incumbent"]["speedup"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "head")} == {
        "head/head.safetensors", "head/head_config.json"}
    assert summary["serve"]["drafter"] == f"models:/koala-drafter/{summary['registered']['version']}"
    assert summary["serve"]["smoke_completion_tokens"] >= 1
    output = capsys.readouterr().out
    assert f"[pipeline] champion incumbent {incumbent}: speedup" in output
    assert "[pipeline] No trained head beat the incumbent" in output and "none finished" in output
    assert output.count("No trained head beat the incumbent") == 1  # the sweep itself no longer says it too


def test_a_prompt_trained_on_behind_a_system_prompt_is_not_evaluated(tmp_path, inputs, tiny_model_dir):
    """koala distill keeps the system prompt in the opening it hashes, while an evaluation question is a bare user
    turn: the first user turn's own hash (`first_turn_id`) is what finds it in the training data."""
    import pyarrow.parquet as pq

    from pipeline.data import Conversation, content_hash, encode_teacher_forced, rows_to_table
    from pipeline.target import PromptFormat
    from tests.conftest import char_tokenizer
    from tune.sweep import evaluation_questions

    messages = ({"role": "system", "content": "be brief"}, {"role": "user", "content": QUESTIONS[0]},
                {"role": "assistant", "content": "ok"})
    row = encode_teacher_forced(PromptFormat(char_tokenizer(), "vicuna"), Conversation(content_hash(messages), messages))
    assert row.first_turn_id == content_hash([{"role": "user", "content": QUESTIONS[0]}]) != row.split_id
    path = tmp_path / "answers.parquet"
    pq.write_table(rows_to_table([row], metadata={}), path)
    config = SweepConfig.from_dict(sweep_values(tiny_model_dir, inputs, tmp_path))
    questions, dropped = evaluation_questions(config.eval, [str(path.parent)], [path])
    assert dropped == 1 and [q.prompt for q in questions] == QUESTIONS[1:]


def test_the_draft_vocabulary_check_counts_parquet_koala_distill_did_not_write(tmp_path, inputs, tiny_model_dir):
    """One Parquet file (no token_freq.json beside it) is counted from its rows: a size the
    data holds passes, a larger one is refused naming the field (both were 'token frequency table ... does not
    exist' before)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import ConfigError
    from tune.sweep import _check_draft_vocabulary

    data = tmp_path / "answers.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt_id": "p", "split_id": "p", "input_ids": [5, 6, 7, 8, 9],
                                          "loss_mask": [0, 0, 1, 1, 1]}]), data)

    def config(size):
        values = sweep_values(tiny_model_dir, inputs, tmp_path)
        values["train"]["head"]["draft_vocab_size"] = size
        return SweepConfig.from_dict(values)

    _check_draft_vocabulary(config(3), [data])
    with pytest.raises(ConfigError, match=r"draft_vocab_size: 4 exceeds the 3 distinct"):
        _check_draft_vocabulary(config(4), [data])
