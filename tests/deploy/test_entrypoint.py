"""`deploy/entrypoint.sh` run directly: the exact `pagoda serve` argv each environment produces
(dry-run mode), what the exec'd process really receives (a stand-in `pagoda` on PATH), and a real
server started from PORT and MODEL_NAME that stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.deploy.conftest import (
    ENTRYPOINT,
    HEALTHCHECK,
    base_env,
    log_tail,
    server_env,
    start_logged,
    stop,
    wait_healthy,
)
from tests.server import free_port

DEFAULT_ARGV = ["pagoda", "serve", "--host", "0.0.0.0", "--port", "8000"]


def dry_run(env: Mapping[str, str], *args: str) -> list[str]:
    """The argv the entrypoint would exec, read from its NUL-separated dry run."""
    result = subprocess.run(
        [str(ENTRYPOINT), *args],
        env=base_env({**env, "PAGODA_ENTRYPOINT_DRY_RUN": "nul"}),
        capture_output=True,
        check=True,
    )
    output = result.stdout.decode()
    assert output.endswith("\0"), output
    return output[:-1].split("\0")


def test_no_variables_serve_the_default_model_on_every_interface_port_8000() -> None:
    assert dry_run({}) == DEFAULT_ARGV


def test_every_variable_becomes_its_flag_in_order() -> None:
    env = {
        "MODEL_NAME": "org/model",
        "PORT": "9001",
        "HOST": "127.0.0.1",
        "REVISION": "v2",
        "API_KEY": "sk-test",
        "CHAT_TEMPLATE": "/templates/chatml.jinja",
        "TENSOR_PARALLEL_SIZE": "1",
        "MAX_MODEL_LEN": "4096",
        "DTYPE": "bfloat16",
        "GPU_MEMORY_UTILIZATION": "0.85",
        "EXTRA_ARGS": "--max-num-seqs 8",
    }
    assert dry_run(env) == [
        "pagoda", "serve", "org/model",
        "--host", "127.0.0.1",
        "--port", "9001",
        "--revision", "v2",
        "--api-key", "sk-test",
        "--chat-template", "/templates/chatml.jinja",
        "--tensor-parallel-size", "1",
        "--max-model-len", "4096",
        "--dtype", "bfloat16",
        "--gpu-memory-utilization", "0.85",
        "--max-num-seqs", "8",
    ]  # fmt: skip


@pytest.mark.parametrize("blank", ["", "   ", "\n"])
def test_empty_or_blank_variables_add_no_flag(blank: str) -> None:
    names = [
        "MODEL_NAME", "PORT", "HOST", "REVISION", "API_KEY", "VLLM_API_KEY", "CHAT_TEMPLATE",
        "TENSOR_PARALLEL_SIZE", "MAX_MODEL_LEN", "DTYPE", "GPU_MEMORY_UTILIZATION", "EXTRA_ARGS",
        "HF_TOKEN", "HF_HOME",
    ]  # fmt: skip
    assert dry_run(dict.fromkeys(names, blank)) == DEFAULT_ARGV


def test_api_key_wins_over_vllm_api_key() -> None:
    argv = dry_run({"API_KEY": "sk-seed", "VLLM_API_KEY": "sk-vllm"})
    assert argv == [*DEFAULT_ARGV, "--api-key", "sk-seed"]


def test_vllm_api_key_is_used_when_api_key_is_unset_or_empty() -> None:
    expected = [*DEFAULT_ARGV, "--api-key", "sk-vllm"]
    assert dry_run({"VLLM_API_KEY": "sk-vllm"}) == expected
    assert dry_run({"API_KEY": "", "VLLM_API_KEY": "sk-vllm"}) == expected


def test_pagoda_flag_variables_rank_above_the_short_names_as_in_pagoda_serve() -> None:
    env = {
        "PAGODA_PORT": "9100",
        "PORT": "9200",
        "PAGODA_API_KEY": "sk-pagoda",
        "API_KEY": "sk-seed",
        "PAGODA_MODEL": "org/a",
        "MODEL_NAME": "org/b",
    }
    argv = dry_run(env)
    assert argv == [
        "pagoda", "serve", "org/a", "--host", "0.0.0.0", "--port", "9100", "--api-key", "sk-pagoda"
    ]  # fmt: skip


def test_values_are_trimmed_but_an_inline_chat_template_is_kept_verbatim() -> None:
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}\n"
    argv = dry_run({"API_KEY": "sk-from-a-file\n", "PORT": " 8080 ", "CHAT_TEMPLATE": template})
    assert argv == [
        "pagoda", "serve", "--host", "0.0.0.0", "--port", "8080",
        "--api-key", "sk-from-a-file",
        "--chat-template", template,
    ]  # fmt: skip


def test_extra_args_split_on_any_whitespace_without_glob_expansion(tmp_path: Path) -> None:
    (tmp_path / "match-me").touch()  # a glob expanded in the cwd would pick this up
    result = subprocess.run(
        [str(ENTRYPOINT)],
        env=base_env(
            {
                "PAGODA_ENTRYPOINT_DRY_RUN": "nul",
                "EXTRA_ARGS": "  --max-num-seqs\t16\n--served-model-name a b  *  ",
            }
        ),
        cwd=tmp_path,
        capture_output=True,
        check=True,
    )
    argv = result.stdout.decode()[:-1].split("\0")
    assert argv == [*DEFAULT_ARGV, "--max-num-seqs", "16", "--served-model-name", "a", "b", "*"]


def test_arguments_given_to_the_entrypoint_come_last_so_they_win() -> None:
    argv = dry_run({"PORT": "9000", "EXTRA_ARGS": "--seed 1"}, "--seed", "2", "--port", "9001")
    assert argv == [
        "pagoda", "serve", "--host", "0.0.0.0", "--port", "9000",
        "--seed", "1", "--seed", "2", "--port", "9001",
    ]  # fmt: skip


def test_dry_run_one_argument_per_line() -> None:
    result = subprocess.run(
        [str(ENTRYPOINT)],
        env=base_env({"PAGODA_ENTRYPOINT_DRY_RUN": "1", "MODEL_NAME": "org/model"}),
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.splitlines() == ["pagoda", "serve", "org/model", *DEFAULT_ARGV[2:]]


def test_unknown_dry_run_value_exits_2_naming_the_variable() -> None:
    result = subprocess.run(
        [str(ENTRYPOINT)],
        env=base_env({"PAGODA_ENTRYPOINT_DRY_RUN": "maybe"}),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "PAGODA_ENTRYPOINT_DRY_RUN" in result.stderr and "'maybe'" in result.stderr


# The exec'd process, seen from inside: a stand-in `pagoda` first on PATH records what it got.

FAKE_PAGODA = """#!PYTHON
import json, os, sys
with open(os.environ["RECORD_PATH"], "w") as f:
    json.dump({"pid": os.getpid(), "argv": sys.argv[1:], "env": dict(os.environ)}, f)
