"""Fuzz figure (issue 13): mutated images and fuzzed form fields through a real `satml-serve` on 127.0.0.1.

Images: seeds in PNG (RGB, RGBA, L, P with transparency, 1-bit, 16-bit), JPEG (baseline and progressive),
GIF (one and many frames), WebP, BMP and TIFF, 1x1 to 300x200 pixels, then mutated: truncated, bit flips,
byte overwrites, repeated chunks, zeroed headers, swapped magic, and each sent with a random or wrong file
name and content type. Form fields: /classify `top_k`, `min_credibility`, `model`; /attack `eps`, `steps`,
`target`, `method`, `compare` (cheap budgets: at most 2 steps) with values such as superscript digits,
5,000-digit numbers, NaN, negative, unicode, empty and very long strings. The figure: every answer is a
4xx JSON error or a 200, **never a 5xx**, and the server is alive (and its RSS bounded) afterwards.

    python benchmarks/fuzz_bench.py                       # 10,000 images + 2,000 field cases (a few minutes)
    python benchmarks/fuzz_bench.py --images 500 --fields 200 --out /tmp/fuzz   # a quick look

Loopback only, one request at a time (bounded by the counts); results to benchmarks/results/fuzz.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(1, 1), (7, 13), (32, 32), (100, 80), (300, 200)]
NAMES = ["x.png", "x.jpg", "x.gif", "x.webp", "x.bmp", "x.tiff", "x", "x.exe", "../../etc/passwd", "ü.png", ""]
TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp", "application/octet-stream", "text/plain", ""]


def seeds(rng: np.random.Generator) -> list[bytes]:
    """Valid files of every format and mode the decoder may meet."""
    out = []
    for w, h in SIZES:
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        variants: list[tuple[str, Image.Image, dict[str, Any]]] = [
            ("PNG", rgb, {}), ("PNG", rgb.convert("RGBA"), {}), ("PNG", rgb.convert("L"), {}),
            ("PNG", rgb.convert("P"), {"transparency": 0}), ("PNG", rgb.convert("1"), {}),
            ("PNG", Image.fromarray((rng.integers(0, 65535, (h, w))).astype(np.uint16)), {}),
            ("JPEG", rgb, {"quality": 80}), ("JPEG", rgb, {"progressive": True}),
            ("GIF", rgb.convert("P"), {}), ("WEBP", rgb, {}), ("BMP", rgb, {}), ("TIFF", rgb, {})]
        for fmt, im, kw in variants:
            buf = io.BytesIO()
            im.save(buf, format=fmt, **kw)
            out.append(buf.getvalue())
        frames = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P") for _ in range(40)]
        buf = io.BytesIO()
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
        out.append(buf.getvalue())
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random corruption (or none, one time in ten)."""
    b = bytearray(data)
    kind = rng.randrange(10)
    if kind == 0 or not b:
        return bytes(b)
    if kind == 1:  # truncated
        return bytes(b[:rng.randrange(len(b))])
    if kind == 2:  # bit flips
        for _ in range(rng.randint(1, 32)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 3:  # overwritten bytes
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 4:  # a repeated chunk
        i = rng.randrange(len(b))
        b[i:i] = b[i:i + rng.randint(1, 512)] * rng.randint(2, 20)
    elif kind == 5:  # zeroed header
        b[:min(len(b), rng.randint(1, 64))] = bytes(min(len(b), rng.randint(1, 64)))[:len(b[:64])]
    elif kind == 6:  # another format's magic on this body
        magic = rng.choice([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP", b"BM"])
        b[:len(magic)] = magic
    elif kind == 7:  # huge dimension fields in a PNG header
        if b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) > 24:
            b[16:24] = rng.randbytes(8)
    elif kind == 8:  # random garbage
        return rng.randbytes(rng.randint(1, 4096))
    else:  # appended trailing data
        b += rng.randbytes(rng.randint(1, 2048))
    return bytes(b)


WEIRD = ["", " ", "0", "-1", "1e309", "nan", "NaN", "inf", "-inf", "²", "١٢", "½", "1" * 5000, "9" * 400,
         "0x10", "1_000", "+3", "3.0", "\u0000", "🙂", "a" * 10000, "null", "true", "[]", "{}", "default",
         "../default", "default,default", ",", "%00", "' OR 1=1 --", "\ud7ff", "3 ", " 3"]


def field_cases(rng: random.Random, n: int, image: bytes) -> list[tuple[str, dict[str, Any], list[Any]]]:
    """(path, form data, files) of fuzzed fields; /attack budgets stay tiny (steps <= 2 when valid)."""
    out: list[tuple[str, dict[str, Any], list[Any]]] = []
    for _ in range(n):
        value = rng.choice(WEIRD) if rng.random() < 0.8 else rng.randbytes(rng.randint(1, 64)).decode("latin-1")
        files = [("files", ("x.png", image, "image/png"))]
        if rng.random() < 0.5:
            out.append(("/classify", {rng.choice(["top_k", "min_credibility", "model", "bogus"]): value}, files))
        else:
            field = rng.choice(["eps", "steps", "target", "method", "compare", "top_k", "model"])
            data = {"steps": "1", "eps": "0.01", field: value}
            if field == "steps" and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) < 4:
                data["steps"] = str(min(2, int(value)))
            out.append(("/attack", data, [("file", ("x.png", image, "image/png"))]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return -1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--fields", type=int, default=2_000)
    p.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    rng, nrng = random.Random(a.seed), np.random.default_rng(a.seed)
    base = seeds(nrng)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATML_")}
    env["SATML_WORKERS"] = "1"  # one process: the memory sampled is the server's own
    log_path = Path(tempfile.mkdtemp(prefix="fuzz_")) / "server.log"  # kept for a look when a 5xx shows up
    Path(a.out).mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "app.serve", "--port", str(port), "--artifacts-dir", a.artifacts,
                               "--log-level", "warning"], env=env, cwd=ROOT, stdout=log_path.open("w"),
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    load_start = [round(v, 2) for v in os.getloadavg()]
    t0 = time.time()
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, "server died during start-up"
            time.sleep(0.5)
        rss_start = rss(server.pid)
        statuses: Counter[str] = Counter()
        fives: list[dict[str, Any]] = []
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in range(a.images):
                n = rng.choice([1, 1, 1, 2, 3])
                files = [("files", (rng.choice(NAMES), mutate(rng.choice(base), rng), rng.choice(TYPES)))
                         for _ in range(n)]
                r = c.post("/classify", files=files)
                statuses[f"/classify images {r.status_code}"] += 1
                if r.status_code >= 500:
                    fives.append({"case": f"image request {i}", "status": r.status_code, "body": r.text[:300]})
            image = base[2]
            for path, data, files in field_cases(rng, a.fields, image):
                r = c.post(path, data=data, files=files)
                statuses[f"{path} fields {r.status_code}"] += 1
                if r.status_code >= 500:
                    fives.append({"case": f"{path} {str(data)[:200]}", "status": r.status_code, "body": r.text[:300]})
            alive = c.get("/health/live").status_code == 200 and c.get("/health/ready").status_code == 200
        rss_end = rss(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
    result = {"images": a.images, "field_cases": a.fields, "seed": a.seed, "seconds": round(time.time() - t0, 1),
              "statuses": dict(sorted(statuses.items())), "five_xx": len(fives), "five_xx_cases": fives[:20],
              "alive_after": alive, "rss_mib_start": round(rss_start / 2**20, 1),
              "rss_mib_end": round(rss_end / 2**20, 1),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "loadavg_start": load_start, "loadavg_end": [round(v, 2) for v in os.getloadavg()],
              "command": "python benchmarks/fuzz_bench.py " + " ".join(sys.argv[1:])}
    out = Path(a.out)
    (out / "fuzz.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Fuzz (issue 13)", "", f"`{result['command']}` against `satml-serve` on 127.0.0.1 over `{a.artifacts}`; "
             f"{result['machine']}, load average {load_start} at the start, {result['loadavg_end']} at the end; "
             f"{result['seconds']} s.", "",
             f"**5xx answers: {len(fives)}**; server alive and ready afterwards: {alive}; resident memory "
             f"{result['rss_mib_start']} MiB before, {result['rss_mib_end']} MiB after.", "",
             "| requests | status | count |", "|---|---|---:|"]
    for key, count in sorted(statuses.items()):
        what, status = key.rsplit(" ", 1)
        lines.append(f"| {what} | {status} | {count} |")
    (out / "fuzz.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if fives or not alive:
        sys.exit(1)


if __name__ == "__main__":
    main()
