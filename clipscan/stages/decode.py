"""Encoded image bytes in, (size, size, 3) uint8 RGB arrays out, or a skip reason that says why not.

Runs in CPU tasks, once per image; every encoder of the job then works on the same
decoded pixels. Converts CMYK, 16-bit, palette, greyscale and alpha images to RGB
(alpha composited on white), uses JPEG ``draft`` to decode large JPEGs at reduced
scale, and refuses images above a pixel limit before decoding them.

A decoder is third-party code that meets hostile files: ``Decode`` runs it in a child
process (``GuardedDecoder``) with an address-space limit and a per-image timeout, so an
exception of any class, a decoder that never returns, or one that asks for more memory
than the limit becomes a skip of that one row with its reason, and the job goes on.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from functools import lru_cache
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from clipscan.config import DataConfig

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MEMORY_MB = 2048
TAR_MEMBER = re.compile(r"^(?P<tar>.+\.tar)#(?P<member>[^#]+)$")


class SkipImage(Exception):
    """An image that cannot be used; ``str(e)`` is the reason recorded in ``skipped.parquet``."""


def _to_rgb(img: Any) -> tuple[Any, str | None]:
    """Return an RGB image and a note naming the conversion (None when it was RGB already)."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB"), f"{mode}->RGB"
    if mode == "P":
        img = img.convert("RGBA")
        mode = "P"
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), f"{mode}->RGB"
    return img.convert("RGB"), f"{mode}->RGB"


def _unsupported(img: Any, error: BaseException) -> str | None:
    """The reason when a file Pillow identified has no usable loader here, else None.

    Stub formats (WMF, GRIB, BUFR, HDF5) need a handler nobody installed; EPS needs
    Ghostscript; some codecs are built without (``decoder jpeg2k not available``); a plugin
    that meets a variant it does not implement raises ``NotImplementedError``.
    """
    from PIL import ImageFile

    fmt = getattr(img, "format", None) or "this"
    text = str(error)
    if isinstance(error, NotImplementedError):
        return f"unsupported format: a variant the decoder does not implement ({text})"
    if isinstance(img, ImageFile.StubImageFile) and getattr(img, "_handler", None) is None:
        return f"unsupported format: {fmt} files need a loader that is not installed"
    if "Ghostscript" in text:
        return f"unsupported format: {fmt} needs Ghostscript, which is not installed"
    if re.search(r"decoder \S+ not available|encoder \S+ not available|unknown compression", text):
        return f"unsupported format: {fmt}: {text}"
    return None


def decode_image(data: bytes, size: int, max_pixels: int) -> tuple[np.ndarray, str | None]:
    """Decode ``data`` to (size, size, 3) uint8: shortest side resized to ``size``, centre crop.

    Returns the pixels and a conversion note; raises ``SkipImage`` with the reason for any
    failure of the decoder, whatever it raised. Pillow's own decompression-bomb guard is
    set at least as strict as ``max_pixels``: it also checks sizes the header does not
    give (frames, embedded images).
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise SkipImage("zero-byte file")
    Image.MAX_IMAGE_PIXELS = max(1, max_pixels // 2)  # Pillow raises above twice this: above max_pixels
    img: Any = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise SkipImage(
                    f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                    "(data.max_pixels; possible decompression bomb)"
                )
            if img.format == "JPEG":
                img.draft("RGB", (size, size))
            img.load()
            img, note = _to_rgb(img)
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            pixels = np.asarray(img, dtype=np.uint8)
    except SkipImage:
        raise
    except Image.DecompressionBombError as e:
        raise SkipImage(f"image is above the limit of {max_pixels} pixels (data.max_pixels; possible decompression "
                        f"bomb): {e}") from e
    except UnidentifiedImageError as e:
        raise SkipImage("not an image: the format cannot be identified") from e
    except MemoryError as e:
        raise SkipImage("out of memory while decoding (possible decompression bomb)") from e
    except Exception as e:  # the decoder is third-party code: no list of its exceptions is complete
        reason = _unsupported(img, e)
        if reason is not None:
            raise SkipImage(reason) from e
        if isinstance(e, (OSError, SyntaxError, ValueError, EOFError, struct.error)):
            raise SkipImage(f"corrupt or truncated image: {e}") from e
        raise SkipImage(f"decoder error: {type(e).__name__}: {e}") from e
    if pixels.shape != (size, size, 3):
        raise SkipImage(f"decoder error: got pixels of shape {pixels.shape}, wanted {(size, size, 3)}")
    return pixels, note


@lru_cache(maxsize=16)
def _filesystem(scheme_and_host: str) -> Any:
    from clipscan import fs as cfs

    return cfs.resolve(scheme_and_host)[0]


def _open(uri: str) -> Any:
    from clipscan import fs as cfs

    if cfs.is_uri(uri):
        scheme, rest = uri.split("://", 1)
        return _filesystem(f"{scheme}://{rest.split('/', 1)[0]}"), cfs.resolve(uri)[1]
    return cfs.resolve(uri)


@lru_cache(maxsize=8)
def _tar_index(tar_uri: str) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) of one tar, read once per process (the report reads many)."""
    import tarfile

    fsys, inner = _open(tar_uri)
    with fsys.open_input_file(inner) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


