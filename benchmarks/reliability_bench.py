"""Reliability benchmark, memory part (issue 13, defect 1): peak RSS of the worst requests within the limits.

Starts `satml-serve` (a subprocess on 127.0.0.1, default settings: max_pixels 40 MP per image,
max_request_pixels 100 MP per request, 10 MiB body) over the shipped artifacts, then sends, one at a
time, the most memory-hungry requests that fit the limits: few-KB files that decode to 40 MP canvases
in the costliest colour modes (1-bit, palette with transparency, RGBA, 16-bit grey), and one over the
request budget. For each: status, wall time, the server's peak RSS above its resident size just before
(Linux VmHWM after a reset via /proc/PID/clear_refs) and the worst /health/live latency while it ran.

    python benchmarks/reliability_bench.py                      # this checkout's app/
    python benchmarks/reliability_bench.py --code /tmp/orig      # another checkout (e.g. before the fix)

Loopback only, bounded (a dozen requests); results to benchmarks/results/reliability_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MP40 = (8000, 5000)  # 40,000,000 pixels: the default max_pixels


def png(im: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True, **kw)
    return buf.getvalue()


def cases() -> dict[str, list[bytes]]:
    """name -> the files of one request (each a few KB on the wire)."""
    w, h = MP40
    bilevel = Image.new("1", (w, h), 0)
    bilevel.paste(1, (0, 0, w // 2, h))
    palette = Image.new("P", (w, h), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, w // 3, h))
    rgba = Image.new("RGBA", (w, h), (200, 30, 30, 128))
    grey16 = Image.fromarray(np.full((h // 2, w), 40000, dtype=np.uint16)).convert("I;16")
    grey16 = grey16.resize((w, h))
    files = {"1-bit": png(bilevel), "palette+transparency": png(palette, transparency=0), "RGBA": png(rgba),
             "16-bit grey": png(grey16)}
    out = {f"{name}, 40 MP x 1": [data] for name, data in files.items()}
    out["1-bit, 40 MP x 2 + RGBA 20 MP (100 MP: the request budget)"] = [
        files["1-bit"], files["1-bit"], png(Image.new("RGBA", (5000, 4000), (10, 200, 10, 100)))]
    out["RGBA, 40 MP x 2 (80 MP)"] = [files["RGBA"]] * 2
    out["1-bit, 40 MP x 3 (120 MP: over the budget)"] = [files["1-bit"]] * 3
    out["1-bit, 40 MP x 64 (2.56 GP: over the budget)"] = [files["1-bit"]] * 64
    return out


def vm(pid: int, field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) * 1024 if m else -1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose app/ is served")
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reliability_memory")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--max-files", type=int, default=64,
                    help="skip requests with more files (code without the budget would decode them all)")
    args = ap.parse_args()

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATML_")}
    # one process (SATML_WORKERS=1): the memory sampled is the server's own, not a supervisor's
    env.update(OMP_NUM_THREADS="1", SATML_DEVICE="cpu", SATML_LOG_LEVEL="warning", SATML_WORKERS="1")
    proc = subprocess.Popen([sys.executable, "-m", "app.serve", "--port", str(port), "--artifacts-dir",
                             str(args.artifacts.resolve())], cwd=args.code, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, "server exited"
            assert time.monotonic() < deadline, "server not ready"
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        requests = {k: v for k, v in cases().items() if len(v) <= args.max_files}
        with httpx.Client(base_url=url, timeout=120) as c:
            small = png(Image.new("RGB", (32, 32), (200, 30, 30)))
            assert c.post("/classify", files={"file": ("w.png", small, "image/png")}).status_code == 200
            for name, files in requests.items():
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
                base = vm(proc.pid, "VmRSS")
                probes: list[float] = []
                done = threading.Event()

                def probe(done: threading.Event = done, probes: list[float] = probes) -> None:
                    with httpx.Client(base_url=url, timeout=30) as p:
                        while not done.is_set():
                            t0 = time.perf_counter()
                            p.get("/health/live")
                            probes.append(time.perf_counter() - t0)
                            time.sleep(0.02)

                t = threading.Thread(target=probe)
                t.start()
                t0 = time.perf_counter()
                r = c.post("/classify", files=[("files", (f"{i}.png", d, "image/png")) for i, d in enumerate(files)])
                seconds = time.perf_counter() - t0
                done.set()
                t.join()
                peak = vm(proc.pid, "VmHWM")
                rows.append({"request": name, "files": len(files), "bytes": sum(map(len, files)),
                             "status": r.status_code, "code": r.json().get("error", {}).get("code", ""),
                             "seconds": round(seconds, 2), "base_rss_mib": round(base / 2**20, 1),
                             "peak_above_base_mib": round((peak - base) / 2**20, 1),
                             "live_max_ms": round(max(probes, default=0) * 1000, 1), "live_probes": len(probes)})
                print(json.dumps(rows[-1]), flush=True)
            alive = c.get("/health/live").status_code
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    load = os.getloadavg()
    meta = {"code": str(args.code), "label": args.label, "python": platform.python_version(),
            "cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in load], "alive_after": alive}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"### {args.label}", "", f"`{' '.join(sys.argv)}`; {os.cpu_count()} CPUs, load average "
             f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; /health/live after: {alive}", "",
             "| request | wire bytes | status | s | RSS before (MiB) | peak above (MiB) | /health/live max (ms) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['request']} | {row['bytes']:,} | {row['status']} {row['code']} | {row['seconds']} | "
                     f"{row['base_rss_mib']} | {row['peak_above_base_mib']} | {row['live_max_ms']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
