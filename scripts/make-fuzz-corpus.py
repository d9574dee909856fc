#!/usr/bin/env python3
"""Writes the committed seed corpus of the fuzz targets and the hostile-image fixtures.

    python3 scripts/make-fuzz-corpus.py

fuzz/corpus/preprocess_image/  small valid JPEG/PNG/WebP/GIF/BMP files in their common
                               variants, plus truncated and corrupted copies of each and
                               headers that claim huge sizes
fuzz/corpus/parse_request/     one byte choosing the parser (see
                               fuzz/fuzz_targets/parse_request.rs), then its input
tests/fixtures/hostile/        the files tests/hostile_images.rs needs that are awkward
                               to build in Rust (animated and oversized WebP, JPEG)

Deterministic (fixed seeds, no timestamps): running it again rewrites the same bytes.
Needs Pillow with WebP support. Everything stays far below 1 MB.
"""

import base64
import hashlib
import io
import json
import random
import struct
import sys
import zlib
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "fuzz/corpus/preprocess_image"
REQUESTS = ROOT / "fuzz/corpus/parse_request"
HOSTILE = ROOT / "tests/fixtures/hostile"


def scene(w, h, mode="RGB", seed=0):
    """A few coloured rectangles: small files with some structure."""
    rng = random.Random(seed)
    img = Image.new("RGB", (w, h), (240, 240, 240))
    for _ in range(3):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = min(w, x0 + rng.randrange(1, w)), min(h, y0 + rng.randrange(1, h))
        colour = tuple(rng.randrange(256) for _ in range(3))
        img.paste(colour, (x0, y0, max(x0 + 1, x1), max(y0 + 1, y1)))
    return img.convert(mode)


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def valid_images():
    s = scene(24, 16)
    yield "png-rgb.png", encode(s, "PNG")
    yield "png-rgba.png", encode(scene(16, 16, "RGBA", 1), "PNG")
    yield "png-grey.png", encode(scene(16, 12, "L", 2), "PNG")
    yield "png-palette.png", encode(scene(16, 16, "P", 3), "PNG")
    yield "png-interlaced.png", encode(s, "PNG", interlace=1)
    yield "png-16bit.png", encode(scene(8, 8, "I;16", 4), "PNG")
    yield "png-1x1.png", encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG")
    yield "jpeg-baseline.jpg", encode(s, "JPEG", quality=70)
    yield "jpeg-progressive.jpg", encode(s, "JPEG", quality=70, progressive=True)
    yield "jpeg-grey.jpg", encode(scene(16, 16, "L", 5), "JPEG")
    yield "jpeg-cmyk.jpg", encode(scene(16, 16, "CMYK", 6), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise
    yield "jpeg-exif-orientation.jpg", encode(s, "JPEG", exif=exif.tobytes())
    yield "webp-lossy.webp", encode(s, "WEBP", quality=50)
    yield "webp-lossless.webp", encode(s, "WEBP", lossless=True)
    yield "webp-alpha.webp", encode(scene(16, 16, "RGBA", 7), "WEBP", quality=50)
    frames = [scene(16, 16, "RGB", 10 + i) for i in range(3)]
    yield "webp-animated.webp", encode(
        frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True
    )
    yield "gif-static.gif", encode(scene(16, 16, "P", 8), "GIF")
    gif_frames = [scene(16, 16, "P", 20 + i) for i in range(3)]
    yield "gif-animated.gif", encode(
        gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:], loop=0
    )
    yield "bmp-rgb.bmp", encode(s, "BMP")


