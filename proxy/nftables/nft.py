"""Running nft transactions: libnftables in-process (ctypes), or the `nft` command.

libnftables is what `nft` itself is built on; calling it in-process saves a fork/exec and
keeps its ruleset cache between calls (see README.md for the measurements). Debian's
python3-nftables binds the same library, but it lives in the system interpreter's
dist-packages, out of reach of a virtualenv; the five calls needed are bound here.

A call blocks while the kernel commits; ctypes releases the GIL for it, so the data
plane runs it in a worker thread and the event loop keeps serving.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

_SBIN = "/usr/sbin:/sbin:/usr/local/sbin"
INSTALL_HINT = "nft not found: install the nftables package (apt-get install nftables)"


@dataclass(frozen=True, slots=True)
class NftResult:
    rc: int
    out: str
    err: str


class NftError(RuntimeError):
    """nft refused a transaction; the kernel is unchanged (transactions are atomic)."""


def find_nft() -> str | None:
    import os

    return shutil.which("nft", path=os.pathsep.join([os.environ.get("PATH", ""), _SBIN]))


class LibNftables:
    """One libnftables context (not thread-safe: calls are serialised)."""

    def __init__(self, *, json_output: bool = False) -> None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        lib = ctypes.CDLL(name)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise OSError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        if json_output:
            lib.nft_ctx_output_set_flags(self._ctx, 1 << 4)  # NFT_CTX_OUTPUT_JSON
        self._lock = threading.Lock()

    def run(self, text: str) -> NftResult:
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        return NftResult(rc, out.decode(errors="replace"), err.decode(errors="replace"))

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class NftCommand:
    """The `nft` binary, one process per call (`nft -f -`)."""

    def __init__(self, binary: str | None = None) -> None:
        found = binary or find_nft()
        if found is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.binary = found

    def run(self, text: str) -> NftResult:
        p = subprocess.run(
            [self.binary, "-f", "-"], input=text.encode(), capture_output=True, timeout=600
        )
        return NftResult(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode())

    def run_parts(self, parts: Iterable[str]) -> StreamResult:
        """One transaction fed to `nft -f -` part by part as the parts are produced, so
        its text is never held whole. (nft reads all of its input before parsing it: the
        producer's work cannot overlap nft's within one transaction.)"""
        produce = 0.0
        it = iter(parts)
        proc = _Proc(self.binary)
        try:
            while True:
                t0 = time.perf_counter()
                part = next(it, None)
                produce += time.perf_counter() - t0
                if part is None:
                    break
                if not proc.write(part.encode()):
                    break  # nft exited early: its error says why
            return StreamResult(proc.finish(), produce)
        finally:
            proc.kill()


@dataclass(frozen=True, slots=True)
class StreamResult:
    result: NftResult
    produce_seconds: float  # time spent producing the input (rendering)


class _Proc:
    """One `nft -f -` fed piece by piece; errors go to a file, so a long error output
    cannot block it while its input is still being written."""

    def __init__(self, binary: str) -> None:
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 (closed by finish or kill)
        self.p = subprocess.Popen(
            [binary, "-f", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self.err,
        )

    def write(self, data: bytes) -> bool:
        assert self.p.stdin is not None
        try:
            self.p.stdin.write(data)
            return True
        except BrokenPipeError:
            return False

    def close_input(self) -> None:
        if self.p.stdin is not None and not self.p.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.p.stdin.close()

    def finish(self, timeout: float = 600) -> NftResult:
        self.close_input()
        rc = self.p.wait(timeout)
        self.err.seek(0)
        err = self.err.read().decode(errors="replace")
        self.err.close()
        return NftResult(rc, "", err)

    def kill(self) -> None:
        """Nothing left behind on an error path (a no-op once finished)."""
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self.close_input()
        self.err.close()


class Nft:
    """Where each transaction runs: small ones in-process (libnftables: no process start,
    its cache of the table kept between calls), large ones through `nft -f -`. Parsing a
    full ruleset costs nft ~1.8 KB per element (333 MB peak for 10k Services x 10
    endpoints, measured with /usr/bin/time): in a child process that memory is returned
    at its exit instead of raising the daemon's own peak. Either alone works as well."""

    def __init__(self, lib: LibNftables | None, cmd: NftCommand | None) -> None:
        if lib is None and cmd is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.lib = lib
        self.cmd = cmd

    def run(self, text: str) -> NftResult:
        if self.cmd is not None and (self.lib is None or len(text) > LARGE_TRANSACTION):
            return self.cmd.run(text)
        assert self.lib is not None
        return self.lib.run(text)

    def run_parts(self, parts: Iterable[str]) -> StreamResult:
        """A transaction produced in parts (a full sync), streamed into `nft -f -`;
        with libnftables alone, joined and run in one call."""
        if self.cmd is not None:
            return self.cmd.run_parts(parts)
        assert self.lib is not None
        t0 = time.perf_counter()
        text = "".join(parts)
        produce = time.perf_counter() - t0
        return StreamResult(self.lib.run(text), produce)

    def probe(self) -> NftResult:
        """`list tables`, to see that nft works here. In a child when nft is there: nft
        1.0.6 fetches the whole ruleset for it (another mode's leftover chains included,
        ~80 MB at 10k Services in iptables mode), which libnftables would keep cached."""
        runner: NftCommand | LibNftables | None = self.cmd if self.cmd is not None else self.lib
        assert runner is not None
        return runner.run("list tables\n")

    def describe(self) -> str:
        if self.lib is not None and self.cmd is not None:
            return f"libnftables, nft -f for transactions over {LARGE_TRANSACTION // 1024} KB"
        return "libnftables" if self.lib is not None else "nft -f"


LARGE_TRANSACTION = 256 * 1024  # bytes of nft input (about 6,000 elements)


def open_both() -> Nft:
    """libnftables and the nft command, whichever of them is there."""
    try:
        lib: LibNftables | None = LibNftables()
    except OSError:
        lib = None
    try:
        cmd: NftCommand | None = NftCommand()
    except FileNotFoundError:
        cmd = None
    return Nft(lib, cmd)


def open_nft(prefer: str = "auto") -> LibNftables | NftCommand:
    """libnftables when it loads (and `prefer` allows), else the nft command."""
    if prefer in ("auto", "lib"):
        try:
            return LibNftables()
        except OSError:
            if prefer == "lib":
                raise
    return NftCommand()


def first_error(err: str, text: str) -> str:
    """nft's error output → one line: the message and the offending input line."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "Error:" in ln:
            msg = ln.split("Error:", 1)[1].strip()
            where = ln.split("Error:", 1)[0].rstrip(": ")
            src = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{msg} ({where}: {src[:200]})" if where else f"{msg}: {src[:200]}"
    return (lines[0] if lines else "nft failed")[:300]
