"""RTMP fan-out: marchproxy-rtmp vs nginx-rtmp, side by side.

One 30 fps publisher (~0.8 Mbit/s, keyframe every second; a pre-encoded file sent with
``ffmpeg -re -stream_loop -1 -c copy`` so the encoder costs nothing) and N players from
``loadgen.py``. For each N: share of players keeping >= 95% of 30 fps, server CPU per player
(% of one core, sampled over the measurement window from /proc), time to first frame.

    uv run --frozen python benchmarks/rtmp/bench.py --levels 100,200,400,800
    uv run --frozen python benchmarks/rtmp/bench.py --check     # loadgen vs ffmpeg, exit 1 if off

Never run in CI. Every process it starts is killed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the repository root, for tests.conftest
from tests.conftest import free_port  # noqa: E402 - ports below the ephemeral range

SRC = Path(tempfile.gettempdir()) / "marchproxy-rtmp-bench-src.flv"
NGINX_RTMP_MODULE = "/usr/lib/nginx/modules/ngx_rtmp_module.so"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def make_source() -> Path:
    if SRC.exists():
        return SRC
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", "testsrc=size=640x360:rate=30",
         "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
         "-c:v", "libx264", "-preset", "veryfast", "-b:v", "720k", "-minrate", "720k",
         "-maxrate", "720k", "-bufsize", "720k", "-x264-params", "nal-hrd=cbr",
         "-g", "30", "-keyint_min", "30", "-sc_threshold", "0",
         "-c:a", "aac", "-b:a", "64k", "-t", "30", "-f", "flv", str(SRC)],
        check=True, timeout=300,
    )  # fmt: skip
    return SRC


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes] | subprocess.Popen[str]] = []

    def start(
        self,
        argv: list[str],
        *,
        stdout: int = subprocess.DEVNULL,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.DEVNULL, env=env
        )
        self.procs.append(p)
        return p

    def start_text(self, argv: list[str]) -> subprocess.Popen[str]:
        """Like ``start``, with stdout a text pipe (``p.stdout`` yields ``str`` lines)."""
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)


@contextlib.contextmanager
def ours(procs: Procs, tmp: Path, flush_ms: int = 40) -> Iterator[tuple[int, int]]:
    port = free_port()
    cfg = tmp / "rtmp.json"
    cfg.write_text(json.dumps({"modules": [{"name": "rtmp", "config": {
        "flush_interval_ms": flush_ms,
        "applications": [{"name": "live", "publish_open": True}]}}]}))  # fmt: skip
    env = {
        **os.environ,
        "DATA_PORT": str(port),
        "GRPC_PORT": "0",
        "ADMIN_PORT": "0",
        "REGISTER_WITH_NLB": "false",
        "LOG_LEVEL": "WARNING",
        "CONFIG_FILE": str(cfg),
    }
    p = procs.start([sys.executable, "-m", "marchproxy_rtmp"], env=env)
    wait_port(port)
    try:
        yield port, p.pid
    finally:
        procs.stop(p)


@contextlib.contextmanager
def nginx(procs: Procs, tmp: Path, app_conf: str = "") -> Iterator[tuple[int, int]]:
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
load_module {NGINX_RTMP_MODULE};
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 8192; }}
worker_rlimit_nofile 16384;
rtmp {{
    server {{
        listen 127.0.0.1:{port};
        chunk_size 4096;
        application live {{ live on; wait_key on; {app_conf} }}
    }}
}}
""")
    p = procs.start(
        [shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(tmp), "-c", str(conf),
         "-e", str(tmp / "error.log")]
    )  # fmt: skip
    wait_port(port)
    try:
        yield port, p.pid
    finally:
        procs.stop(p)


