"""The engine core in its own process, fed over two pipes with msgpack frames (never pickle).

The server (`pagoda serve`, through `AsyncLLM`) forks the engine core once its configuration is
built: the child inherits the imported modules (no second `import torch`) and loads the model on
one core while the server loads the tokenizer and builds the app on the other. Afterwards the step
loop has a process and a GIL of its own: HTTP, tokenization and detokenization never stall it, and
it never stalls them. Nothing has started OpenMP or tokenizer threads before the fork.

Wire format: each frame is a 4-byte little-endian length and a msgpack-encoded tagged struct of
`pagoda.engine.messages`. The server sends the `ToCore` messages, which a reader thread in the child
puts, as decoded, on the queue the busy loop takes commands from (the in-thread engine core reads
the very same structs). The core answers `CoreReady` once it has loaded, then a `CoreStep` per
step that produced outputs (and one after aborts that left it idle, so gauges update), and
`CoreFailed` before it exits on an error. End of file on either pipe means the other side is gone:
the core exits when the server dies, however it died. This module holds only the process and pipe
mechanics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import struct
import threading
import time
from typing import TYPE_CHECKING, BinaryIO

import msgspec

from pagoda.engine.messages import (
    CoreFailed,
    CoreReady,
    CoreStep,
    FromCore,
    StopCore,
    ToCore,
)

if TYPE_CHECKING:
    from pagoda.config import EngineConfig

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("<I")


class EngineDeadError(RuntimeError):
    """The engine core failed; no request can make progress."""


def _write_frame(stream: BinaryIO, payload: bytes) -> None:
    stream.write(_LENGTH.pack(len(payload)) + payload)
    stream.flush()


def _read_frame(stream: BinaryIO) -> bytes | None:
    """The next frame's payload, or None at end of file."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        return None
    return payload


class CoreProcess:
    """The server's handle on the engine-core child process."""

    def __init__(self, config: EngineConfig, threads: int | None = None) -> None:
        """Fork the engine core for `config`; returns at once (`wait_ready` waits for the model).
        `threads`: the child's torch threads (default: torch's, one per core).

        Call it before this process starts threads or runs torch operations: a forked child gets
        only the calling thread, and OpenMP's pool must first start in the child.
        """
        to_child_read, to_child_write = os.pipe()
        from_child_read, from_child_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the server's code
            status = 1
            try:
                os.close(to_child_write)
                os.close(from_child_read)
                # Ctrl-C reaches the whole process group; the server stops the core itself.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                # Never closed here: the input thread may be blocked reading (closing a buffered
                # file under a blocked reader waits for it forever); os._exit closes both.
                commands_in = os.fdopen(to_child_read, "rb")
                outputs = os.fdopen(from_child_write, "wb")
                status = run_core(config, commands_in, outputs, threads)
            except BaseException:  # noqa: BLE001 - reported, then the child exits
                logger.exception("Engine core process failed")
            finally:
                logging.shutdown()
                os._exit(status)
        os.close(to_child_read)
        os.close(from_child_write)
        self._pid = pid
        self._exit_status: int | None = None
        self._to_child = os.fdopen(to_child_write, "wb")
        self._from_child = os.fdopen(from_child_read, "rb")
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(FromCore)
        self._send_lock = threading.Lock()
        logger.info("Engine core process started (pid %d)", pid)

    def _poll(self) -> int | None:
        """The child's exit status once it has exited (reaped here), else None."""
        if self._exit_status is None:
            try:
                pid, status = os.waitpid(self._pid, os.WNOHANG)
            except ChildProcessError:
                return -1
            if pid != 0:
                self._exit_status = os.waitstatus_to_exitcode(status)
        return self._exit_status

    def send(self, message: ToCore) -> None:
        """Send one message; raises EngineDeadError if the child is gone."""
        payload = self._encoder.encode(message)
        try:
            with self._send_lock:
                _write_frame(self._to_child, payload)
        except (BrokenPipeError, ValueError, OSError) as exc:
            raise EngineDeadError("the engine core process is gone") from exc

    def receive(self) -> CoreReady | CoreStep:
        """The child's next message (blocking); raises EngineDeadError if it failed or exited."""
        payload = _read_frame(self._from_child)
        if payload is None:
            code = self._poll()
            raise EngineDeadError(
                "the engine core process exited"
                + (f" with status {code}" if code is not None else "")
            )
        message = self._decoder.decode(payload)
        if isinstance(message, CoreFailed):
            raise EngineDeadError(f"engine core failed: {message.message}")
        return message

    def wait_ready(self) -> int:
        """Block until the child has loaded the model; returns its number of KV cache blocks."""
        message = self.receive()
        if not isinstance(message, CoreReady):
            raise EngineDeadError(
                f"expected the core's ready message, got {type(message).__name__}"
            )
        return message.num_blocks

    def is_alive(self) -> bool:
        return self._poll() is None

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the child to stop, wait `timeout` seconds, then kill it (idempotent)."""
        if self._poll() is None:
            with contextlib.suppress(EngineDeadError):
                self.send(StopCore())
            deadline = time.monotonic() + timeout
            while self._poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if self._poll() is None:
                logger.warning("engine core process did not stop in %.0f s; killing it", timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self._pid, 0)
                self._exit_status = -signal.SIGKILL
        # The output pipe is left to the receiving thread, which may still be blocked reading it.
        with contextlib.suppress(OSError):
            self._to_child.close()


def _read_commands(stream: BinaryIO, commands: queue.Queue[ToCore]) -> None:
    """Child side: put the server's messages on the busy loop's queue as decoded; end of file
    (the server is gone) stops the loop too."""
    decoder = msgspec.msgpack.Decoder(ToCore)
    try:
        while (payload := _read_frame(stream)) is not None:
            message = decoder.decode(payload)
            if isinstance(message, StopCore):
                break
            commands.put(message)
    finally:
        commands.put(StopCore())


def run_core(
    config: EngineConfig, commands_in: BinaryIO, outputs: BinaryIO, threads: int | None = None
) -> int:
    """Child side: load the engine core, then step until told to stop. Returns the exit status."""
    import gc

    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    encoder = msgspec.msgpack.Encoder()

    def send(message: FromCore) -> None:
        _write_frame(outputs, encoder.encode(message))

    commands: queue.Queue[ToCore] = queue.Queue()
    try:
        from pagoda.engine.core import EngineCore

        core = EngineCore(config)
    except Exception as exc:
        logger.exception("Engine core failed to start")
        send(CoreFailed(message=f"{type(exc).__name__}: {exc}"))
        return 1
    gc.collect()
    gc.freeze()
    send(CoreReady(num_blocks=core.num_blocks))
    threading.Thread(
        target=_read_commands, args=(commands_in, commands), name="pagoda-core-input", daemon=True
    ).start()
    try:
        core.run_busy_loop(commands, lambda step, stats: send(CoreStep(outputs=step, stats=stats)))
        return 0
    except BrokenPipeError:
        return 0  # the server is gone
    except Exception as exc:
        logger.exception("Engine core failed")
        with contextlib.suppress(OSError):
            send(CoreFailed(message=f"{type(exc).__name__}: {exc}"))
        return 1
    finally:
        core.shutdown()
