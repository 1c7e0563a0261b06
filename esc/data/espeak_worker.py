"""The eSpeak NG synthesis server: one forked child per utterance, so every utterance is a pure function of its request.

eSpeak NG 1.52 keeps synthesis state in library statics that persist across utterances (its
pitch-flutter phase, among others) and draws the breath noise of several voice variants (``f2``,
``f3``, ``f5``, ``whisper``, ...) from an internal generator seeded from the clock
(``espeak_rand``). Both made the synthetic data sets differ from run to run. This server removes
both sources: it loads and initialises the library once, then for every request forks a child
that seeds the generator (``espeak_ng_SetRandSeed``, and libc's ``srand`` for the Klatt
voices' ``rand()``), synthesises and writes the PCM back, and exits. Every child starts from the
same freshly initialised state, so the bytes depend only on the request, not on what was
synthesised before, in which order, or in which process.

It is a separate, small process (``python -m esc.data.espeak_worker``; it imports neither torch nor
numpy) because ``fork`` costs about 0.4 ms here against 7 ms from a process that holds torch.
Protocol on stdin/stdout, one request at a time: a request is a 4-byte little-endian length and a
UTF-8 JSON object ``{text, voice, rate, pitch, pitch_range, volume, seed}``; the reply is a 1-byte
status (``0`` ok, ``1`` error), a 4-byte length and either int16 PCM at the native rate or a UTF-8
error message. The native rate is sent once at start-up as a 4-byte integer.
"""
from __future__ import annotations

import ctypes
import json
import os
import struct
import sys

# espeak_AUDIO_OUTPUT / espeak_PARAMETER / espeak_POSITION_TYPE values from speak_lib.h
AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_RATE, ESPEAK_VOLUME, ESPEAK_PITCH, ESPEAK_RANGE = 1, 2, 3, 4
POS_CHARACTER = 1
ESPEAK_CHARS_AUTO = 0
ESPEAK_INITIALIZE_DONT_EXIT = 0x8000
EE_OK = 0

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _load():
    """The initialised library, its native rate, and the list that the synth callback fills."""
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = None
    rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(),
                                 ESPEAK_INITIALIZE_DONT_EXIT)
    chunks: list[bytes] = []

    def collect(wav, num_samples, events) -> int:
        if num_samples > 0 and wav:
            chunks.append(ctypes.string_at(wav, 2 * num_samples))
        return 0  # 0 = continue synthesis

    callback = _CALLBACK(collect)
    lib.espeak_SetSynthCallback(callback)
    return lib, rate, chunks, callback


def _synthesize(lib, chunks: list[bytes], request: dict) -> bytes:
    """Int16 PCM of one request, or raise ``RuntimeError`` with the reason (runs in the forked child)."""
    if lib.espeak_SetVoiceByName(request["voice"].encode()) != EE_OK:
        raise RuntimeError(f"eSpeak NG has no voice {request['voice']!r}; pick one of esc.data.espeak.list_voices()")
    for param, key in ((ESPEAK_RATE, "rate"), (ESPEAK_PITCH, "pitch"), (ESPEAK_RANGE, "pitch_range"), (ESPEAK_VOLUME, "volume")):
        if lib.espeak_SetParameter(param, int(request[key]), 0) != EE_OK:
            raise RuntimeError(f"espeak_SetParameter({key}={request[key]}) failed")
    lib.espeak_ng_SetRandSeed(int(request["seed"]))
    ctypes.CDLL(None).srand(int(request["seed"]) & 0xFFFFFFFF)
    buf = ctypes.create_string_buffer(request["text"].encode("utf-8"))
    err = lib.espeak_Synth(buf, len(buf), 0, POS_CHARACTER, 0, ESPEAK_CHARS_AUTO, None, None)
    if err != EE_OK:
        raise RuntimeError(f"espeak_Synth failed with error {err} for text {request['text']!r}, voice {request['voice']!r}")
    lib.espeak_Synchronize()
    return b"".join(chunks)


def _reply(out, status: int, payload: bytes) -> None:
    out.write(struct.pack("<BI", status, len(payload)) + payload)
    out.flush()


def serve(inp, out) -> None:
    """Answer requests from ``inp`` on ``out`` until ``inp`` closes (see the module docstring)."""
    lib, rate, chunks, _callback = _load()
    out.write(struct.pack("<i", rate))
    out.flush()
    if rate <= 0:
        return
    while True:
        try:
            request = _read_exact(inp, struct.unpack("<I", _read_exact(inp, 4))[0])
        except EOFError:
            return
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: synthesise from the pristine state, send (status, payload), exit
            os.close(read_fd)
            try:
                status, payload = 0, _synthesize(lib, chunks, json.loads(request))
            except Exception as exc:  # noqa: BLE001 - every failure is reported to the parent
                status, payload = 1, str(exc).encode()
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(struct.pack("<BI", status, len(payload)) + payload)
            os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            answer = pipe.read()
        os.waitpid(pid, 0)
        if len(answer) < 5:
            _reply(out, 1, b"the synthesis child died without an answer")
        else:
            out.write(answer)
            out.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
