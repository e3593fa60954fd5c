"""The dataset job: render N seeded random avatars (RGB + label map + vector) into a folder.

Layout of a dataset folder::

    manifest.json           pack id and schema, seed, count, resolution, engine, versions
    images/000123.png       RGB
    masks/000123.png        uint8 label map, CelebAMask-HQ class ids
    vectors/000123.json     {"index", "seed", "vector": <JSON form>, "continuous", "discrete", ...}

Sample i is complete when its vector JSON reads and the image and mask have the byte sizes it
records: image and mask are written first, each to a hidden temp file renamed into place, and the
vector record (with the sizes) last, so a run killed at any moment leaves no half-written file and a
rerun renders only what is missing -- including a sample whose PNG something else truncated or
replaced (records of older datasets, without sizes, are checked for a PNG's final IEND chunk).
Sample i's vector depends only on (pack, seed, i), so shards (i % K == I) of a job array together
equal the unsharded job.

Worker processes die with the process that started them: on Linux the kernel kills them when it
dies (``PR_SET_PDEATHSIG``), everywhere a watchdog thread exits when the parent's sentinel closes,
Ctrl-C and SIGTERM stop them at once, and each holds a lock that a rerun checks, so a rerun never
renders beside a stray worker.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..backend.errors import UserError
from ..backend.png import encode_png
from ..backend.progress import Progress
from ..backend.schema import Pack, find_pack

MANIFEST = "manifest.json"
# Fields that must agree between runs writing into one folder.
JOB_KEYS = ("pack", "schema", "seed", "count", "resolution", "jitter", "engine")
MIN_RES, MAX_RES = 64, 1024
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"      # the last 12 bytes of every PNG
STRAY_WORKER_WAIT = 10.0            # seconds a rerun waits for an earlier run's worker to die


def check_resolution(value: int, flag: str = "--resolution") -> int:
    """The one rule for every rendered size (render, create, apply)."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_RES <= value <= MAX_RES:
        raise UserError(f"{flag} must be between {MIN_RES} and {MAX_RES} pixels (got {value})")
    return value


@dataclass(frozen=True)
class Job:
    pack: Pack
    out: Path
    count: int
    seed: int = 0
    resolution: int = 256
    jitter: bool = False
    engine: str = "workbench"

    @property
    def width(self) -> int:
        return max(6, len(str(self.count - 1)))

    def name(self, index: int) -> str:
        return f"{index:0{self.width}d}"

    def paths(self, index: int) -> tuple[Path, Path, Path]:
        n = self.name(index)
        return (self.out / "images" / f"{n}.png", self.out / "masks" / f"{n}.png",
                self.out / "vectors" / f"{n}.json")

    def is_complete(self, index: int) -> bool:
        return sample_ok(*self.paths(index))

    def jitter_seed(self, index: int) -> int | None:
        return (self.seed * 1_000_003 + index) % (2**31) if self.jitter else None

    def manifest(self) -> dict:
        from .. import __version__
        from .packs import ENGINE_VERSION
        return {
            "pack": self.pack.id, "pack_version": self.pack.version,
            "schema": self.pack.schema_hash, "seed": self.seed, "count": self.count,
            "resolution": self.resolution, "jitter": self.jitter, "engine": self.engine,
            "engine_version": ENGINE_VERSION, "likeness_version": __version__,
            "classes": "celebamask-hq-19",
            "layout": {"images": "images/{index}.png", "masks": "masks/{index}.png",
                       "vectors": "vectors/{index}.json", "index_width": self.width},
        }


def _png_ends(path: Path, size: int) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, size - len(PNG_END)))
            return f.read() == PNG_END
    except OSError:
        return False


def sample_ok(img: Path, mask: Path, vec: Path) -> bool:
    """The three files exist, the vector record reads, and image and mask have the byte sizes it
    records (or, for a record without sizes, end like a PNG)."""
    try:
        record = json.loads(vec.read_bytes())
        sizes = [img.stat().st_size, mask.stat().st_size]
    except (OSError, ValueError):
        return False
    files = record.get("files") if isinstance(record, dict) else None
    if isinstance(files, dict) and "image" in files and "mask" in files:
        return sizes == [files["image"], files["mask"]]
    return all(_png_ends(p, n) for p, n in zip((img, mask), sizes))


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, k = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise UserError(f"--shard must look like I/K (e.g. 0/4), got '{text}'") from None
    if k < 1 or not 0 <= i < k:
        raise UserError(f"--shard {text}: need 0 <= I < K")
    return i, k