class Progress:
    """Follows ``ffmpeg -progress pipe:1``: how many frames the publisher has sent so far."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.frames = 0
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("frame="):
                with contextlib.suppress(ValueError):
                    self.frames = int(line[6:])


def publish(
    procs: Procs, url: str, *, loop: bool = True, seconds: float = 0
) -> subprocess.Popen[bytes]:
    argv = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-progress", "pipe:1",
            "-stats_period", "0.1", "-re"]  # fmt: skip
    if loop:
        argv += ["-stream_loop", "-1"]
    argv += ["-i", str(make_source())]
    if seconds:
        argv += ["-t", str(seconds)]
    return procs.start([*argv, "-c", "copy", "-f", "flv", url], stdout=subprocess.PIPE)


def loadgen(
    procs: Procs, url: str, players: int, window: float, server_pid: int, progress: Progress
) -> dict[str, Any]:
    argv = [sys.executable, str(HERE / "loadgen.py"), "--url", url, "--players", str(players),
            "--window", str(window), "--warmup", "3", "--uvloop"]  # fmt: skip
    p = procs.start_text(argv)
    assert p.stdout is not None
    cpu0 = cpu1 = 0.0
    t0 = t1 = 0.0
    f0 = f1 = 0
    result: dict[str, Any] = {}
    for line in p.stdout:
        line = line.strip()
        if line == "window-start":
            cpu0, t0, f0 = cpu_seconds(server_pid), time.monotonic(), progress.frames
        elif line == "window-end":
            cpu1, t1, f1 = cpu_seconds(server_pid), time.monotonic(), progress.frames
        elif line.startswith("{"):
            result = json.loads(line)
    p.wait(30)
    frames = result.pop("window_frames", [])
    published = f1 - f0
    result["published_fps"] = round(published / (t1 - t0), 2) if t1 > t0 else 0.0
    # a player keeps up when it got >= 95% of what the publisher sent in the same window
    # (the publisher itself can be starved on a busy machine, so 30 fps nominal is not the bar)
    ok = sum(1 for n in frames if published and n >= 0.95 * published)
    result["good_vs_published"] = round(ok / max(1, players), 4)
    if t1 > t0:
        core = (cpu1 - cpu0) / (t1 - t0)
        result["server_cpu_core"] = round(core, 3)
        result["cpu_per_player_pct"] = round(100 * core / max(1, players), 4)
    return result


def run_bench(args: argparse.Namespace) -> int:
    levels = [int(x) for x in args.levels.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    procs = Procs()
    try:
        servers: list[tuple[str, Any]] = [
            ("nginx-rtmp", nginx),
            ("marchproxy", lambda p, d: ours(p, d, args.flush_ms)),
        ]
        for name, server in servers:
            if args.only and name != args.only:
                continue
            with tempfile.TemporaryDirectory() as d, server(procs, Path(d)) as (port, pid):
                url = f"rtmp://127.0.0.1:{port}/live/bench"
                pub = publish(procs, url)
                progress = Progress(pub)
                time.sleep(2.0)
                rows = results.setdefault(name, [])
                for n in levels:
                    r = loadgen(procs, url, n, args.window, pid, progress)
                    r["server"] = name
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                    if r.get("good_vs_published", 0) < 0.95:
                        break
                procs.stop(pub)
    finally:
        procs.stop_all()
    print()
    print(f"{'server':12} {'N':>5} {'good/pub':>8} {'good/30':>7} {'pub fps':>7} {'fps p5':>7} "
          f"{'cpu/player %':>12} {'cores':>6} {'ttff p50':>8} {'ttff p95':>8}")  # fmt: skip
    for name, rows in results.items():
        for r in rows:
            print(f"{name:12} {r['players']:>5} {r['good_vs_published']:>8.3f} "
                  f"{r['good_fraction']:>7.3f} {r['published_fps']:>7} {r['fps_p5']:>7} "
                  f"{r.get('cpu_per_player_pct', float('nan')):>12} "
                  f"{r.get('server_cpu_core', float('nan')):>6} {r['ttff_median_ms']:>8} "
                  f"{r['ttff_p95_ms']:>8}")  # fmt: skip
    best = {
        name: max((r["players"] for r in rows if r["good_vs_published"] >= 0.95), default=0)
        for name, rows in results.items()
    }
    print("largest N with >=95% of players at >=95% of the published frame rate:", best)
    if "nginx-rtmp" in results and "marchproxy" in results:

        def at(name: str, n: int) -> dict[str, Any] | None:
            return next((r for r in results[name] if r["players"] == n), None)

        for n in levels:
            a, b = at("marchproxy", n), at("nginx-rtmp", n)
            if a and b and b.get("cpu_per_player_pct"):
                ratio = a["cpu_per_player_pct"] / b["cpu_per_player_pct"]
                ttff = f"{a['ttff_median_ms']}/{b['ttff_median_ms']}"
                print(
                    f"N={n}: cpu/player ours/nginx = {ratio:.2f}x, ttff p50 ours/nginx = {ttff} ms"
                )
    return 0


def packet_md5s(path: str | Path) -> dict[str, list[str]]:
    """MD5 of every packet's codec data per type, in order (``ffprobe -show_data_hash``)."""
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_data_hash", "MD5",
         "-show_entries", "packet=codec_type,data_hash", "-of", "csv=p=0", str(path)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    out: dict[str, list[str]] = {"video": [], "audio": []}
    for line in probe.stdout.splitlines():
        kind, _, digest = line.partition(",")
        if kind in out:
            out[kind].append(digest.removeprefix("MD5:"))
    return out


def join_index(source: list[str], first: list[str]) -> int | None:
    """Where in the source a player's first frames are (None: not found or not unique)."""
    if not first:
        return None
    hits = [i for i in range(len(source) - len(first) + 1) if source[i : i + len(first)] == first]
    return hits[0] if len(hits) == 1 else None