def read_tar_member(tar_uri: str, member: str) -> bytes:
    """Bytes of ``member`` in the tar at ``tar_uri`` (WebDataset rows have uris ``shard.tar#member``)."""
    index = _tar_index(tar_uri)
    if member not in index:
        raise SkipImage(f"missing file: no member {member} in {tar_uri}")
    offset, size = index[member]
    fsys, inner = _open(tar_uri)
    with fsys.open_input_file(inner) as f:
        return bytes(f.read_at(size, offset))


def read_image_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """Bytes of the image at a local path, an object-storage URI or ``shard.tar#member``.

    ``SkipImage`` if it is missing, or larger than ``max_bytes`` (a file the decoder could
    not hold is not read into this process either).
    """
    try:
        match = TAR_MEMBER.match(uri)
        if match and not os.path.exists(uri):
            return read_tar_member(match.group("tar"), match.group("member"))
        fsys, inner = _open(uri)
        with fsys.open_input_file(inner) as f:
            if max_bytes is not None and f.size() > max_bytes:
                raise SkipImage(f"file is {f.size() / 2**20:.0f} MiB, more than the decoder's "
                                f"{max_bytes / 2**20:.0f} MiB (data.decode_memory_mb)")
            return bytes(f.read())
    except SkipImage:
        raise
    except FileNotFoundError as e:
        raise SkipImage(f"missing file: {uri}") from e
    except IsADirectoryError as e:
        raise SkipImage(f"not a file: {uri}") from e
    except OSError as e:
        text = str(e)
        if "not found" in text.lower() or "No such file" in text or "does not exist" in text:
            raise SkipImage(f"missing file: {uri}") from e
        raise SkipImage(f"cannot read {uri}: {text}") from e
    except Exception as e:  # a tar that is not one, a filesystem error of its own class
        raise SkipImage(f"cannot read {uri}: {type(e).__name__}: {e}") from e


# --- the decoder in a child process ---------------------------------------------------

_HEADER = struct.Struct("<Q")