def shard_indices(count: int, shard: tuple[int, int]) -> list[int]:
    i, k = shard
    return list(range(i, count, k))


# ---- writing files safely ----------------------------------------------------------------------

def atomic_write(path: Path, data: bytes):
    """Write to a hidden temp file in the same folder, fsync-free rename into place."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if e.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing {path}; completed samples are kept, "
                            "free some space and run the same command again to resume") from None
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def _prepare_folder(job: Job):
    try:
        for sub in ("images", "masks", "vectors", ".locks"):
            (job.out / sub).mkdir(parents=True, exist_ok=True)
        probe = job.out / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output folder {job.out} is not writable: {e.strerror}") from None
    wanted = job.manifest()
    path = job.out / MANIFEST
    if path.is_file():
        try:
            have = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is unreadable ({e}); move it away to start a new dataset") from None
        diff = [f"{k}: folder has {have.get(k)!r}, this run wants {wanted[k]!r}"
                for k in JOB_KEYS if have.get(k) != wanted[k]]
        if diff:
            raise UserError(f"{job.out} holds another dataset job; use another --out or the same "
                            "settings:\n  " + "\n  ".join(diff))
    else:
        atomic_write(path, json.dumps(wanted, indent=2).encode())


def _try_lock(f) -> bool:
    """An exclusive, non-blocking lock on the open file ``f``; False when another process has it."""
    if os.name == "nt":
        import msvcrt
        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlock(f):
    if os.name == "nt":
        import msvcrt
        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        except OSError:
            pass
    else:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_UN)


def _lock_name(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]}-of-{shard[1]}"


@contextmanager
def _shard_lock(job: Job, shard: tuple[int, int]):
    path = job.out / ".locks" / f"{_lock_name(shard)}.lock"
    f = open(path, "a+")
    if not _try_lock(f):
        f.close()
        raise UserError(f"another run is already writing shard {shard[0]}/{shard[1]} into "
                        f"{job.out}; wait for it or stop it") from None
    try:
        _wait_for_stray_workers(job, shard)
        yield
    finally:
        _unlock(f)
        f.close()


def _wait_for_stray_workers(job: Job, shard: tuple[int, int]):
    """Every render worker holds ``.locks/<shard>.worker-N.lock`` while it runs: one still held
    belongs to a worker of an earlier run whose parent is gone (it should die within a second)."""
    deadline = time.monotonic() + STRAY_WORKER_WAIT
    for path in sorted((job.out / ".locks").glob(f"{_lock_name(shard)}.worker-*.lock")):
        with open(path, "a+") as f:
            while not _try_lock(f):
                if time.monotonic() > deadline:
                    f.seek(0)
                    pid = f.read().strip() or "?"
                    raise UserError(f"a render worker of an earlier run (pid {pid}) is still writing "
                                    f"shard {shard[0]}/{shard[1]} of {job.out}; stop it, then run "
                                    "the same command again")
                time.sleep(0.2)
            _unlock(f)


def _die_with_parent():
    """In a worker: end this process when the parent ends, however it ends."""
    import multiprocessing
    import threading
    parent = multiprocessing.parent_process()
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)          # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if parent is None:
        return
    if not parent.is_alive():
        os._exit(1)

    def watch():
        from multiprocessing.connection import wait
        wait([parent.sentinel])
        os._exit(1)
    threading.Thread(target=watch, name="likeness-parent-watchdog", daemon=True).start()


def _remove_stale_temps(job: Job, indices: list[int]):
    names = {job.name(i) for i in indices}
    for sub in ("images", "masks", "vectors"):
        for p in (job.out / sub).glob(".tmp-*"):
            stem = p.name[5:].split(".")[0]
            if stem in names:
                p.unlink(missing_ok=True)


# ---- rendering -------------------------------------------------------------------------------

def render_one(job: Job, index: int):
    """Apply sample ``index``'s vector, render it and write its three files (vector last)."""
    from .rig import apply_vector
    from .render import render_sample
    vector = job.pack.sample_seeded(job.seed, index)
    apply_vector(vector)
    rgb, mask = render_sample(job.pack, job.resolution, jitter_seed=job.jitter_seed(index),
                              engine=job.engine)
    img_path, mask_path, vec_path = job.paths(index)
    img_png, mask_png = encode_png(rgb), encode_png(mask)
    atomic_write(img_path, img_png)
    atomic_write(mask_path, mask_png)
    cont, disc = vector.to_arrays()
    record = {"index": index, "seed": job.seed, "vector": vector.to_json(),
              "continuous": cont, "discrete": disc, "jitter_seed": job.jitter_seed(index),
              "files": {"image": len(img_png), "mask": len(mask_png)}}
    atomic_write(vec_path, json.dumps(record).encode())


