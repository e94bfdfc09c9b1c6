"""Scaling out: a simulated two-node Ray cluster runs sweep trials on both nodes; cluster.yaml passes Ray's own
cluster-config validation; bad pipeline configs fail before any work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jobs.full_pipeline import load_pipeline_config, main as pipeline_main
from pipeline.config import ConfigError, DistillConfig, SweepConfig, TrackingConfig

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["gpu_worker"]["max_workers"] >= 1
    assert any("mlflow server" in command for command in prepared["head_start_ray_commands"])
    assert any("pip install" in command for command in prepared["setup_commands"])

    broken = yaml.safe_load((REPO / "cluster.yaml").read_text())
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "many"
    with pytest.raises(Exception, match="min_workers|not of type"):
        validate_config(prepare_config(broken))


def test_runtime_env_file_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text()))
    assert env["working_dir"] == "."


@pytest.mark.parametrize("preset", ["cpu-demo", "smoke", "paper-vicuna-7b"])
def test_presets_load_and_validate(preset, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    config = load_pipeline_config(preset, [f"distill.prompts=[{prompts}]"])
    trials = config.sweep.trial_overrides()
    assert len(trials) >= 2
    if preset == "cpu-demo":
        assert len(trials) == 8 and config.target.spec == "smollm2"
    if preset == "paper-vicuna-7b":
        assert len(trials) == 30 and config.sweep.train.use_gpu == "yes"


@pytest.mark.parametrize(("override", "field"), [
    ("sweep.grid.head.head_type=[medusa, hydra]", "sweep.grid.head.head_type"),
    ("sweep.grid={}", "sweep.grid"),
    ("sweep.grid.adv_weight=[0, -0.1]", "sweep.grid.adv_weight"),
    ("sweep.grid.head.num_layers=[]", "sweep.grid.head.num_layers"),
    ("sweep.grid.out_dir=[a, b]", "sweep.grid.out_dir"),
    ("sweep.eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("sweep.eval.max_new_tokens=64", "sweep.eval.max_new_tokens"),  # smoke distils 32-token answers
    ("sweep.train.tracking.uri=http://elsewhere:5000", "sweep.train.tracking"),
    ("distill.prompts=[missing_prompts.jsonl]", "distill.prompts"),
    ("serve_options.port=0", "pipeline.serve_options"),
])
def test_bad_pipeline_config_fails_before_any_work(override, field, tmp_path, capsys):
    run_dir = tmp_path / "runs"
    prompts = tmp_path / "prompts.jsonl"  # the preset's default prompts live in ../shared, which a checkout may lack
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    code = pipeline_main(["--config", "smoke", "--set", f"run_dir={run_dir}",
                          "--set", f"distill.prompts=[{prompts}]", "--set", override])
    assert code == 2
    error = capsys.readouterr().err
    assert field in error and "Traceback" not in error
    assert not run_dir.exists()


@pytest.mark.parametrize("override", [
    "serve_options.target.spec=gpt2", "serve_options.drafter=/elsewhere/head", "serve_options.use_drafter=false",
    "serve_options.tracking.uri=http://elsewhere:5000",
])
def test_serve_options_cannot_override_what_the_pipeline_sets(override, tmp_path):
    """The serve stage serves the pipeline's target with the head it registered, tracked where the rest is: a
    serve_options key that would replace one of them is refused by name, not silently overridden (or obeyed)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    key = override.split("=")[0].split(".")[1]
    with pytest.raises(ConfigError, match=rf"^pipeline\.serve_options\.{key}: set by the pipeline") as raised:
        load_pipeline_config("smoke", [f"distill.prompts=[{prompts}]", override])
    assert "remove it" in str(raised.value) and "\n" not in str(raised.value)
    assert load_pipeline_config("smoke", [f"distill.prompts=[{prompts}]", "serve_options.port=8123"]).serve_options