def check_server(name: str, server: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One finite stream on ``server``: 3 load generator players and one ffmpeg recorder wait
    for it, one of each joins in the middle (``--late-at`` s after the publish starts, mid-GOP).

    A player's expected frame count per type is what the publisher sent from the frame it
    started on: (frames the early ffmpeg recorder got) - (index of the player's first frame in
    the source, found by its MD5). Every player, ours and ffmpeg's, must be within
    ``--tolerance`` frames of that, and the load generator's first video frame a keyframe."""
    procs = Procs()
    players: dict[str, dict[str, Any]] = {}
    try:
        with tempfile.TemporaryDirectory() as d, server(procs, Path(d)) as (port, _):
            url = f"rtmp://127.0.0.1:{port}/live/check"
            lg_argv = [sys.executable, str(HERE / "loadgen.py"), "--url", url, "--until-eof",
                       "--timeout", str(args.check_seconds + 40), "--record", "4"]  # fmt: skip
            rec_argv = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-rw_timeout",
                        "30000000", "-i", url, "-c", "copy", "-f", "flv", "-y"]  # fmt: skip
            outs = {"ffmpeg": Path(d) / "early.flv", "ffmpeg-late": Path(d) / "late.flv"}
            lg = procs.start_text([*lg_argv, "--players", "3"])
            rec = procs.start([*rec_argv, str(outs["ffmpeg"])])
            time.sleep(2.0)  # the early players wait for the publisher
            pub = publish(procs, url, loop=False, seconds=args.check_seconds)
            time.sleep(args.late_at)
            lg_late = procs.start_text([*lg_argv, "--players", "1"])
            rec_late = procs.start([*rec_argv, str(outs["ffmpeg-late"])])
            pub.wait(args.check_seconds + 30)
            for label, p in (("loadgen", lg), ("loadgen-late", lg_late)):
                stdout, _ = p.communicate(timeout=60)
                res = json.loads(stdout.strip().splitlines()[-1])
                for i in range(res["players"]):
                    players[f"{label}-{i}" if label == "loadgen" else label] = {
                        "video": res["video"][i], "audio": res["audio"][i],
                        "first_key": res["first_video_key"][i],
                        "first": {"video": res["video_md5"][i], "audio": res["audio_md5"][i]},
                    }  # fmt: skip
            for recorder in (rec, rec_late):
                recorder.wait(30)
            for label, out in outs.items():
                got = packet_md5s(out)
                players[label] = {
                    "video": len(got["video"]), "audio": len(got["audio"]), "first_key": None,
                    "first": {k: v[:4] for k, v in got.items()},
                }  # fmt: skip
    finally:
        procs.stop_all()
    source = packet_md5s(make_source())
    ok = True
    total: dict[str, int] = {}
    for kind in ("video", "audio"):
        j = join_index(source[kind], players["ffmpeg"]["first"][kind])
        total[kind] = (j or 0) + players["ffmpeg"]["video" if kind == "video" else "audio"]
    rows = []
    for label, r in players.items():
        row: dict[str, Any] = {"server": name, "player": label}
        for kind in ("video", "audio"):
            j = join_index(source[kind], r["first"][kind])
            expected = None if j is None else total[kind] - j
            good = expected is not None and abs(r[kind] - expected) <= args.tolerance
            ok = ok and good
            row[kind] = r[kind]
            row[f"{kind}_expected"] = expected
            row[f"{kind}_from_frame"] = j
        if r["first_key"] is not None:
            row["first_video_key"] = r["first_key"]
            ok = ok and r["first_key"] is True
        rows.append(row)
    return {"server": name, "ok": ok, "published": total, "players": rows}


def run_check(args: argparse.Namespace) -> int:
    """The load generator's counts against ffmpeg's, on both servers; non-zero exit if off."""
    servers: list[tuple[str, Any]] = [
        ("marchproxy", ours),
        ("nginx-rtmp", lambda p, d: nginx(p, d, "publish_notify on;")),
    ]
    results = [check_server(n, srv, args) for n, srv in servers if args.only in (None, n)]
    print(f"{'server':11} {'player':14} {'video':>5} {'expect':>6} {'from':>4} "
          f"{'audio':>5} {'expect':>6} {'from':>4} {'key1st':>6}")  # fmt: skip
    for res in results:
        for r in res["players"]:
            print(f"{res['server']:11} {r['player']:14} {r['video']:>5} "
                  f"{r['video_expected']!s:>6} {r['video_from_frame']!s:>4} {r['audio']:>5} "
                  f"{r['audio_expected']!s:>6} {r['audio_from_frame']!s:>4} "
                  f"{r.get('first_video_key', '-')!s:>6}")  # fmt: skip
    print(json.dumps(results))
    bad = [r["server"] for r in results if not r["ok"]]
    if bad:
        print(f"frame counts disagree (tolerance {args.tolerance}) on: {', '.join(bad)}")
        return 1
    print(f"frame counts agree within {args.tolerance} frames on every player")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--levels", default="100,200,400,800")
    ap.add_argument("--window", type=float, default=8.0)
    ap.add_argument("--only", choices=["nginx-rtmp", "marchproxy"])
    ap.add_argument("--flush-ms", type=int, default=40, help="our flush_interval_ms")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--check-seconds", type=float, default=5.0)
    ap.add_argument("--late-at", type=float, default=2.5, help="late joiners, s after publish")
    ap.add_argument("--tolerance", type=int, default=1, help="frames a player may be off")
    args = ap.parse_args()
    sys.exit(run_check(args) if args.check else run_bench(args))


if __name__ == "__main__":
    main()
