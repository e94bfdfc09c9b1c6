"""`koala head init` and `koala bench` end to end on a tiny local model directory, and their error messages."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import char_tokenizer, tiny_llama
from pipeline.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-model")
    tiny_llama().save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "questions.jsonl"
    rows = [
        {"question_id": 1, "category": "writing", "turns": ["hello there", "second turn"]},
        {"question_id": 2, "category": "writing", "turns": ["the quick brown fox"]},
        {"question_id": 3, "category": "math", "turns": ["what is 2 plus 2?"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("head_type", ["eagle", "medusa"])
def test_head_init_then_bench_writes_a_complete_report(model_dir, questions, tmp_path, capsys, head_type):
    head_dir = tmp_path / "head"
    assert main(["head", "init", "--type", head_type, "--num-layers", "2", "--target", str(model_dir),
                 "--out", str(head_dir)]) == 0
    report_path = tmp_path / "bench.json"
    assert main(["bench", "--target", str(model_dir), "--drafter", str(head_dir), "--questions", str(questions),
                 "--per-category", "1", "--max-new-tokens", "16", "--tree", "chain", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["n_prompts"] == 2  # one writing + one math question
    assert report["exact_match"] == 1.0
    assert set(report["tokens_per_s"]) == {"vanilla", "speculative", "hf_generate", "hf_prompt_lookup"}
    assert all(rate > 0 for rate in report["tokens_per_s"].values())
    assert report["speedup"] > 0 and report["tau"] >= 1.0
    assert len(report["alpha"]) == 4  # n-alpha for every drafted position (draft length = num_heads, 4)
    assert report["settings"]["head"]["num_layers"] == 2
    assert report["settings"]["max_new_tokens"] == 16
    assert report["step_cost"]["draft_ms_per_token"] > 0
    assert report["tree_nodes"] == [0] and {row["tree_nodes"] for row in report["per_prompt"]} == {0}
    assert list(report["by_category"]) == ["writing", "math"]
    assert all(entry["prompts"] == 1 and entry["tau"] >= 1.0 and entry["speedup"] > 0
               for entry in report["by_category"].values())
    assert report["draft_vocab_coverage"] is None  # the full vocabulary
    printed = capsys.readouterr().out
    assert "speedup" in printed and "tree nodes none (chains)" in printed
    assert "by category (tau, speedup): writing" in printed and "draft vocabulary holds" not in printed


def test_bench_with_a_prompt_lookup_branch_reports_its_share(model_dir, questions, tmp_path, capsys):
    head_dir = tmp_path / "head"
    assert main(["head", "init", "--type", "eagle", "--target", str(model_dir), "--out", str(head_dir)]) == 0
    report_path = tmp_path / "bench.json"
    assert main(["bench", "--target", str(model_dir), "--drafter", str(head_dir), "--questions", str(questions),
                 "--per-category", "1", "--max-new-tokens", "24", "--tree", "static", "--tree-nodes", "4",
                 "--lookup-tokens", "4", "--no-hf", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["exact_match"] == 1.0 and report["settings"]["lookup_tokens"] == 4
    assert 0 <= report["lookup_share"] <= 1
    assert all("lookup_accepted" in row for row in report["per_prompt"])
    assert "lookup branch" in capsys.readouterr().out


def test_head_init_with_draft_vocabulary(model_dir, questions, tmp_path, capsys):
    head_dir = tmp_path / "head"
    assert main(["head", "init", "--type", "eagle", "--target", str(model_dir), "--draft-vocab-size", "10",
                 "--draft-vocab-corpus", str(questions), "--out", str(head_dir)]) == 0
    assert json.loads((head_dir / "head_config.json").read_text())["head"]["draft_vocab_size"] == 10
    report_path = tmp_path / "bench.json"
    assert main(["bench", "--target", str(model_dir), "--drafter", str(head_dir), "--questions", str(questions),
                 "--max-new-tokens", "16", "--no-hf", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    shares = [row["draft_vocab_coverage"] for row in report["per_prompt"]]
    assert all(0 <= share <= 1 for share in shares)
    assert min(shares) <= report["draft_vocab_coverage"] <= max(shares)
    assert "draft vocabulary holds" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["bench", "--target", "./no-such-model", "--drafter", "{head}", "--questions", "{questions}"],
         "no such model directory"),
        (["bench", "--target", "{model}", "--drafter", "{tmp}/missing", "--questions", "{questions}"],
         "drafter directory .*missing does not exist"),
        (["bench", "--target", "{model}", "--drafter", "{head}", "--questions", "{tmp}/none.jsonl"],
         "bench.questions: .*none.jsonl does not exist"),
        (["bench", "--target", "{model}", "--drafter", "{head}", "--questions", "{questions}", "--temperature", "-1"],
         "decode.temperature: must be >= 0"),
        (["bench", "--target", "{model}", "--drafter", "{head}", "--questions", "{questions}", "--lookup-tokens", "-1"],
         "decode.lookup_tokens: must be >= 0"),
        (["bench", "--target", "{model}", "--drafter", "{head}", "--questions", "{questions}", "--temperature", "0.5",
          "--tree-max-temperature", "-1"], "decode.tree_max_temperature: must be >= 0"),
        (["head", "init", "--type", "eagle", "--num-layers", "0", "--target", "{model}", "--out", "{tmp}/h"],
         "head.num_layers: must be >= 1"),
        (["head", "init", "--type", "hydra", "--target", "{model}", "--out", "{tmp}/h"],
         "head.head_type: unknown head type 'hydra'"),
        (["bench", "--target", "{model}", "--drafter", "{head}", "--questions", "{questions}", "--json", "{tmp}"],
         "bench: --json .* is a directory; name a file"),
        (["distill", "--prompts", "{questions}", "--out", "{tmp}/d", "--set", "prompts=[a.jsonl"],
         "distill: --set 'prompts=\\[a.jsonl': the value is not valid YAML"),
        (["distill", "--config", "{tmp}/shorthand.yaml", "--target", "{model}", "--out", "{tmp}/d"],
         "target: is 'smollm2', not a mapping of fields, so target.spec cannot be set"),
        (["tune", "--config", "{tmp}/empty-train.yaml"], "tune: name the distilled data with --data DIR"),
        (["head", "init", "--type", "eagle", "--target", "{model}", "--out", "{tmp}/h", "--draft-vocab-size", "8",
          "--draft-vocab-corpus", "{tmp}/corpus.jsonl"], "corpus.jsonl: line 2 is not valid JSON"),
        (["distill", "--config", "{tmp}/broken.yaml", "--out", "{tmp}/d"], "broken.yaml is not valid YAML \\(expected .* at line 3, column 1\\)"),
    ],
)
def test_bad_input_gives_one_line_errors(model_dir, questions, tmp_path, capsys, arguments, message):
    head_dir = tmp_path / "head"
    main(["head", "init", "--type", "medusa", "--target", str(model_dir), "--out", str(head_dir)])
    capsys.readouterr()
    (tmp_path / "shorthand.yaml").write_text("target: smollm2\n")
    (tmp_path / "corpus.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "cut off\n')
    (tmp_path / "empty-train.yaml").write_text("train:\n  # data_dirs: [runs/data]\n")
    (tmp_path / "broken.yaml").write_text("prompts: a.jsonl\nmode: [generate\n")
    filled = [a.format(head=head_dir, questions=questions, model=model_dir, tmp=tmp_path) for a in arguments]
    assert main(filled) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert error.startswith("koala ")

    assert re.search(message, error), error


def test_prompt_too_long_is_a_clear_cli_error(model_dir, tmp_path, capsys):
    head_dir = tmp_path / "head"
    main(["head", "init", "--type", "eagle", "--target", str(model_dir), "--out", str(head_dir)])
    long_question = tmp_path / "long.jsonl"
    long_question.write_text(json.dumps({"turns": ["x" * 300]}) + "\n")  # the tiny model's context is 256
    assert main(["bench", "--target", str(model_dir), "--drafter", str(head_dir), "--questions",
                 str(long_question), "--no-hf"]) == 2
    assert "context window is 256" in capsys.readouterr().err


def test_core_does_not_import_ray():
    """The core, and the Ray-free training entry (what runs on a machine without Ray or MLflow), import neither."""
    code = (
        "import sys, pipeline.config, pipeline.target, pipeline.heads, pipeline.decoding, pipeline.metrics, "
        "pipeline.bench, pipeline.vocab, pipeline.cli, pipeline.training, pipeline.discriminator, pipeline.losses, "
        "pipeline.stages.train; print('ray' in sys.modules, 'mlflow' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False"


def test_stage_config_from_yaml_flags_and_set_overrides(tmp_path):
    from pipeline.cli import _stage_values, build_parser
    from pipeline.config import TrainConfig

    config_file = tmp_path / "train.yaml"
    config_file.write_text("data_dirs: [a]\nadv_weight: 0.3\nhead:\n  head_type: medusa\n  num_layers: 2\n")
    args = build_parser().parse_args(["train", "--config", str(config_file), "--num-layers", "3",
                                      "--set", "target.dtype=float32", "--set", "adv_weight=0.05",
                                      "--set", "head_lr=1e-3"])
    flags = {"num_layers": "head.num_layers"}
    config = TrainConfig.from_dict(_stage_values(args, flags))
    assert (config.head.head_type, config.head.num_layers) == ("medusa", 3)
    assert config.adv_weight == 0.05 and config.target.dtype == "float32"
    assert config.head_lr == 0.001  # YAML reads "1e-3" as a string; float fields accept it
    bad = build_parser().parse_args(["train", "--config", str(config_file), "--set", "head.num_layers=0"])
    with pytest.raises(Exception, match="head.num_layers: must be >= 1"):
        TrainConfig.from_dict(_stage_values(bad, flags))