def _open_scene(job: Job):
    from .packs import open_pack_scene
    from .render import setup_render
    open_pack_scene(job.pack)
    setup_render(job.pack, job.resolution, engine=job.engine)


def _worker(pack_root: str, job_kw: dict, indices: list[int], queue, lock_path: str = ""):
    """Worker process: open the scene once, render its indices, report each completion."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C: the parent stops the workers
    lock = None
    if lock_path:
        lock = open(lock_path, "a+")
        if not _try_lock(lock):
            queue.put(("error", f"worker lock {lock_path} is held by another process"))
            return
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
    # The spawned child inherits the parent's sys.path, which bpy extended with Blender's script
    # folders; one of them holds the pure-Python half of `bpy` and would shadow the real module.
    sys.path[:] = [p for p in sys.path if f"bpy{os.sep}" not in p or p.endswith("site-packages")]
    try:
        from ..backend.schema import load_pack
        job = Job(pack=load_pack(pack_root), **job_kw)
        _open_scene(job)
        for i in indices:
            render_one(job, i)
            queue.put(("done", i))
        queue.put(("exit", None))
    except BaseException as e:  # reported to the parent, which stops the job cleanly
        queue.put(("error", f"{type(e).__name__}: {e}"))


def render_dataset(job: Job, shard: tuple[int, int] = (0, 1), workers: int = 0,
                   progress: bool = True) -> dict:
    """Render the missing samples of one shard; returns a summary dict."""
    if job.count < 1:
        raise UserError("--count must be at least 1")
    check_resolution(job.resolution)
    if job.engine not in ("workbench", "cycles"):
        raise UserError(f"unknown render engine '{job.engine}' (workbench, cycles)")
    _prepare_folder(job)
    indices = shard_indices(job.count, shard)
    t0 = time.monotonic()
    with _shard_lock(job, shard):
        _remove_stale_temps(job, indices)
        todo = [i for i in indices if not job.is_complete(i)]
        summary = {"out": str(job.out), "shard": f"{shard[0]}/{shard[1]}",
                   "shard_samples": len(indices), "already_done": len(indices) - len(todo),
                   "rendered": 0}
        if todo:
            workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
            bar = Progress(len(todo), f"render {summary['shard']}", enabled=progress)
            try:
                if workers == 1:
                    _open_scene(job)
                    for i in todo:
                        render_one(job, i)
                        summary["rendered"] += 1
                        bar.update()
                else:
                    summary["rendered"] = _render_parallel(job, todo, workers, bar, shard)
            finally:
                bar.close()
        summary["seconds"] = round(time.monotonic() - t0, 3)
        summary["complete"] = dataset_status(job.out)["complete"]
    return summary


def _render_parallel(job: Job, todo: list[int], workers: int, bar: Progress,
                     shard: tuple[int, int] = (0, 1)) -> int:
    import multiprocessing as mp
    # Build (and cache) a code-built pack once here so workers only open the cached file.
    from .packs import open_pack_scene
    open_pack_scene(job.pack)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    kw = dict(out=job.out, count=job.count, seed=job.seed, resolution=job.resolution,
              jitter=job.jitter, engine=job.engine)
    locks = [str(job.out / ".locks" / f"{_lock_name(shard)}.worker-{w}.lock") for w in range(workers)]
    procs = [ctx.Process(target=_worker, args=(str(job.pack.root), kw, todo[w::workers], queue, locks[w]),
                         daemon=True) for w in range(workers)]
    done, running, error, finished = 0, workers, None, False
    old_term = None
    if hasattr(signal, "SIGTERM") and _in_main_thread():
        def on_term(signum, frame):
            raise KeyboardInterrupt
        old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        for p in procs:
            p.start()
        while running:
            try:
                kind, payload = queue.get(timeout=5)
            except Exception:  # queue.Empty: check that workers are alive
                if not any(p.is_alive() for p in procs):
                    error = error or "a render worker died unexpectedly"
                    break
                continue
            if kind == "done":
                done += 1
                bar.update()
            elif kind == "exit":
                running -= 1
            else:
                error = payload
                break
        finished = error is None
    finally:
        for p in procs:                 # an error, Ctrl-C or SIGTERM: stop the workers now
            if not finished and p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join(timeout=30 if finished else 5)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if error:
        raise UserError(f"rendering stopped: {error}; completed samples are kept, "
                        "run the same command again to resume")
    return done


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# ---- checking a dataset ----------------------------------------------------------------------

def dataset_status(out: str | os.PathLike) -> dict:
    """What a dataset folder holds: complete samples, missing indices, stray temp files."""
    out = Path(out)
    path = out / MANIFEST
    if not path.is_file():
        raise UserError(f"{out} is not a dataset folder (no {MANIFEST})")
    man = json.loads(path.read_text())
    count, width = man["count"], man["layout"]["index_width"]
    have = {}
    for sub in ("images", "masks", "vectors"):
        have[sub] = {p.stem for p in (out / sub).glob("*") if not p.name.startswith(".")}
    names = [f"{i:0{width}d}" for i in range(count)]
    present = [n for n in names if n in have["vectors"] and n in have["images"] and n in have["masks"]]
    complete = [n for n in present if sample_ok(out / "images" / f"{n}.png", out / "masks" / f"{n}.png",
                                                out / "vectors" / f"{n}.json")]
    done = set(complete)
    damaged = sorted(set(present) - done)
    missing = [i for i, n in enumerate(names) if n not in done]
    expected = set(names)
    stray = sorted(set().union(*have.values()) - expected)
    temps = sorted(str(p.relative_to(out)) for sub in ("images", "masks", "vectors")
                   for p in (out / sub).glob(".tmp-*"))
    return {"manifest": man, "count": count, "complete_samples": len(complete),
            "missing": missing, "damaged": damaged, "stray": stray, "temp_files": temps,
            "complete": not missing and not stray}


# ---- CLI -------------------------------------------------------------------------------------

def cli_render(args) -> int:
    pack = find_pack(args.pack)
    job = Job(pack=pack, out=Path(args.out).resolve(), count=args.count, seed=args.seed,
              resolution=args.resolution, jitter=args.jitter, engine=args.engine)
    summary = render_dataset(job, parse_shard(args.shard), workers=args.workers,
                             progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


def cli_apply(args) -> int:
    from ..backend.outputs import check_output_dir, check_output_file
    from ..backend.visual import colorize_mask
    from .packs import open_pack_scene, vector_from_arg
    from .render import render_sample, setup_render
    from .rig import apply_vector
    check_resolution(args.resolution)
    pack = find_pack(args.pack)
    vector = vector_from_arg(pack, args.vector)
    out = check_output_dir(args.out)
    blend = check_output_file(args.blend, "--blend") if args.blend else None
    open_pack_scene(pack)
    setup_render(pack, args.resolution)
    apply_vector(vector)
    rgb, mask = render_sample(pack, args.resolution)
    atomic_write(out / "render.png", encode_png(rgb))
    atomic_write(out / "mask.png", encode_png(mask))
    atomic_write(out / "mask_color.png", encode_png(colorize_mask(mask)))
    atomic_write(out / "vector.json", vector.dumps(indent=2).encode())
    if blend is not None:
        import bpy
        from .render import quiet_stdout
        try:
            with quiet_stdout():
                bpy.ops.wm.save_as_mainfile(filepath=str(blend.resolve()), copy=True)
        except RuntimeError as e:
            raise UserError(f"--blend {blend}: cannot save ({str(e).strip().splitlines()[-1]})") from None
    print(out)
    return 0