"""


@dataclass(slots=True)
class Exec:
    pid: int  # of the process the test started
    exec_pid: int  # of the process that ran `pagoda`
    returncode: int
    stderr: str
    argv: list[str]
    env: dict[str, str]


def exec_with_fake_pagoda(tmp_path: Path, env: Mapping[str, str]) -> Exec:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "pagoda"
    fake.write_text(FAKE_PAGODA.replace("PYTHON", sys.executable, 1))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "record.json"
    process = subprocess.Popen(
        [str(ENTRYPOINT)],
        env=base_env({**env, "RECORD_PATH": str(record)}, path_first=bin_dir),
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = process.communicate(timeout=60)
    data = json.loads(record.read_text())
    return Exec(process.pid, data["pid"], process.returncode, stderr, data["argv"], data["env"])


def test_exec_replaces_the_shell_with_the_server_command(tmp_path: Path) -> None:
    result = exec_with_fake_pagoda(tmp_path, {"MODEL_NAME": "org/model", "PORT": "9000"})
    assert result.returncode == 0
    # Same pid: the shell exec'd the server, so the runtime's SIGTERM reaches it directly.
    assert result.exec_pid == result.pid
    assert result.argv == [
        "serve", "org/model", "--host", "0.0.0.0", "--port", "9000"
    ]  # fmt: skip


def test_hf_token_and_hf_home_are_exported_trimmed_and_removed_when_empty(tmp_path: Path) -> None:
    set_both = exec_with_fake_pagoda(tmp_path / "a", {"HF_TOKEN": "hf_abc\n", "HF_HOME": "/models"})
    assert set_both.env["HF_TOKEN"] == "hf_abc" and set_both.env["HF_HOME"] == "/models"
    assert "--hf-token" not in set_both.argv and set_both.argv == ["serve", *DEFAULT_ARGV[2:]]
    empty = exec_with_fake_pagoda(tmp_path / "b", {"HF_TOKEN": "", "HF_HOME": " "})
    assert "HF_TOKEN" not in empty.env and "HF_HOME" not in empty.env


def test_the_logged_command_hides_the_api_key(tmp_path: Path) -> None:
    result = exec_with_fake_pagoda(tmp_path, {"API_KEY": "sk-very-secret"})
    assert "sk-very-secret" in result.argv
    assert "sk-very-secret" not in result.stderr
    assert "pagoda-entrypoint: exec pagoda serve --host 0.0.0.0 --port 8000 --api-key <hidden>" in (
        result.stderr
    )


# A real server, started the way the container starts it.

API_KEY = "sk-entrypoint-test"


@dataclass(slots=True)
class LiveServer:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    log_path: Path


@pytest.fixture(scope="module")
def live_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("entrypoint") / "server.log"
    env = server_env(
        {"PORT": str(port), "HOST": "127.0.0.1", "MODEL_NAME": str(tiny_model), "API_KEY": API_KEY}
    )
    process = start_logged([str(ENTRYPOINT)], env, log_path)
    server = LiveServer(process, f"http://127.0.0.1:{port}", port, log_path)
    try:
        wait_healthy(server.url, process, log_path)
        yield server
    finally:
        stop(process)


def test_serves_model_name_on_port_with_the_api_key(
    live_server: LiveServer, tiny_model: Path
) -> None:
    assert httpx.get(f"{live_server.url}/v1/models").status_code == 401
    response = httpx.get(
        f"{live_server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert response.status_code == 200
    assert [model["id"] for model in response.json()["data"]] == [str(tiny_model)]


def test_the_server_is_the_process_the_runtime_started(live_server: LiveServer) -> None:
    # exec: the pid the runtime signals is the Python server itself, not a shell around it.
    cmdline = Path(f"/proc/{live_server.process.pid}/cmdline").read_bytes().split(b"\0")
    assert b"serve" in cmdline and not any(b"entrypoint.sh" in arg for arg in cmdline)


def test_healthcheck_script_passes_against_the_server_on_port(live_server: LiveServer) -> None:
    env = base_env({"PORT": str(live_server.port)})
    result = subprocess.run([str(HEALTHCHECK)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_healthcheck_script_fails_when_nothing_listens() -> None:
    env = base_env({"PORT": str(free_port())})
    result = subprocess.run([str(HEALTHCHECK)], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "pagoda-healthcheck: http://127.0.0.1:" in result.stderr


def test_sigterm_stops_the_server_with_exit_0(live_server: LiveServer) -> None:
    # Last in the module: it ends the shared server.
    assert stop(live_server.process) == 0, log_tail(live_server.log_path)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{live_server.url}/health", timeout=2)
    # The whole run's log, entrypoint and server: the key never appears in it.
    log = live_server.log_path.read_text(errors="replace")
    assert "--api-key <hidden>" in log and API_KEY not in log
