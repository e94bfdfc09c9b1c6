"""Every command in the README runs as written after the main command: it parses with its program's own argument
parser, the repository files it names exist, and every path under runs/ (or a config file of the user's) it reads
is made by the main command or by a README command before it."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# What the main command (`bash scripts/main.sh`: the cpu-demo pipeline) leaves under runs/.
MADE_BY_MAIN_COMMAND = ("runs/mlflow.db", "runs/data", "runs/sweeps", "runs/pipelines")
# Options whose value a command writes (a path under runs/ or a file) rather than reads.
OUTPUT_OPTIONS = {"--out", "--json"}


def readme_commands() -> list[tuple[int, list[str]]]:
    """(line number, argv) of every command in the README's bash blocks: continuation lines joined, comments
    dropped, a quoted argument over several lines kept whole, a here-document's body skipped (its command
    writes a file)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
        first_line = text[: block.start()].count("\n") + 2
        lines = re.sub(r"\\\n\s*", " ", block.group(1)).splitlines()
        index = 0
        while index < len(lines):
            start, pending = index, lines[index]
            index += 1
            heredoc = re.search(r"<<\s*'?(\w+)'?", pending)
            while True:
                try:
                    argv = shlex.split(pending, comments=True)
                    break
                except ValueError:  # an open quote: the argument goes on on the next line
                    pending += "\n" + lines[index]
                    index += 1
            if heredoc:
                while lines[index].strip() != heredoc.group(1):
                    index += 1
                index += 1
            if argv:
                commands.append((first_line + start, argv))
    return commands


COMMANDS = readme_commands()


def _written_by(argv: list[str]) -> list[str]:
    written = [value for option, value in zip(argv, argv[1:]) if option in OUTPUT_OPTIONS]
    if argv[:1] == ["cp"]:
        written.append(argv[-1])
    if ">" in argv:  # a shell redirect: cat > FILE <<'EOF', printf ... > FILE
        written.append(argv[argv.index(">") + 1])
    return written


def _is_made(path: str, made: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in made)


def _read_paths(argv: list[str]) -> list[str]:
    """Arguments that name a local file or directory the command reads."""
    paths = []
    for previous, value in zip(["", *argv], argv):
        if previous in OUTPUT_OPTIONS or "://" in value or value.startswith(("models:/", "-", "{")):
            continue
        if re.fullmatch(r"[\w./~-]+\.(ya?ml|json|jsonl|py|gguf|db)|(runs|\.\./shared|pipeline|benchmarks|jobs|serve|"
                        r"scripts)/[\w./@=,-]*", value):
            paths.append(value.split("@")[0].split("=")[-1])
    return paths


def test_the_readme_has_the_commands_this_test_checks():
    programs = {argv[0] for _, argv in COMMANDS}
    assert {"koala", "python", "bash", "ray", "serve", "curl"} <= programs, programs
    assert len(COMMANDS) > 25


def test_every_command_reads_only_what_exists_or_what_an_earlier_command_makes():
    made = list(MADE_BY_MAIN_COMMAND)
    missing = []
    for line, argv in COMMANDS:
        for path in [p for p in _read_paths(argv[1:]) if p not in _written_by(argv)]:
            if path.startswith("runs/") or not path.startswith(("../", "pipeline/", "benchmarks/", "jobs/", "serve/",
                                                                 "scripts/")) and "/" not in path:
                if not _is_made(path, made) and not (REPO / path).exists():
                    missing.append(f"README line {line}: {' '.join(argv)[:120]} reads {path}, which nothing makes")
            elif path.startswith("../shared/"):
                if SHARED.parent.joinpath(path.removeprefix("../")).exists() is False and SHARED.is_dir():
                    missing.append(f"README line {line}: {path} is not in ../shared")
            elif not (REPO / path).exists():
                missing.append(f"README line {line}: {path} does not exist in the repository")
        made += _written_by(argv)
    assert not missing, "\n".join(missing)


def _parse_koala(argv: list[str]) -> None:
    from pipeline.cli import build_parser

    build_parser().parse_args(argv[1:])


def _parse_python(argv: list[str]) -> None:
    script = argv[1]
    if script == "jobs/full_pipeline.py":
        from jobs.full_pipeline import build_parser, preset_names

        args = build_parser().parse_args(argv[2:])
        assert args.config in preset_names() or args.config.endswith(".yaml"), args.config
        return
    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.parse_args(argv[2:])


@pytest.mark.parametrize("line,argv", [(line, argv) for line, argv in COMMANDS if argv[0] in ("koala", "python")],
                         ids=lambda value: str(value) if isinstance(value, int) else " ".join(value)[:60])
def test_every_koala_and_python_command_parses(line, argv):
    try:
        (_parse_koala if argv[0] == "koala" else _parse_python)(argv)
    except SystemExit as error:
        pytest.fail(f"README line {line}: `{' '.join(argv)}` does not parse (exit {error.code})")


@pytest.mark.parametrize("preset", ["smoke", "cpu-demo"])
def test_the_presets_the_readme_runs_here_load(preset):
    if not SHARED.is_dir():
        pytest.skip("the CPU presets read prompts from ../shared/data")
    from jobs.full_pipeline import load_pipeline_config

    assert load_pipeline_config(preset).name