def png_chunk(kind, data):
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def lying_png(w, h):
    """A PNG header claiming w x h and a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def gif(screen, frames):
    """A GIF89a with a 2-colour palette; each frame (w, h) holds 1x1 pixel of LZW data."""
    out = b"GIF89a" + struct.pack("<HHBBB", screen[0], screen[1], 0x80, 0, 0)
    out += b"\x00\x00\x00\xff\xff\xff"
    for w, h in frames:
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0)
        out += b"\x02\x02\x44\x01\x00"
    return out + b"\x3b"


def riff(chunks):
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_chunk(kind, data):
    pad = b"\x00" if len(data) % 2 else b""
    return kind + struct.pack("<I", len(data)) + data + pad


def webp_chunks(data):
    """The chunks of a RIFF WebP file."""
    pos, chunks = 12, []
    while pos + 8 <= len(data):
        kind, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        chunks.append((kind, data[pos + 8 : pos + 8 + size]))
        pos += 8 + size + (size & 1)
    return chunks


def vp8x(canvas_w, canvas_h, flags):
    return webp_chunk(
        b"VP8X",
        bytes([flags, 0, 0, 0])
        + (canvas_w - 1).to_bytes(3, "little")
        + (canvas_h - 1).to_bytes(3, "little"),
    )


def webp_lying_canvas(w, h):
    """An extended WebP whose canvas claims w x h around a 1x1 lossless image."""
    small = encode(Image.new("RGB", (1, 1), (0, 128, 255)), "WEBP", lossless=True)
    vp8l = dict(webp_chunks(small))[b"VP8L"]
    return riff([vp8x(w, h, 0), webp_chunk(b"VP8L", vp8l)])


def webp_many_frames(n, side=4):
    """An animated WebP of n lossless frames, each side x side: small per frame."""
    frame = encode(Image.new("RGB", (side, side), (200, 10, 10)), "WEBP", lossless=True)
    vp8l = webp_chunk(b"VP8L", dict(webp_chunks(frame))[b"VP8L"])
    anmf_head = (
        (0).to_bytes(3, "little") * 2  # x, y offset / 2
        + (side - 1).to_bytes(3, "little") * 2  # frame width, height - 1
        + (40).to_bytes(3, "little")  # duration (ms)
        + b"\x00"  # blending and disposal
    )
    anmf = webp_chunk(b"ANMF", anmf_head + vp8l)
    anim = webp_chunk(b"ANIM", b"\x00\x00\x00\x00" + struct.pack("<H", 0))
    return riff([vp8x(side, side, 0x02), anim] + [anmf] * n)


def jpeg_lying(w, h):
    """A real small baseline JPEG whose SOF0 claims w x h."""
    data = bytearray(encode(scene(16, 16), "JPEG", quality=50))
    i = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, h, w)
    return bytes(data)


def hostile_images():
    yield "png-claims-50000x50000.png", lying_png(50_000, 50_000)
    yield "png-claims-16000x16000.png", lying_png(16_000, 16_000)
    yield "gif-claims-50000x50000.gif", gif((50_000, 50_000), [(1, 1)])
    yield "gif-huge-first-frame.gif", gif((16, 16), [(65_535, 65_535)])
    yield "gif-2000-frames.gif", gif((16, 16), [(1, 1)] * 2000)
    yield "webp-claims-50000x50000.webp", webp_lying_canvas(50_000, 50_000)
    yield "webp-2000-frames.webp", webp_many_frames(2000)
    yield "jpeg-claims-60000x60000.jpg", jpeg_lying(60_000, 60_000)


def broken(name, data):
    """Truncated and corrupted copies: the decoders' error paths."""
    stem, ext = name.rsplit(".", 1)
    rng = random.Random(hashlib.sha256(data).digest())
    yield f"{stem}-truncated-half.{ext}", data[: len(data) // 2]
    yield f"{stem}-truncated-header.{ext}", data[: min(len(data), 20)]
    yield f"{stem}-truncated-last-byte.{ext}", data[:-1]
    flipped = bytearray(data)
    for _ in range(4):
        i = rng.randrange(min(len(flipped), 12), len(flipped))
        flipped[i] ^= 1 << rng.randrange(8)
    yield f"{stem}-bitflips.{ext}", bytes(flipped)
    zeroed = bytearray(data)
    a = len(zeroed) // 3
    zeroed[a : a + max(4, len(zeroed) // 8)] = bytes(max(4, len(zeroed) // 8))
    yield f"{stem}-zeroed-middle.{ext}", bytes(zeroed[: len(data)])


def multipart(fields, boundary="fuzzboundary"):
    out = b""
    for name, value, filename in fields:
        out += f"--{boundary}\r\n".encode()
        disp = f'Content-Disposition: form-data; name="{name}"'
        if filename:
            disp += f'; filename="{filename}"\r\nContent-Type: image/png'
        out += disp.encode() + b"\r\n\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def requests(png):
    b64 = base64.b64encode(png).decode()
    # 0: query strings
    yield "query-all", 0, b"steps=5&guidance=0.5&back_refine=true&candidates=3&seed=9&timeout_ms=1000"
    yield "query-bad", 0, b"steps=abc&stepz=1&guidance=nan&seed=-1"
    yield "query-encoded", 0, b"steps=%35&back_refine=%74rue&x=%ZZ&&=&a"
    # 1: JSON caption
    yield "json-caption", 1, json.dumps({"image": b64, "steps": 3, "seed": 1}).encode()
    yield "json-data-uri", 1, json.dumps({"image": "data:image/png;base64," + b64}).encode()
    yield "json-types", 1, b'{"image": "AAAA", "steps": "many", "guidance": 1e999, "seed": 18446744073709551616}'
    yield "json-unknown", 1, b'{"image": "AAAA", "bogus": [1, {"a": null}]}'
    yield "json-truncated", 1, json.dumps({"image": b64})[:40].encode()
    # 2: JSON batch
    yield "json-batch", 2, json.dumps({"images": [b64, b64[:-2]], "candidates": 2}).encode()
    yield "json-batch-string", 2, json.dumps({"images": b64}).encode()
    # 3: multipart with a fixed boundary
    yield "multipart", 3, multipart(
        [("image", png, "a.png"), ("steps", b"4", None), ("seed", b"7", None)]
    )
    yield "multipart-no-image", 3, multipart([("steps", b"4", None)])
    yield "multipart-truncated", 3, multipart([("image", png, "a.png")])[:60]
    # 4: base64 alone
    yield "base64-url-safe", 4, base64.urlsafe_b64encode(png).rstrip(b"=")
    yield "base64-lines", 4, base64.encodebytes(png)
    yield "base64-bad", 4, b"data:image/png,%%%"
    # 5: Content-Type line, then the multipart body
    yield "multipart-ct", 5, b'multipart/form-data; boundary="q b"\n' + multipart(
        [("image", png, "a.png")], boundary="q b"
    )
    yield "multipart-ct-bad", 5, b"multipart/form-data; boundary=\n--\r\n"


def write(directory, name, data):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)


def main():
    valid = dict(valid_images())
    hostile = dict(hostile_images())
    for name, data in valid.items():
        write(IMAGES, name, data)
        for bname, bdata in broken(name, data):
            write(IMAGES, bname, bdata)
    for name, data in hostile.items():
        # The 2000-frame files are large next to the rest; the fuzzer gets the idea
        # from a shorter copy.
        if "2000-frames" in name:
            data = (
                gif((16, 16), [(1, 1)] * 50)
                if name.endswith(".gif")
                else webp_many_frames(50)
            )
            name = name.replace("2000", "50")
        write(IMAGES, name, data)
    for name in (
        "gif-huge-first-frame.gif",
        "gif-2000-frames.gif",
        "webp-claims-50000x50000.webp",
        "webp-2000-frames.webp",
        "jpeg-claims-60000x60000.jpg",
    ):
        write(HOSTILE, name, hostile[name])
    for name, selector, data in requests(valid["png-1x1.png"]):
        write(REQUESTS, name, bytes([selector]) + data)
    total = sum(
        p.stat().st_size for d in (IMAGES, REQUESTS, HOSTILE) for p in d.iterdir()
    )
    print(f"wrote {IMAGES}, {REQUESTS}, {HOSTILE}: {total} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
