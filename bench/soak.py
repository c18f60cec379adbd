#!/usr/bin/env python3
"""Soak test for tcplb (not in CI): mixed load with random backend failures.

Runs tcplb (release build) in front of three echo backends on loopback for
--duration seconds (default 600) while clients stream random payloads and a
random backend is killed and restarted every few seconds. Every 10 s it prints
connections, errors, RSS and open file descriptors; at the end it checks that
no stream was corrupted, no connect was refused, and that RSS and fd counts
are flat. Exit code 0 when all holds.

    python3 bench/soak.py --duration 600 --clients 64
"""
import argparse
import asyncio
import hashlib
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Backend:
    """An echo server that can be killed (closing its connections) and restarted."""

    def __init__(self, port):
        self.port = port
        self.server = None
        self.writers = set()

    async def handle(self, reader, writer):
        self.writers.add(writer)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def start(self):
        while True:
            try:
                self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port, reuse_address=True)
                return
            except OSError:
                await asyncio.sleep(0.05)

    async def kill(self):
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def proc_stats(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


async def client(lb_port, stats, stop):
    while not stop.is_set():
        size = random.choice([1024, 16 * 1024, 256 * 1024, 1024 * 1024])
        payload = os.urandom(size)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", lb_port)
        except OSError:
            stats["refused"] += 1
            await asyncio.sleep(0.05)
            continue

        async def send():
            try:
                for i in range(0, size, 16384):
                    writer.write(payload[i:i + 16384])
                    await writer.drain()
                writer.write_eof()
            except (ConnectionError, OSError):
                pass  # the read side reports the cut

        sender = asyncio.ensure_future(send())
        got = bytearray()
        complete = False
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), 30)
                if not chunk:
                    complete = True
                    break
                got += chunk
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
        if bytes(got) != payload[:len(got)]:
            stats["corrupt"] += 1
        elif complete and len(got) == size:
            stats["ok"] += 1
        else:
            stats["cut"] += 1


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=600)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/tcplb"))
    args = ap.parse_args()
    if not os.path.exists(args.binary):
        subprocess.run(["cargo", "build", "--release"], cwd=ROOT, check=True)

    backends = [Backend(free_port()) for _ in range(3)]
    for b in backends:
        await b.start()
    lb_port = free_port()
    cmd = [args.binary, "--listen", f"127.0.0.1:{lb_port}", "--access-log", "off",
           "--health-interval", "500ms", "--rise", "1", "--fall", "2"]
    for b in backends:
        cmd += ["--upstream", f"127.0.0.1:{b.port}"]
    lb = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    stats = {"ok": 0, "cut": 0, "corrupt": 0, "refused": 0}
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(client(lb_port, stats, stop)) for _ in range(args.clients)]
    samples = []
    start = time.time()
    next_kill = start + random.uniform(2, 5)
    next_sample = start
    print(f"{'t(s)':>6} {'ok':>8} {'cut':>6} {'corrupt':>8} {'refused':>8} {'RSS KiB':>9} {'fds':>5}")
    try:
        while time.time() - start < args.duration:
            await asyncio.sleep(0.2)
            now = time.time()
            if now >= next_kill:
                b = random.choice(backends)
                await b.kill()
                await asyncio.sleep(random.uniform(0.1, 1.0))
                await b.start()
                next_kill = now + random.uniform(2, 5)
            if now >= next_sample:
                rss, fds = proc_stats(lb.pid)
                samples.append((now - start, rss, fds))
                print(f"{now - start:6.0f} {stats['ok']:8} {stats['cut']:6} {stats['corrupt']:8} {stats['refused']:8} {rss:9} {fds:5}", flush=True)
                next_sample = now + 10
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(3)
    rss_end, fds_end = proc_stats(lb.pid)
    lb.terminate()
    lb.wait(timeout=40)
    # Flat: after the first minute, RSS stays within 25% (+4 MiB) of its median,
    # and once idle the fd count is back to its idle baseline.
    steady = [s[1] for s in samples if s[0] >= min(60, args.duration / 3)] or [samples[-1][1]]
    median = sorted(steady)[len(steady) // 2]
    problems = []
    if stats["corrupt"]:
        problems.append(f"{stats['corrupt']} corrupted streams")
    if stats["refused"]:
        problems.append(f"{stats['refused']} refused connects")
    if max(steady) > median * 1.25 + 4096:
        problems.append(f"RSS not flat: median {median} KiB, max {max(steady)} KiB")
    if fds_end > 30:
        problems.append(f"{fds_end} fds open when idle")
    print(f"end: ok={stats['ok']} cut={stats['cut']} idle RSS={rss_end} KiB idle fds={fds_end}")
    if problems:
        print("FAIL: " + "; ".join(problems))
        return 1
    print("PASS: no corruption, no refused connect, RSS and fds flat")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
