"""tools/bench-vault: the vault's throughput next to plain boto3 transfers of the same bytes, in one run.

Caches are dropped before each timed step; CPU seconds are those of the timed process and its children.
The plain transfers use boto3's own defaults (TransferConfig: 8 MiB parts, 10 threads), as a user's script
would; rpfs uses 16 MiB parts, 4 at a time (rpfs/vault/s3.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import botocore.config

REPO = Path(__file__).resolve().parent.parent.parent
MiB = 1 << 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=1.0, help="the disk image (default 1 GiB)")
    parser.add_argument("--change-percent", type=float, default=5.0, help="changed before the second backup")
    parser.add_argument("--work", default="/var/tmp/rpfs-bench-vault", help="scratch folder (removed after)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bucket = f"rpfs-bench-{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "RPFS_STORE": str(work / "store"), "RPFS_KEY_FILE": str(work / "key"),
           "RPFS_CONFIG": str(work / "etc")}
    s3 = boto3.client("s3", endpoint_url=os.environ["RPFS_S3_ENDPOINT"], region_name="us-east-1",
                      config=botocore.config.Config(s3={"addressing_style": "path"},
                                                    request_checksum_calculation="when_required",
                                                    response_checksum_validation="when_required"))
    results: dict = {"size_gib": args.size_gib}
    try:
        image = work / "disk.img"
        make_image(image, int(args.size_gib * (1 << 30)))
        rpfs(env, "init")
        rpfs(env, "backup", "vm", "--disk", f"os={image}")
        rpfs(env, "vault", "add", "bench", "--endpoint", os.environ["RPFS_S3_ENDPOINT"], "--bucket", bucket)

        push, out = timed(env, ["vault", "push", "bench", "--json"])
        pushed, inside = json.loads(out)["uploaded_bytes"], json.loads(out)["seconds"]
        results["push"] = {**push, "bytes": pushed, "mib_per_second": pushed / MiB / push["wall"],
                           "inside_seconds": inside}
        plain_file = work / "plain.bin"
        with open(plain_file, "wb") as f:   # incompressible, like the sealed blobs
            for left in range(pushed, 0, -64 * MiB):
                f.write(os.urandom(min(left, 64 * MiB)))
        upload = timed_call(lambda: s3.upload_file(str(plain_file), bucket, "plain/object"))
        results["plain_upload"] = {**upload, "bytes": pushed, "mib_per_second": pushed / MiB / upload["wall"]}

        local, _ = timed(env, ["restore", "vm", "--disk", "os", "--to", str(work / "local.img")])
        results["local_restore"] = {**local, "mib_per_second": image.stat().st_size / MiB / local["wall"]}
        (work / "local.img").unlink()
        restore, _ = timed(env, ["--vault", "bench", "restore", "vm", "--disk", "os", "--to", str(work / "r.img")])
        size = image.stat().st_size
        results["restore"] = {**restore, "bytes": size, "stored_bytes": pushed,
                              "mib_per_second": size / MiB / restore["wall"],
                              "stored_mib_per_second": pushed / MiB / restore["wall"]}
        if subprocess.run(["cmp", str(image), str(work / "r.img")]).returncode != 0:
            raise SystemExit("MISMATCH: the image restored from the vault differs")
        (work / "r.img").unlink()
        download = timed_call(lambda: s3.download_file(bucket, "plain/object", str(work / "plain.out")))
        results["plain_download"] = {**download, "bytes": pushed, "mib_per_second": pushed / MiB / download["wall"]}

        change(image, args.change_percent)
        rpfs(env, "backup", "vm", "--disk", f"os={image}")
        newest = json.loads(rpfs(env, "list", "--json"))[-1]
        new_stored = sum(d["new_stored_bytes"] for d in newest["disks"])
        incremental, out = timed(env, ["vault", "push", "bench", "--json"])
        uploaded = json.loads(out)["uploaded_bytes"]
        results["incremental_push"] = {**incremental, "uploaded_bytes": uploaded, "new_stored_bytes": new_stored,
                                       "ratio": uploaded / new_stored if new_stored else 0.0}

        for _ in range(2):   # four points, then all of them in one push to a new vault (issue 22)
            change(image, args.change_percent)
            rpfs(env, "backup", "vm", "--disk", f"os={image}")
        stored = sum(d["new_stored_bytes"] for p in json.loads(rpfs(env, "list", "--json")) for d in p["disks"])
        rpfs(env, "vault", "add", "many", "--endpoint", os.environ["RPFS_S3_ENDPOINT"], "--bucket", bucket,
             "--prefix", "many")
        first, out = timed(env, ["vault", "push", "many", "--json"])
        summary = json.loads(out)
        results["first_push_of_points"] = {**first, "points": len(summary["pushed"]),
                                           "uploaded_bytes": summary["uploaded_bytes"], "stored_bytes": stored,
                                           "ratio": summary["uploaded_bytes"] / stored if stored else 0.0}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        empty_bucket(s3, bucket)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def make_image(path: Path, size: int) -> None:
    """Half random, a quarter text-like, a quarter zeros, by 4 MiB runs (compresses like a used disk)."""
    rng = random.Random(1)
    words = b" ".join(rng.choice([b"log", b"line", b"error", b"GET", b"/index.html", b"200", b"user"])
                      for _ in range(4 * MiB // 4))[:4 * MiB]
    with open(path, "wb") as f:
        for at in range(0, size, 4 * MiB):
            kind = (at // (4 * MiB)) % 4
            f.write(os.urandom(4 * MiB) if kind < 2 else words if kind == 2 else bytes(4 * MiB))


def change(path: Path, percent: float) -> None:
    size = path.stat().st_size
    rng = random.Random(2)
    with open(path, "r+b") as f:
        for _ in range(int(size / MiB * percent / 100)):
            f.seek(rng.randrange(size // MiB) * MiB)
            f.write(os.urandom(MiB))


def rpfs(env: dict, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "rpfs", *args], env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"rpfs {' '.join(args)} failed: {done.stderr}")
    return done.stdout


def drop_caches() -> None:
    subprocess.run(["sync"])
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every core, every process: the gateway too)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def timed(env: dict, args: list[str]) -> tuple[dict, str]:
    out = ""

    def run() -> None:
        nonlocal out
        out = rpfs(env, *args)
    return measured(run, resource.RUSAGE_CHILDREN), out


def timed_call(call) -> dict:
    return measured(call, resource.RUSAGE_SELF)


def measured(call, who: int) -> dict:
    """Wall time, CPU of the process (or of the rpfs child) and busy CPU of the whole machine, caches dropped
    first. On 2 cores shared with the gateway, the machine's CPU is what bounds both sides."""
    drop_caches()
    before, busy, start = resource.getrusage(who), machine_busy(), time.monotonic()
    call()
    wall, after = time.monotonic() - start, resource.getrusage(who)
    return {"wall": wall, "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "machine_cpu": machine_busy() - busy}


def empty_bucket(s3, bucket: str) -> None:
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                s3.delete_object(Bucket=bucket, Key=item["Key"])
        s3.delete_bucket(Bucket=bucket)
    except Exception as e:   # a bench's scratch bucket: say so, do not hide the figures
        print(f"(could not remove bucket {bucket}: {e})", file=sys.stderr)


def report(r: dict) -> None:
    def line(label: str, step: dict, extra: str = "") -> None:
        print(f"  {label:<38} {step['mib_per_second']:8.0f} MiB/s  wall {step['wall']:6.2f} s  CPU {step['cpu']:6.2f} s"
              f"  machine CPU {step['machine_cpu']:5.2f} s{extra}")
    print(f"vault bench: {r['size_gib']:g} GiB image, {r['push']['bytes'] / MiB:.0f} MiB stored (sealed)")
    line("rpfs vault push", r["push"], f"  ({r['push']['inside_seconds']:.2f} s inside push(): the rest is"
                                      " starting Python, boto3 and opening the vault)")
    line("plain boto3 upload_file, same bytes", r["plain_upload"])
    line("rpfs --vault restore (image MiB/s)", r["restore"], f"  ({r['restore']['stored_mib_per_second']:.0f} MiB/s"
         " of stored bytes)")
    line("plain boto3 download_file, same bytes", r["plain_download"])
    line("rpfs restore from the local store", r["local_restore"], "  (the decoding and writing alone)")
    inc = r["incremental_push"]
    print(f"  incremental push: {inc['uploaded_bytes'] / MiB:.1f} MiB uploaded for {inc['new_stored_bytes'] / MiB:.1f}"
          f" MiB of new blocks stored ({inc['ratio']:.3f}x), {inc['wall']:.2f} s")
    many = r["first_push_of_points"]
    print(f"  first push of {many['points']} points: {many['uploaded_bytes'] / MiB:.1f} MiB uploaded for"
          f" {many['stored_bytes'] / MiB:.1f} MiB the store holds ({many['ratio']:.3f}x), {many['wall']:.2f} s")
    print("targets (issues 12, 22 and 25):")
    push = r["push"]["mib_per_second"] / r["plain_upload"]["mib_per_second"]
    restore = r["restore"]["stored_mib_per_second"] / r["plain_download"]["mib_per_second"]
    for what, ratio, ok in (("push / plain upload >= 0.80", push, push >= 0.8),
                            ("restore (stored bytes) / plain download >= 0.80", restore, restore >= 0.8),
                            ("restore (stored bytes) / plain download >= 0.60 (issue 25)", restore, restore >= 0.6),
                            ("incremental uploaded / new stored <= 1.10", inc["ratio"], inc["ratio"] <= 1.1),
                            ("first push of several points: uploaded / stored <= 1.10", many["ratio"],
                             many["ratio"] <= 1.1)):
        print(f"  {what:<61} {ratio:6.2f}  {'PASS' if ok else 'MISS'}")
    cores = os.cpu_count() or 1
    print(f"bounds on this machine ({cores} cores, the gateway on them too):")
    for what, plain, step in (("push", r["plain_upload"], r["push"]), ("restore", r["plain_download"], r["restore"])):
        best = plain["wall"] / max(plain["wall"], step["machine_cpu"] / cores)
        print(f"  {what + ' with every core busy all along (machine CPU / cores)':<61} {best:6.2f}")
    local = r["push"]["bytes"] / MiB / r["local_restore"]["wall"] / r["plain_download"]["mib_per_second"]
    print(f"  {'restore from the local store, no network (stored bytes)':<61} {local:6.2f}")


if __name__ == "__main__":
    sys.exit(main())
