"""Tensor- and pipeline-parallel executor on one machine: rank 0 in the engine-core process,
ranks 1..N-1 in worker processes it spawns (`--distributed-executor-backend mp`, the default for
N > 1). With pipeline stages, rank 0 is the first stage and the last stage's first rank sends the
step's sampled tokens back to it.

Every rank builds its shard of the model (`Worker(config, rank)`) and joins a gloo process group
on 127.0.0.1; each step the driver sends the plan down a pipe to every worker and then runs it
itself; the ranks meet in the layers' collectives, and only the driver's sampled tokens go back
to the scheduler (the workers' samplers see the same logits; their tokens are dropped). The CPU's
threads are divided between the ranks.

Workers are fresh interpreters (`python -m pagoda.executor.multiproc`), not forks: the driver has
already run torch (a forked OpenMP pool hangs) and a multiprocessing "spawn" would re-import the
user's main script. Each connects back to the driver over an authenticated loopback connection
(multiprocessing.connection); each step's plan travels msgpack-encoded (msgspec: the plan's
dataclasses as they are, the grammar bitmask as raw bytes), not pickled. A worker that fails or dies makes the next
step raise (its connection closes, or the collective errors) instead of hanging: the engine core
then fails loudly. Workers exit when the driver's end of their connection closes, so nothing
outlives the engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import msgspec
import numpy as np
import torch

from pagoda.config import EngineConfig
from pagoda.distributed.parallel_state import destroy_parallel, init_parallel
from pagoda.engine.plan import ModelRunnerOutput, SchedulerOutput
from pagoda.worker.worker import Worker

logger = logging.getLogger(__name__)

# How long the workers get to load their shard and answer.
_READY_TIMEOUT_S = 600.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _encode_tensor(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        array = obj.contiguous().numpy()
        return {"dtype": str(array.dtype), "shape": list(array.shape), "data": array.tobytes()}
    raise NotImplementedError(f"cannot send a {type(obj).__name__} in a plan")


_PLAN_ENCODER = msgspec.msgpack.Encoder(enc_hook=_encode_tensor)
_PLAN_DECODER = msgspec.msgpack.Decoder(SchedulerOutput)


_OUTPUT_ENCODER = msgspec.msgpack.Encoder()
_OUTPUT_DECODER = msgspec.msgpack.Decoder(ModelRunnerOutput)


def _result_rank(config: EngineConfig) -> int:
    """The rank whose sampled tokens are the step's: the last stage's first rank."""
    return (config.pipeline_parallel_size - 1) * config.tensor_parallel_size


def decode_plan(payload: bytes) -> SchedulerOutput:
    """A plan from `_PLAN_ENCODER`, its grammar bitmask a tensor again."""
    plan = _PLAN_DECODER.decode(payload)
    mask = plan.grammar_bitmask
    if isinstance(mask, dict):
        array = np.frombuffer(mask["data"], dtype=mask["dtype"]).reshape(mask["shape"])
        plan.grammar_bitmask = torch.from_numpy(array.copy())
    return plan


def threads_per_rank(tp_size: int) -> int:
    """The CPU threads each rank runs (the process's torch threads split evenly, at least 1)."""
    return max(1, torch.get_num_threads() // tp_size)


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker process failed or exited."""


def _worker_main(address: tuple[str, int], authkey: bytes) -> None:
    """A worker process: connect to the driver, take its orders until told to stop."""
    conn = Client(address, authkey=authkey)
    config, rank, init_method, threads = conn.recv()
    torch.set_num_threads(threads)
    try:
        init_parallel(rank, config.tensor_parallel_size, config.pipeline_parallel_size, init_method)
        # The first rank of the last stage sends each step's sampled tokens to the driver.
        reports = config.pipeline_parallel_size > 1 and rank == _result_rank(config)
        worker = Worker(config, rank)
        worker.load_model()
        conn.send(("ready", os.getpid()))
        while True:
            try:
                op, arg = conn.recv()
            except EOFError:  # the driver is gone
                return
            if op == "execute_model":
                output = worker.execute_model(decode_plan(arg))
                if reports:
                    conn.send_bytes(_OUTPUT_ENCODER.encode(output))
            elif op == "determine_num_blocks":
                conn.send(("ok", worker.determine_num_blocks()))
            elif op == "initialize_kv_cache":
                worker.initialize_kv_cache(arg)
                conn.send(("ok", None))
            elif op == "shutdown":
                return
    except BaseException as exc:  # noqa: BLE001 - reported to the driver, then the process ends
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        destroy_parallel()


class MultiprocExecutor:
    """Drives `config.world_size` ranks (tensor x pipeline parallel): this process is rank 0."""

    def __init__(self, config: EngineConfig) -> None:
        size = config.world_size
        self.config = config
        self._result_rank = _result_rank(config) if config.pipeline_parallel_size > 1 else 0
        if config.device_config.device.type != "cpu":
            raise ValueError(
                "tensor_parallel_size > 1 runs on CPU (gloo) for now; on CUDA it needs NCCL, "
                "which Pagoda does not set up yet"
            )
        start = time.perf_counter()
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        threads = threads_per_rank(size)
        authkey = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        self._conns: list[Connection] = []
        self._processes: list[subprocess.Popen[bytes]] = []
        env = {**os.environ, "PAGODA_TP_AUTHKEY": authkey.hex()}
        try:
            for _ in range(1, size):
                self._processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "pagoda.executor.multiproc",
                            *map(str, listener.address),
                        ],
                        env=env,
                    )
                )
            for rank in range(1, size):
                # Connections arrive in any order; each is told its rank.
                conn = listener.accept()
                conn.send((config, rank, init_method, threads))
                self._conns.append(conn)
        finally:
            listener.close()
        try:
            torch.set_num_threads(threads)
            init_parallel(
                0, config.tensor_parallel_size, config.pipeline_parallel_size, init_method
            )
            self.worker = Worker(config, 0)
            self.worker.load_model()
            for rank, conn in enumerate(self._conns, start=1):
                self._expect(rank, conn, "ready", _READY_TIMEOUT_S)
        except BaseException:
            for process in self._processes:
                process.kill()
            self.shutdown()
            raise
        logger.info(
            "Tensor parallelism: %d ranks (gloo on 127.0.0.1, %d threads each) ready in %.2f s",
            size,
            threads,
            time.perf_counter() - start,
        )

    def _expect(self, rank: int, conn: Connection, kind: str, timeout: float | None) -> Any:
        if timeout is not None and not conn.poll(timeout):
            raise WorkerFailedError(f"tensor-parallel rank {rank} did not answer in {timeout} s")
        try:
            status, value = conn.recv()
        except EOFError as exc:
            raise WorkerFailedError(f"tensor-parallel rank {rank} exited") from exc
        if status == "error":
            raise WorkerFailedError(f"tensor-parallel rank {rank} failed: {value}")
        if status != kind and kind != "ok":
            raise WorkerFailedError(f"tensor-parallel rank {rank} answered {status!r}")
        return value

    def _broadcast(self, op: str, arg: Any = None) -> None:
        for rank, conn in enumerate(self._conns, start=1):
            try:
                conn.send((op, arg))
            except (BrokenPipeError, OSError) as exc:
                raise WorkerFailedError(f"tensor-parallel rank {rank} exited") from exc

    def determine_num_blocks(self) -> int:
        self._broadcast("determine_num_blocks")
        blocks = [self.worker.determine_num_blocks()]
        blocks += [self._expect(r, c, "ok", None) for r, c in enumerate(self._conns, start=1)]
        # Every rank holds the same block ids: as many as the tightest rank can.
        return min(blocks)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._broadcast("initialize_kv_cache", num_blocks)
        self.worker.initialize_kv_cache(num_blocks)
        for rank, conn in enumerate(self._conns, start=1):
            self._expect(rank, conn, "ok", None)

    @property
    def max_concurrent_batches(self) -> int:
        """How many steps may be in flight at once: one per pipeline stage (while the last
        stage computes one step, the first computes the next), else one."""
        return self.config.pipeline_parallel_size

    def execute_model(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        return self.wait_model(self.submit_model(plan))

    def submit_model(self, plan: SchedulerOutput) -> ModelRunnerOutput | None:
        """Start a step: every rank gets the plan and this one computes its part (with pipeline
        stages, the first stage's, whose activations go on to the next stage). Returns the
        output when this rank sampled, else None: `wait_model` then reads it from the last
        stage. Steps complete in the order they were submitted (every channel is FIFO)."""
        for process in self._processes:
            if process.poll() is not None:
                raise WorkerFailedError(
                    f"a tensor-parallel worker (pid {process.pid}) exited with code "
                    f"{process.returncode}"
                )
        self._broadcast("execute_model", _PLAN_ENCODER.encode(plan))
        output = self.worker.execute_model(plan)
        return output if self._result_rank == 0 else None

    def wait_model(self, submitted: ModelRunnerOutput | None) -> ModelRunnerOutput:
        """The output of the oldest step submitted and not yet waited for."""
        if submitted is not None:
            return submitted
        # Pipeline parallelism: the last stage sampled.
        conn = self._conns[self._result_rank - 1]
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError) as exc:
            raise WorkerFailedError(f"parallel rank {self._result_rank} exited") from exc
        return _OUTPUT_DECODER.decode(payload)

    def shutdown(self) -> None:
        """Stop the workers and leave the group (idempotent)."""
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(("shutdown", None))
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        for conn in self._conns:
            conn.close()
        self._conns, self._processes = [], []
        destroy_parallel()


if __name__ == "__main__":
    _worker_main((sys.argv[1], int(sys.argv[2])), bytes.fromhex(os.environ["PAGODA_TP_AUTHKEY"]))
