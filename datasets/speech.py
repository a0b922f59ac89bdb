"""Offline speech synthesis with espeak-ng, for the ``avdigits`` spoken-digit audio.

One job: turn a word into a float waveform. The synthesiser is libespeak-ng from the ``espeakng-loader``
wheel (the optional extra ``midasbench[speech]``). espeak-ng is GPL-3, so it is never linked: it is
loaded at run time through ``ctypes`` only, and only when speech is asked for.

Why a helper process. libespeak-ng keeps hidden state between calls that no API call resets: the phase
of its pitch "flutter" and a glottal cycle counter are function-local statics, so the same word with the
same voice, rate and pitch comes out slightly different depending on what was spoken before in the
process (and ``espeak_Terminate``/``espeak_Initialize`` do not reset them). To make every clip a pure
function of its arguments, a small helper process (this file run as a script) loads and initialises the
library once, never speaks itself, and forks a child per request; each child starts from the same pristine
state, renders one clip and exits. A fork of the small helper costs about 3 ms per clip. The helper is
started lazily, once per client process, and exits when its client closes the pipe.

This module imports nothing from the package, so the helper can run it as a plain script.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import threading
from typing import Any

import numpy as np

INSTALL_HINT = "pip install 'midasbench[speech]'"

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit() inside the library
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3
_EE_OK = 0
_EE_NOT_FOUND = 2

_HEADER = struct.Struct("<BI")  # status (0 ok, 1 error), payload length
_CHILD_TIMEOUT_S = 60


class SpeechUnavailableError(RuntimeError):
    """Speech synthesis cannot run here: the optional extra is missing or the library failed to start."""


class SpeechSynthesisError(RuntimeError):
    """espeak-ng refused a request (an unknown voice, for example)."""


def speech_available() -> bool:
    """Whether the optional ``espeakng-loader`` package is installed (no library is loaded)."""
    return importlib.util.find_spec("espeakng_loader") is not None


def synthesize(text: str, *, voice: str = "en", rate: int = 175, pitch: int = 50) -> tuple[np.ndarray, int]:
    """Speak ``text`` and return ``(waveform, sample_rate)``: float32 mono in [-1, 1] at the library rate.

    ``voice`` is an espeak-ng voice name, optionally with a variant (``"en+m3"``, ``"en-us+f2"``);
    ``rate`` is in words per minute (80..450) and ``pitch`` is espeak's 0..100 pitch setting. The result
    depends only on the arguments, not on what was synthesised before.
    """
    if not 80 <= rate <= 450:
        raise ValueError(f"rate must be within 80..450 words per minute, got {rate}")
    if not 0 <= pitch <= 100:
        raise ValueError(f"pitch must be within 0..100, got {pitch}")
    client = _client()
    pcm = client.request({"text": text, "voice": voice, "rate": int(rate), "pitch": int(pitch)})
    wave = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    return wave, client.sample_rate


# --------------------------------------------------------------------------- client side


class _HelperClient:
    """One helper process and the pipe to it; requests are serialised by a lock."""

    def __init__(self) -> None:
        if not speech_available():
            raise SpeechUnavailableError(
                "speech synthesis needs the optional espeak-ng package (GPL-3, loaded at run time, never "
                f"linked): {INSTALL_HINT}"
            )
        self.lock = threading.Lock()
        # -P: do not put this file's folder on sys.path (its sibling modules are not meant as top level)
        self.process = subprocess.Popen(
            [sys.executable, "-P", os.path.abspath(__file__), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            self.sample_rate = struct.unpack("<i", self._read_reply())[0]
        except SpeechSynthesisError as exc:
            self.close()
            raise SpeechUnavailableError(f"espeak-ng failed to start: {exc} ({INSTALL_HINT})") from None

    def request(self, payload: dict[str, Any]) -> bytes:
        with self.lock:
            if self.process.poll() is not None:
                raise SpeechUnavailableError(
                    f"the espeak-ng helper exited with code {self.process.returncode}"
                )
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps(payload).encode() + b"\n")
            self.process.stdin.flush()
            return self._read_reply()

    def _read_reply(self) -> bytes:
        assert self.process.stdout is not None
        header = self.process.stdout.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise SpeechUnavailableError("the espeak-ng helper closed its pipe unexpectedly")
        status, length = _HEADER.unpack(header)
        data = self.process.stdout.read(length)
        if status != 0:
            raise SpeechSynthesisError(data.decode(errors="replace"))
        return data

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


_CLIENT: _HelperClient | None = None
_CLIENT_PID: int | None = None
_CLIENT_LOCK = threading.Lock()


def _client() -> _HelperClient:
    """The helper of this process, started on first use (a forked client starts its own)."""
    global _CLIENT, _CLIENT_PID
    with _CLIENT_LOCK:
        if _CLIENT is None or os.getpid() != _CLIENT_PID:
            _CLIENT = _HelperClient()
            _CLIENT_PID = os.getpid()
        return _CLIENT


@atexit.register
def _close_client() -> None:
    if _CLIENT is not None and os.getpid() == _CLIENT_PID:
        _CLIENT.close()


# --------------------------------------------------------------------------- helper side (own process)

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Engine:
    """libespeak-ng loaded through ctypes and initialised for synchronous (callback) output."""

    def __init__(self) -> None:
        import espeakng_loader  # the optional extra; imported only in the helper process

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None

        data_path = espeakng_loader.get_data_path().encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {rate}) with data path {data_path!r}")
        self.lib = lib
        self.sample_rate = rate
        self.chunks: list[bytes] = []
        self.callback = _CALLBACK(self._collect)  # keep a reference: the library holds the pointer
        lib.espeak_SetSynthCallback(self.callback)
        # load the English dictionary now, so that each forked child only switches the variant
        lib.espeak_SetVoiceByName(b"en")

    def _collect(self, wav: Any, num_samples: int, events: Any) -> int:
        if wav and num_samples > 0:
            self.chunks.append(ctypes.string_at(wav, 2 * num_samples))
        return 0  # 0 = continue

    def render(self, text: str, voice: str, rate: int, pitch: int) -> bytes:
        """int16 little-endian PCM of one utterance; meant to run in a fresh fork of the helper."""
        self.chunks = []
        self.lib.espeak_ng_SetRandSeed(0)  # breath noise of some variants
        status = self.lib.espeak_SetVoiceByName(voice.encode())
        if status == _EE_NOT_FOUND:
            raise SpeechSynthesisError(f"unknown espeak-ng voice {voice!r}")
        if status != _EE_OK:
            raise SpeechSynthesisError(f"espeak_SetVoiceByName({voice!r}) failed with code {status}")
        self.lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
        encoded = text.encode() + b"\0"
        status = self.lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != _EE_OK:
            raise SpeechSynthesisError(f"espeak_Synth({text!r}) failed with code {status}")
        return b"".join(self.chunks)


def _write_reply(fd: int, status: int, payload: bytes) -> None:
    data = _HEADER.pack(status, len(payload)) + payload
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 16):
        parts.append(chunk)
    return b"".join(parts)


def _render_isolated(engine: _Engine, request: dict[str, Any]) -> tuple[int, bytes]:
    """Render one request in a forked child so that the helper's library state is never changed."""
    if not hasattr(os, "fork"):  # no fork (Windows): same results only for the same call history
        try:
            return 0, engine.render(request["text"], request["voice"], request["rate"], request["pitch"])
        except Exception as exc:
            return 1, str(exc).encode()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: render, write status byte + payload, exit without Python cleanup
        code = 0
        try:
            os.close(read_fd)
            signal.alarm(_CHILD_TIMEOUT_S)
            try:
                out = b"\0" + engine.render(
                    request["text"], request["voice"], request["rate"], request["pitch"]
                )
            except Exception as exc:
                out = b"\1" + str(exc).encode()
            view = memoryview(out)
            while view:
                view = view[os.write(write_fd, view) :]
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        data = _read_all(read_fd)
    finally:
        os.close(read_fd)
    _, wait_status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(wait_status) != 0 or not data:
        return 1, f"the espeak-ng child for {request!r} failed (wait status {wait_status})".encode()
    return data[0], data[1:]


def _serve() -> None:
    """Helper main loop: one JSON request per stdin line, one header + payload reply per request."""
    out = sys.stdout.fileno()
    try:
        engine = _Engine()
    except Exception as exc:
        _write_reply(out, 1, f"{type(exc).__name__}: {exc}".encode())
        return
    _write_reply(out, 0, struct.pack("<i", engine.sample_rate))
    for line in sys.stdin.buffer:
        status, payload = _render_isolated(engine, json.loads(line))
        _write_reply(out, status, payload)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