@pytest.fixture
def file_store(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this opt-in
    return (tmp_path / "mlruns").as_uri()


def _smoke_config(tmp_path, *overrides: str):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    return load_pipeline_config("smoke", [f"distill.prompts=[{prompts}]", f"run_dir={tmp_path / 'runs'}", *overrides])


def _register_version(uri: str, model_name: str, label: str, tmp_path) -> str:
    """Registers a stand-in head whose `label.txt` says which one it is; returns the version number."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import Run

    head = tmp_path / f"head-{label}"
    head.mkdir()
    (head / "label.txt").write_text(label)
    run = Run.start(uri, experiment="koala", run_name=label, params={})
    run.log_artifact(head, "head")
    run.end()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if not client.search_registered_models(f"name='{model_name}'"):
        client.create_registered_model(model_name)
    return client.create_model_version(model_name, source=f"runs:/{run.run_id}/head", run_id=run.run_id).version


def _serve_capturing(monkeypatch, config, registered, uri):
    """Runs the serve stage with the deployment and the smoke request replaced; returns the ServeConfig deployed."""
    import serve.app
    import serve.client
    from jobs.full_pipeline import _serve

    deployed = []
    monkeypatch.setattr(serve.app, "run_serve", lambda serve_config: deployed.append(serve_config) or "http://x/v1")
    monkeypatch.setattr(serve.client, "smoke_request", lambda url, model: {
        "usage": {"completion_tokens": 3}, "choices": [{"message": {"content": "hi"}}], "speculative": {}})
    _serve(config, registered, uri)
    return deployed[0]


def test_the_serve_stage_deploys_the_version_the_register_stage_registered(file_store, tmp_path, monkeypatch):
    """Not whatever `@champion` points at when the serve stage runs: another pipeline (or a re-run whose register
    stage was cached) may have moved the alias since."""
    from pipeline.tracking import download_registered_head

    from mlflow.tracking import MlflowClient

    ours = _register_version(file_store, "koala-drafter", "ours", tmp_path)
    newer = _register_version(file_store, "koala-drafter", "newer", tmp_path)
    MlflowClient(tracking_uri=file_store, registry_uri=file_store).set_registered_model_alias(
        "koala-drafter", "champion", newer)
    registered = {"model_name": "koala-drafter", "version": ours, "trial": "t", "champion": True,
                  "model_uri": "models:/koala-drafter@champion"}
    served = _serve_capturing(monkeypatch, _smoke_config(tmp_path), registered, file_store)
    head = download_registered_head(file_store, served.drafter, tmp_path / "download")
    assert (head / "label.txt").read_text() == "ours", served.drafter


def test_the_champion_is_served_with_the_drafting_settings_it_was_measured_with(tmp_path, monkeypatch):
    config = _smoke_config(tmp_path, "sweep.eval.tree=dynamic", "sweep.eval.tree_nodes=7", "sweep.eval.draft_length=3")
    registered = {"model_name": "koala-drafter", "version": "1", "trial": "t", "champion": True,
                  "model_uri": "models:/koala-drafter@champion"}
    served = _serve_capturing(monkeypatch, config, registered, None).request_defaults()
    measured = config.sweep.eval.decode_config()
    drafting = ("draft_length", "tree", "tree_nodes", "tree_top_k", "draft_threshold", "lookup_tokens")
    assert {f: getattr(served, f) for f in drafting} == {f: getattr(measured, f) for f in drafting}
    assert (served.tree, served.tree_nodes, served.draft_length) == ("dynamic", 7, 3)
    with pytest.raises(ConfigError, match=r"pipeline\.serve_options\.tree: set by the pipeline.*sweep\.eval"):
        _smoke_config(tmp_path, "serve_options.tree=chain")


def test_a_failing_stage_fails_the_mlflow_parent_run_and_exits_2_naming_it(file_store, tmp_path, monkeypatch,
                                                                          capsys):
    import pipeline.stages.distill
    import pipeline.stages.resources
    from mlflow.tracking import MlflowClient

    def broken_distill(*args, **kwargs):
        raise OSError("No space left on device\nwhile writing shard 3")

    monkeypatch.setattr(pipeline.stages.resources, "init_ray", lambda *args, **kwargs: None)
    monkeypatch.setattr(pipeline.stages.distill, "run_distill", broken_distill)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    code = pipeline_main(["--config", "smoke", "--set", f"distill.prompts=[{prompts}]",
                          "--set", f"run_dir={tmp_path / 'runs'}", "--set", f"tracking.uri={file_store}"])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error, error
    assert "stage distill failed" in error and "No space left on device" in error, error
    client = MlflowClient(tracking_uri=file_store)
    [parent] = client.search_runs([client.get_experiment_by_name("koala").experiment_id],
                                  "tags.`koala.stage` = 'pipeline'")
    assert parent.info.status == "FAILED"
    assert parent.data.tags["koala.failed_stage"] == "distill"
    saved = Path(error.split("(traceback in ")[1].rstrip(")"))
    assert "while writing shard 3" in saved.read_text()  # the whole error is kept, only the message is one line
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {saved.name}


def test_stages_default_to_the_lengths_they_are_evaluated_and_served_at(tmp_path):
    """Defect 5: distillation answers stopped at 128 tokens while decoding defaulted to 256 and the sweep measured 64.
    The defaults now agree, and every preset trains on answers at least as long as it evaluates."""
    from pipeline.config import DecodeConfig, DistillConfig, EvalConfig
    from serve.config import ServeConfig

    distilled = DistillConfig(prompts=("p.jsonl",)).max_new_tokens
    assert distilled == DecodeConfig().max_new_tokens == ServeConfig().default_max_tokens
    assert EvalConfig().max_new_tokens <= distilled
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    for preset in ("cpu-demo", "smoke", "paper-vicuna-7b"):
        config = load_pipeline_config(preset, [f"distill.prompts=[{prompts}]"])
        assert config.sweep.eval.max_new_tokens <= config.distill.max_new_tokens, preset


def test_the_mlflow_store_lives_in_the_pipelines_run_dir(tmp_path, monkeypatch):
    """With `ray job submit --working-dir .`, a store left in the job's copy of `runs/` is lost with it: the embedded
    store follows `run_dir` unless `tracking.run_dir` is set."""
    from jobs.full_pipeline import tracking_settings
    from pipeline.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    shared = tmp_path / "shared-runs"
    config = load_pipeline_config("smoke", [f"distill.prompts=[{prompts}]", f"run_dir={shared}"])
    assert tracking_uri(tracking_settings(config)) == f"sqlite:///{shared / 'mlflow.db'}"
    config = load_pipeline_config("smoke", [f"distill.prompts=[{prompts}]", f"run_dir={shared}",
                                            f"tracking.run_dir={tmp_path / 'mlflow'}"])
    assert tracking_uri(tracking_settings(config)) == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    # Set to `runs`, the stand-alone stages' default, it is still honoured (it was taken for the default).
    monkeypatch.chdir(tmp_path)
    config = load_pipeline_config("smoke", [f"distill.prompts=[{prompts}]", f"run_dir={shared}",
                                            "tracking.run_dir=runs"])
    assert tracking_uri(tracking_settings(config)) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"  # a stage on its own


def test_unknown_preset_names_the_choices(capsys):
    assert pipeline_main(["--config", "no-such-preset"]) == 2
    assert "cpu-demo" in capsys.readouterr().err


@pytest.mark.slow
def test_two_node_cluster_runs_trials_on_both_nodes(tiny_model_dir, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.stages.distill import run_distill
    from tune.sweep import run_sweep

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"prompt number {i}"}) for i in range(6)) + "\n")
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"turns": ["a question"]}) + "\n")
    run_distill(DistillConfig.from_dict({
        "prompts": [str(prompts)], "out_dir": str(tmp_path / "data"), "max_new_tokens": 16,
        "target": {"spec": str(tiny_model_dir), "device": "cpu"}, "tracking": {"enabled": False},
    }), use_ray=False)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        config = SweepConfig.from_dict({
            "grid": {"head.head_type": ["medusa", "eagle"]},
            # Each trial's training worker takes a whole node's 2 CPUs, so two trials at once need both nodes.
            "train": {"head": {"num_heads": 2}, "max_steps": 2, "batch_size": 2, "cpus_per_worker": 2,
                      "val_fraction": 0.0, "target": {"spec": str(tiny_model_dir), "device": "cpu"},
                      "tracking": {"enabled": False}},
            "eval": {"questions": str(questions), "per_category": 0, "max_new_tokens": 4, "cpus": 2,
                     "warmup_prompts": 0},
            "out_dir": str(tmp_path / "sweeps"),
        })
        summary = run_sweep(config, data_dirs=[str(tmp_path / "data")])
        nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len(nodes) == 2
    assert all(not row.get("error") for row in summary["rows"])
    used = {row[key] for row in summary["rows"] for key in ("train_node_id", "eval_node_id")}
    assert used == nodes, f"trials ran on {used}, cluster nodes {nodes}"


def test_tracking_uri_reaches_the_driver_node_from_other_nodes(monkeypatch, tmp_path):
    from pipeline.config import TrackingConfig
    from pipeline.tracking import reachable_from_cluster, tracking_uri

    assert reachable_from_cluster("http://127.0.0.1:5000", "10.0.0.7") == "http://10.0.0.7:5000"
    assert reachable_from_cluster("http://localhost:5000/path", "10.0.0.7") == "http://10.0.0.7:5000/path"
    assert reachable_from_cluster("http://mlflow.internal:5000", "10.0.0.7") == "http://mlflow.internal:5000"
    assert reachable_from_cluster("sqlite:////tmp/x.db", "10.0.0.7") == "sqlite:////tmp/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(TrackingConfig(run_dir=str(tmp_path))) == "http://127.0.0.1:5000"
    assert tracking_uri(TrackingConfig(uri="http://other:5000")) == "http://other:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(TrackingConfig(run_dir=str(tmp_path))) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