def _send(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _recv_exact(stream: IO[bytes], n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def load_plugins(plugins: tuple[str, ...] | list[str]) -> None:
    """Import each ``module`` (or import ``module`` and call ``function`` for ``module:function``)."""
    import importlib

    for spec in plugins:
        module, _, func = spec.partition(":")
        loaded = importlib.import_module(module)
        if func:
            getattr(loaded, func)()


def peak_rss_kb() -> int:
    """This process's own peak resident set, KiB.

    VmHWM belongs to the process's memory map, which starts afresh at exec. ``getrusage``'s
    ``ru_maxrss`` does not: Linux carries the parent's peak over the fork and exec, so a
    decoder started by a 900 MB parent would report 900 MB it never used.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def serve(memory_mb: int | None, plugins: tuple[str, ...] = ()) -> None:
    """The child's loop: ``(data, size, max_pixels)`` requests on stdin, one reply each on stdout.

    Replies: ``("ok", pixels, note, peak_rss_kb)`` or ``("skip", reason, peak_rss_kb)``.
    The address-space limit makes an allocation above it fail with ``MemoryError`` here,
    instead of the kernel killing a Ray worker (or the machine swapping).
    """
    import resource

    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a plugin that prints must not corrupt the replies
    try:
        load_plugins(plugins)
        _send(stdout, ("ready", peak_rss_kb()))
    except BaseException as e:  # noqa: BLE001  # the parent reports it
        _send(stdout, ("error", f"{type(e).__name__}: {e}"))
        return
    while True:
        try:
            (n,) = _HEADER.unpack(_recv_exact(stdin, _HEADER.size))
            request = pickle.loads(_recv_exact(stdin, n))
        except EOFError:
            return
        try:
            pixels, note = decode_image(*request)
            reply: tuple[Any, ...] = ("ok", pixels, note)
        except SkipImage as e:
            reply = ("skip", str(e))
        except BaseException as e:  # noqa: BLE001  # SystemExit from a plugin, a KeyboardInterrupt: still one row
            reply = ("skip", f"decoder error: {type(e).__name__}: {e}")
        rss = peak_rss_kb()
        try:
            _send(stdout, (*reply, rss))
        except MemoryError:
            _send(stdout, ("skip", "out of memory while decoding (possible decompression bomb)", rss))


class DecoderUnavailable(RuntimeError):
    """The decoder process cannot start at all (a plugin that does not import); names the cause."""


class GuardedDecoder:
    """``decode_image`` in a child process with an address-space limit and a per-image timeout.

    ``decode(data, size, max_pixels)`` returns what ``decode_image`` returns or raises
    ``SkipImage``; a child that exceeds the timeout is killed and one that dies (a signal,
    the kernel's OOM killer) is restarted, and the row is skipped with that reason.
    ``peak_rss_kb`` is the largest peak resident set of any child so far.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int | None = DEFAULT_MEMORY_MB,
                 plugins: tuple[str, ...] = ()) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.plugins = tuple(plugins)
        self.peak_rss_kb = 0
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the parent's imports, plugins included
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"  # one image at a time; BLAS thread pools would only reserve address space
        code = f"from clipscan.stages.decode import serve; serve({self.memory_mb!r}, {self.plugins!r})"
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env=env)
        try:
            reply = self._read(proc, 120.0)
        except (EOFError, TimeoutError) as e:
            self._kill(proc)
            raise DecoderUnavailable(f"the decoder process did not start (exit code {proc.poll()})") from e
        if reply[0] != "ready":
            self._kill(proc)
            raise DecoderUnavailable(f"the decoder process did not start: data.image_plugins {list(self.plugins)}: {reply[1]}")
        self.peak_rss_kb = max(self.peak_rss_kb, int(reply[1]))
        return proc

    @staticmethod
    def _read(proc: subprocess.Popen[bytes], timeout_s: float) -> Any:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        buf = bytearray()
        need = _HEADER.size
        header_done = False
        while True:
            while len(buf) < need:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
                chunk = os.read(fd, max(need - len(buf), 1 << 16))
                if not chunk:
                    raise EOFError
                buf += chunk
            if header_done:
                return pickle.loads(bytes(buf[_HEADER.size:need]))
            (n,) = _HEADER.unpack(bytes(buf[: _HEADER.size]))
            need, header_done = _HEADER.size + n, True

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()

    def decode(self, data: bytes, size: int, max_pixels: int) -> tuple[np.ndarray, str | None]:
        if not data:
            raise SkipImage("zero-byte file")
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            assert proc.stdin is not None
            try:
                _send(proc.stdin, (data, size, max_pixels))
                reply = self._read(proc, self.timeout_s)
            except TimeoutError:
                self._restart(proc)
                raise SkipImage(f"the decoder did not finish within {self.timeout_s:g} s (data.decode_timeout_s); "
                                "stopped it") from None
            except (EOFError, BrokenPipeError, OSError):
                code = proc.wait()
                self._restart(proc)
                raise SkipImage(_death_reason(code, self.memory_mb)) from None
        self.peak_rss_kb = max(self.peak_rss_kb, int(reply[-1]))
        if reply[0] == "ok":
            return reply[1], reply[2]
        if "out of memory" in reply[1]:
            self._restart(proc)  # an allocation failed half-way: start clean
            raise SkipImage(f"decoding needs more than the {self.memory_mb} MiB allowed (data.decode_memory_mb; "
                            "possible decompression bomb)")
        raise SkipImage(reply[1])

    def _restart(self, proc: subprocess.Popen[bytes]) -> None:
        self._kill(proc)
        self._proc = None
        self.restarts += 1

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._kill(self._proc)
                self._proc = None


def _death_reason(code: int, memory_mb: int | None) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = ", perhaps killed for using too much memory" if -code == signal.SIGKILL else ""
        return f"the decoder process died on signal {name}{hint}"
    return f"the decoder process exited with code {code} while decoding"


_decoders: dict[tuple[float, int | None, tuple[str, ...]], GuardedDecoder] = {}


def guarded_decoder(timeout_s: float, memory_mb: int | None, plugins: tuple[str, ...]) -> GuardedDecoder:
    """One decoder process per worker process and setting, kept for the next batch."""
    key = (timeout_s, memory_mb, tuple(plugins))
    if key not in _decoders:
        _decoders[key] = GuardedDecoder(timeout_s, memory_mb, tuple(plugins))
    return _decoders[key]


class Decode:
    """Batch stage: rows with ``uri`` (and optional ``image_bytes``) -> rows with ``pixels`` (n, S, S, 3) uint8.

    Rows already skipped pass through untouched; a row that fails to read or decode, for
    whatever reason, gets ``skip_stage="decode"`` and its reason. Pixels of skipped rows
    are zeros. Decoding runs in a ``GuardedDecoder`` child process unless
    ``isolate=False`` (then in this process, still with every exception caught).
    """

    needs = ("id", "uri", "skip_stage", "skip_reason")

    def __init__(self, size: int, max_pixels: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                 memory_mb: int | None = DEFAULT_MEMORY_MB, plugins: tuple[str, ...] | list[str] = (),
                 isolate: bool = True) -> None:
        self.size = size
        self.max_pixels = max_pixels
        self.max_bytes = memory_mb * 2**20 if memory_mb else None
        self.decoder = guarded_decoder(timeout_s, memory_mb, tuple(plugins)) if isolate else None
        if not isolate:
            load_plugins(plugins)

    @classmethod
    def for_data(cls, size: int, data: DataConfig) -> Decode:
        """The stage with the limits and plugins of ``data`` (a ``DataConfig``)."""
        return cls(size, data.max_pixels, timeout_s=data.decode_timeout_s, memory_mb=data.decode_memory_mb,
                   plugins=tuple(data.image_plugins))

    def decode(self, data: bytes) -> tuple[np.ndarray, str | None]:
        if self.decoder is None:
            return decode_image(data, self.size, self.max_pixels)
        return self.decoder.decode(data, self.size, self.max_pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # imported here: the decoder process imports this module, and needs no pyarrow
        from clipscan.columns import require

        require(batch, self.needs, "decode")
        n = len(batch["id"])
        pixels = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        stage = list(batch["skip_stage"])
        reason = list(batch["skip_reason"])
        notes = list(batch["notes"]) if "notes" in batch else [""] * n
        blobs = batch.get("image_bytes")
        for i in range(n):
            if stage[i]:
                continue
            try:
                data = blobs[i] if blobs is not None and blobs[i] is not None else read_image_bytes(str(batch["uri"][i]), self.max_bytes)
                pixels[i], note = self.decode(bytes(data))
                if note:
                    notes[i] = f"{notes[i]},{note}" if notes[i] else note
            except SkipImage as e:
                stage[i], reason[i] = "decode", str(e)
        out = {k: v for k, v in batch.items() if k != "image_bytes"}
        if "captions" in out:  # lists, not ragged string arrays: Ray then writes list<string>, not pickles
            captions = np.empty(n, dtype=object)
            for i, c in enumerate(out["captions"]):
                captions[i] = [] if c is None else [str(x) for x in c]
            out["captions"] = captions
        out.update(
            pixels=pixels,
            skip_stage=np.array(stage, dtype=object),
            skip_reason=np.array(reason, dtype=object),
            notes=np.array(notes, dtype=object),
        )
        return out
