"""Many inputs, one command: ``track`` (and ``refine``, ``render``) for every input, locally, on Ray or as a
Slurm array shard.

Each input gets ``ROOT/<name>/`` holding exactly what ``track`` writes for it alone (with ``--refine`` also
``ROOT/<name>/photometric``, what ``track --photometric`` or ``refine`` writes; with ``--render`` the overlay
beside each). The batch's own state lives
apart, in ``ROOT/.batch/<name>.json``: written when an input starts (it claims the name for its source) and
replaced, atomically and last, by its result. An input whose result says "done" with the same options is
complete and skipped; any other input is (re)run, and the jobs resume what they already can. A failing input
is recorded with a one-line reason and the others go on. ``ROOT/summary.json`` lists every input.

The engines run one input per task: in this process (``jobs == 1``), a process pool, or one Ray task per
input with its CPU and GPU request. Inputs are named and ordered before sharding, so every shard of a
Slurm array (``--shard I/N``) agrees on every name.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import multiprocessing
import os
import re
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from engine.atomic import write_json_atomic
from engine.config import to_tree
from engine.errors import UserError
from engine.smoothing import SmoothingConfig
from engine.tracker import TrackerConfig
from offline import track_job
from realtime.session import SESSION_FILE, VIDEO_FILE

if TYPE_CHECKING:
    from offline.refine_job import RefineOptions

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
STATE_DIR = ".batch"
SUMMARY_FORMAT_VERSION = 1
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})


@dataclass(frozen=True)
class BatchInput:
    """One input of the batch and the folder its outputs go to (``ROOT/name``)."""

    name: str
    source: Path  # absolute

    @property
    def is_session(self) -> bool:
        return self.source.is_dir() and (self.source / SESSION_FILE).is_file()

    @property
    def is_landmarks(self) -> bool:
        return self.source.suffix.lower() == ".npz"

    @property
    def tracked(self) -> Path:
        """What ``track`` reads: the input itself, or a session's video."""
        return self.source / VIDEO_FILE if self.is_session else self.source


@dataclass(frozen=True)
class JobOptions:
    """How each input is processed; the part in ``fingerprint`` decides whether an earlier result still counts."""

    models_dir: Path
    landmarker_task: Path | None
    flame: str | None  # a FLAME folder, "demo", or None for the models folder's choice
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    smoothing: SmoothingConfig | None = field(default_factory=SmoothingConfig)  # None: the per-frame fits
    save_vertices: bool = False
    overwrite: bool = False  # replace results of an input tracked with other options (track --overwrite)
    refine: RefineOptions | None = None  # None: no photometric refinement
    render: bool = False  # draw each fit over its input beside it (track --render)
    threads: int = 1  # PyTorch threads per input

    def fingerprint(self) -> dict[str, object]:
        return _plain({"flame": self.flame, **self.config_tree(), "save_vertices": self.save_vertices, "render": self.render})

    def config_tree(self) -> dict[str, object]:
        """How each input is made, as ``batch --config`` (and ``track --config``) read it."""
        tree = track_job.tracking_config_tree(track_job.TrackOptions(self.tracker, smoothing=self.smoothing))
        return tree if self.refine is None else {**tree, "refine": to_tree(self.refine)}


@dataclass
class InputResult:
    """One line of the summary."""

    name: str
    source: str
    status: str  # done | skipped (done by an earlier run) | failed | pending (not run: interrupted, other shard);
    # in a record, also running (started, not finished)
    frames: int = 0
    valid_fraction: float | None = None
    seconds: float = 0.0
    reason: str = ""
    options: dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- planning


def expand_inputs(arguments: list[str]) -> list[Path]:
    """Videos, image folders, sessions and landmark files from paths, globs and list files (one per line).

    Paths inside a list file are relative to the list file's folder. An input given twice is kept once.
    """
    found: list[Path] = []
    for argument in arguments:
        for path in _expand_one(argument):
            if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
                found.extend(_read_list_file(path))
            else:
                found.append(path)
    unique: dict[Path, None] = {}
    for path in found:
        resolved = path.resolve()
        if resolved in unique:
            log.warning("%s is listed more than once; it is processed once", path)
        unique[resolved] = None
    if not unique:
        raise UserError("no inputs: give videos, image folders, recorded sessions, landmark .npz files, globs or a list file")
    return list(unique)


def _expand_one(argument: str, relative_to: Path | None = None) -> list[Path]:
    path = Path(argument).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.exists():
        return [path]
    if glob.has_magic(str(path)):
        matches = sorted(Path(match) for match in glob.glob(str(path), recursive=True))
        if matches:
            return matches
        raise UserError(f"{argument} matches nothing; check the pattern (quote it so that your shell leaves it to batch)")
    raise UserError(f"{argument} does not exist: give a video, an image folder, a recorded session, a landmarks .npz or a list file")


def _read_list_file(path: Path) -> list[Path]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"list file {path} cannot be read ({error})") from None
    entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not entries:
        raise UserError(f"list file {path} names no inputs (one path or glob per line; # starts a comment)")
    paths: list[Path] = []
    for entry in entries:
        paths.extend(_expand_one(entry, relative_to=path.parent))
    return paths


def assign_names(sources: list[Path], root: Path) -> list[BatchInput]:
    """Give every input its folder name: the file or folder name, made unique without ever taking a folder
    that holds another source's results (the later input gets a suffix from its path's hash)."""
    taken: set[str] = set()
    inputs: list[BatchInput] = []
    for source in sources:
        base = _safe_name(source.stem if source.is_file() else source.name)
        for name in (base, f"{base}-{hashlib.sha256(str(source).encode()).hexdigest()[:8]}"):
            if name not in taken and _folder_is_free_for(root, name, source):
                break
        else:
            raise UserError(f"no free output folder for {source} under {root}: {base} and {name} hold other results")
        taken.add(name)
        inputs.append(BatchInput(name, source))
    return inputs


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "input"


def _folder_is_free_for(root: Path, name: str, source: Path) -> bool:
    """Free: absent or empty, or already this source's (its batch record says so, or ``track`` wrote it for
    this input, which the batch then continues or skips as its own)."""
    record = read_record(root, name)
    if record is not None:
        return record.get("source") == str(source)
    folder = root / name
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return True
    job = _read_json(folder / track_job.JOB_FILE)
    return job is not None and job.get("source") == str(BatchInput(name, source).tracked)


def shard(inputs: list[BatchInput], index: int, count: int) -> list[BatchInput]:
    """Every ``count``-th input, starting at ``index``: the shards together cover each input exactly once."""
    return inputs[index::count]


def prepare_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file; give a folder (it is created if needed)")
    try:
        (root / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {root}: cannot create the output folder ({error.strerror})") from None
    if not os.access(root, os.W_OK):
        raise UserError(f"--out {root} is not writable; choose a folder you can write to")


# ---------------------------------------------------------------------------------------------- records


def _record_path(root: Path, name: str) -> Path:
    return root / STATE_DIR / f"{name}.json"


def read_record(root: Path, name: str) -> dict | None:
    return _read_json(_record_path(root, name))


def _read_json(path: Path) -> dict | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _write_record(root: Path, result: InputResult) -> None:
    write_json_atomic(_record_path(root, result.name), asdict(result))


def input_is_complete(root: Path, item: BatchInput, options: JobOptions) -> bool:
    """Done earlier with the same options, and its outputs are still there."""
    record = read_record(root, item.name)
    if record is None or record.get("status") != "done" or record.get("source") != str(item.source):
        return False
    if record.get("options") != options.fingerprint():
        return False
    overlays = (track_job.OVERLAY_VIDEO, track_job.OVERLAY_IMAGE)
    return all(
        track_job.is_complete(folder) and (not options.render or any((folder / name).is_file() for name in overlays))
        for folder in _result_folders(root / item.name, options)
    )


def _result_folders(out_dir: Path, options: JobOptions) -> list[Path]:
    """The folders a job writes: the track, and with refinement its photometric folder (each with meta.json)."""
    return [out_dir] + ([out_dir / track_job.PHOTOMETRIC_DIR] if options.refine is not None else [])


def _plain(value: object) -> object:
    """JSON's view of a value (tuples become lists, paths strings), so fingerprints compare with stored ones."""
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------------- one input


def process_input(item: BatchInput, root: Path, options: JobOptions) -> InputResult:
    """Track (and refine) one input into ``root/item.name``; never raises for a bad input, only records it."""
    import torch

    torch.set_num_threads(options.threads)
    started = time.perf_counter()
    fingerprint = options.fingerprint()
    _write_record(root, InputResult(item.name, str(item.source), "running", options=fingerprint))
    try:
        frames, valid = _track_and_refine(item, root / item.name, options)
        result = InputResult(item.name, str(item.source), "done", frames, valid / frames, options=fingerprint)
    except UserError as error:
        result = InputResult(item.name, str(item.source), "failed", reason=_one_line(str(error)), options=fingerprint)
    except Exception as error:  # noqa: BLE001 - one broken input must not end the batch; its reason is kept
        log.debug("%s failed:\n%s", item.source, traceback.format_exc())
        result = InputResult(item.name, str(item.source), "failed", reason=_one_line(f"{type(error).__name__}: {error}"), options=fingerprint)
    result.seconds = round(time.perf_counter() - started, 3)
    _write_record(root, result)  # the marker: written last, atomically
    return result


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"


def _track_and_refine(item: BatchInput, out_dir: Path, options: JobOptions) -> tuple[int, int]:
    """What ``track INPUT --out DIR`` (with ``--photometric``) or, for a session, ``refine`` does; (frames, valid)."""
    from engine.model_selection import select_head_model
    from engine.tracker import Tracker
    from offline.refine_job import TEXTURE_COMPONENTS

    if (options.refine is not None or options.render) and item.is_landmarks:
        raise UserError("--refine and --render need the video or images themselves, not a landmarks file")
    source = item.tracked
    # As track does: an unreadable input fails here, in one line, before its output folder is made.
    if item.is_landmarks:
        track_job.load_landmark_file(source)
    else:
        from realtime.sources import open_source

        open_source(str(source), realtime=False).stop()
    head = select_head_model(options.flame, options.models_dir, n_tex=TEXTURE_COMPONENTS if options.refine else 0)
    track_options = track_job.TrackOptions(
        options.tracker, options.save_vertices, options.smoothing, overwrite=options.overwrite, progress=False
    )
    tracked = track_job.track_input(source, out_dir, head, None if item.is_landmarks else options.landmarker_task, track_options)
    if options.refine is not None:
        from offline.refine_job import refine_session, refine_video

        if item.is_session:

            def tracker_factory(image_size: tuple[int, int], n_shape: int, n_exp: int, known_fov_deg: float | None) -> Tracker:
                config = replace(options.tracker, n_shape=n_shape, n_exp=n_exp, fov_deg=known_fov_deg, fit_fov=known_fov_deg is None)
                return Tracker(head, image_size, config)

            refine_session(item.source, tracker_factory, out_dir / track_job.PHOTOMETRIC_DIR, options.landmarker_task, options.refine, progress=False)
        else:
            mp478 = tracked.sequence.mp478
            refine_video(str(source), tracked.tracker, tracked.results, mp478, out_dir / track_job.PHOTOMETRIC_DIR, options.refine, progress=False)
    if options.render:
        from offline.render_job import render_beside

        for folder in _result_folders(out_dir, options):
            render_beside(folder, source, head, single_image=len(tracked.results) == 1, progress=False)
    return len(tracked.results), tracked.valid_frames


# ---------------------------------------------------------------------------------------------- engines


#: Set in a pool worker: the batch was interrupted, so inputs still queued are not started.
_batch_stopped: EventType | None = None


def _worker_init(threads: int, stopped: EventType) -> None:
    import torch

    global _batch_stopped
    _batch_stopped = stopped
    torch.set_num_threads(threads)


def _pool_task(item: BatchInput, root: Path, options: JobOptions) -> InputResult | None:
    """process_input in a pool worker, unless the batch was interrupted before this input started (None)."""
    if _batch_stopped is not None and _batch_stopped.is_set():
        return None
    return process_input(item, root, options)


def run_inline(items: list[BatchInput], root: Path, options: JobOptions) -> Iterator[InputResult]:
    for item in items:
        yield process_input(item, root, options)


def run_pool(items: list[BatchInput], root: Path, options: JobOptions, jobs: int) -> Iterator[InputResult]:
    """A process pool; an input whose worker dies (a crash in a native library, the OOM killer) is tried once
    more in a fresh pool, then recorded as failed, and the inputs it took down with it run again."""
    # spawn: MediaPipe and PyTorch hold threads that a forked child would inherit in an undefined state.
    context = multiprocessing.get_context("spawn")
    queue, crashes = list(items), dict.fromkeys((item.name for item in items), 0)
    stopped = context.Event()
    while queue:
        attempt_started = time.time()
        pool = ProcessPoolExecutor(min(jobs, len(queue)), context, initializer=_worker_init, initargs=(options.threads, stopped))
        try:
            futures = {pool.submit(_pool_task, item, root, options): item for item in queue}
            queue = []
            for future in as_completed(futures):
                item = futures[future]
                try:
                    result = future.result()
                    if result is not None:
                        yield result
                except BrokenProcessPool:
                    log.warning("a worker process died (%s was among the inputs in its pool); running the unfinished inputs again", item.name)
                    if not _started_since(root, item, attempt_started):
                        queue.append(item)  # never started: it only lost its pool
                        continue
                    crashes[item.name] += 1
                    if crashes[item.name] < 2:
                        queue.append(item)
                    else:
                        yield _record_failure(root, item, options, "its worker process died twice (a crash in a native library, or out of memory)")
        except BaseException:
            # Ctrl-C or an error: queued inputs never start; running ones end with their input (or at once,
            # when the Ctrl-C reached the workers too), their files atomic and their records saying so.
            stopped.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()


def _started_since(root: Path, item: BatchInput, moment: float) -> bool:
    try:
        return _record_path(root, item.name).stat().st_mtime >= moment
    except OSError:
        return False


def _record_failure(root: Path, item: BatchInput, options: JobOptions, reason: str) -> InputResult:
    """The record of an input whose job could not report itself (its process died)."""
    result = InputResult(item.name, str(item.source), "failed", reason=reason, options=options.fingerprint())
    _write_record(root, result)
    return result


@dataclass(frozen=True)
class RayOptions:
    address: str | None  # None: a local Ray started for this run
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0
    local_cpus: int | None = None  # the local Ray's CPUs (None: all of this machine's)


def run_ray(items: list[BatchInput], root: Path, options: JobOptions, ray_options: RayOptions) -> Iterator[InputResult]:
    """One Ray task per input with its CPU/GPU request; results as they finish."""
    ray = _connect_ray(ray_options)
    pending: list = []
    try:
        task = ray.remote(process_input).options(num_cpus=ray_options.cpus_per_job, num_gpus=ray_options.gpus_per_job)
        inputs = {task.remote(item, root, options): item for item in items}
        pending = list(inputs)
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            try:
                yield ray.get(finished[0])
            except ray.exceptions.RayError as error:  # the task's worker or node died, after Ray's own retries
                yield _record_failure(root, inputs[finished[0]], options, f"Ray task failed: {_one_line(str(error))[:300]}")
    finally:
        for reference in pending:  # left only when interrupted: stop the tasks still queued or running
            ray.cancel(reference, force=True)
        ray.shutdown()


def _connect_ray(ray_options: RayOptions):
    address = ray_options.address
    ray = import_ray(address)
    # A local Ray gets no dashboard; a cluster's settings are its own. Workers' output stays in Ray's logs.
    local = {"num_cpus": ray_options.local_cpus, "include_dashboard": False} if address is None else {}
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, **local)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UserError(f"--ray {address or ''}: could not start or join Ray ({_one_line(str(error))})") from None
    return ray


def import_ray(address: str | None):
    """Ray, once it is known to be installed and, for an address, that something listens there.

    Fails in one line, at once (Ray itself retries an unreachable address for a minute).
    """
    try:
        import ray
    except ImportError:
        raise UserError('--ray needs Ray: pip install -e ".[cluster]" (or pip install "ray[default]")') from None
    if address not in (None, "auto"):
        _check_reachable(address)
    return ray


def _check_reachable(address: str) -> None:
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray {address}: expected HOST:PORT (e.g. 10.0.0.5:6379, or ray://HOST:10001), or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=5.0).close()
    except OSError as error:
        raise UserError(
            f"--ray {address}: no Ray cluster answers there ({error.strerror or error}); start one with "
            "'ray start --head' or check the address"
        ) from None


# ---------------------------------------------------------------------------------------------- the batch


@dataclass(frozen=True)
class BatchPlan:
    root: Path
    inputs: list[BatchInput]  # every input, named, in order
    mine: list[BatchInput]  # this shard's


def plan_batch(arguments: list[str], root: Path, shard_index: int = 0, shard_count: int = 1) -> BatchPlan:
    """Everything checked before any work: the inputs, their names, the output root; this shard's inputs."""
    sources = expand_inputs(arguments)
    prepare_root(root)
    inputs = assign_names(sources, root)
    return BatchPlan(root, inputs, shard(inputs, shard_index, shard_count))


@dataclass
class BatchOutcome:
    lines: list[InputResult]  # every input of the batch, in input order
    wall_seconds: float  # this run's


def run_batch(
    plan: BatchPlan, options: JobOptions, engine: Callable[[list[BatchInput]], Iterator[InputResult]]
) -> BatchOutcome:
    """Run this shard's incomplete inputs on ``engine`` and write ``summary.json``.

    Interrupted (Ctrl-C), the summary is still written (unfinished inputs are "pending") before re-raising.
    """
    todo = [item for item in plan.mine if not input_is_complete(plan.root, item, options)]
    results: dict[str, InputResult] = {}
    started = time.perf_counter()
    if not todo:
        print(f"all {len(plan.mine)} inputs are already complete in {plan.root}: nothing to do")
        return BatchOutcome(write_summary(plan, options, results, set()), 0.0)
    skipped = len(plan.mine) - len(todo)
    if skipped:
        print(f"{skipped} of {len(plan.mine)} inputs are already complete and skipped")
    try:
        with tqdm(total=len(todo), desc="batch", unit="input") as bar, closing(engine(todo)) as finished:
            for result in finished:
                results[result.name] = result
                bar.set_postfix(frames=sum(r.frames for r in results.values()), failed=sum(r.status == "failed" for r in results.values()))
                bar.update()
    except BaseException:
        write_summary(plan, options, results, {item.name for item in todo})
        raise
    return BatchOutcome(write_summary(plan, options, results, {item.name for item in todo}), time.perf_counter() - started)


def write_summary(plan: BatchPlan, options: JobOptions, fresh: dict[str, InputResult], attempted: set[str]) -> list[InputResult]:
    """``ROOT/summary.json`` over every input of the batch (all shards): this run's results, earlier ones, pending."""
    lines = [fresh.get(item.name) or _recorded_result(plan.root, item, options, item.name in attempted) for item in plan.inputs]
    done = [line for line in lines if line.status in ("done", "skipped")]
    frames = sum(line.frames for line in done)
    document = {
        "format": "flame-live batch summary",
        "format_version": SUMMARY_FORMAT_VERSION,
        "root": str(plan.root),
        "options": options.fingerprint(),
        "config": options.config_tree(),
        "counts": {status: sum(line.status == status for line in lines) for status in ("done", "skipped", "failed", "pending")},
        "frames": frames,
        "inputs": [{key: value for key, value in asdict(line).items() if key != "options"} for line in lines],
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(plan.root / SUMMARY_FILE, document)
    return lines


def _recorded_result(root: Path, item: BatchInput, options: JobOptions, attempted: bool) -> InputResult:
    """An input's line from its record: one this run did not hear back from (another shard's, an earlier run's,
    or one whose worker finished just as the run was interrupted)."""
    record = read_record(root, item.name) or {}
    if input_is_complete(root, item, options):
        status = "done" if attempted else "skipped"
    elif record.get("status") == "failed" and record.get("options") == options.fingerprint():
        status = "failed"
    else:
        return InputResult(item.name, str(item.source), "pending")
    known = {key: record[key] for key in ("frames", "valid_fraction", "seconds", "reason") if key in record}
    return InputResult(item.name, str(item.source), status, **known)


def summary_table(outcome: BatchOutcome, mine: list[BatchInput]) -> str:
    """The printed table: this shard's inputs, then the totals with this run's frames per second."""
    names = {item.name for item in mine}
    rows = [line for line in outcome.lines if line.name in names]
    header = ("input", "status", "frames", "valid", "seconds", "reason")
    table = [header] + [
        (
            line.name,
            line.status,
            str(line.frames) if line.status != "pending" else "",
            f"{line.valid_fraction:.0%}" if line.valid_fraction is not None else "",
            f"{line.seconds:.1f}" if line.status != "pending" else "",
            line.reason,
        )
        for line in rows
    ]
    widths = [max(len(row[column]) for row in table) for column in range(len(header) - 1)]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in table]
    frames = sum(line.frames for line in rows if line.status == "done")
    seconds = outcome.wall_seconds
    counts = ", ".join(f"{sum(line.status == s for line in rows)} {s}" for s in ("done", "skipped", "failed", "pending"))
    rate = f"; this run: {frames} frames in {seconds:.1f} s ({frames / seconds:.1f} frames/s)" if seconds > 0 else ""
    text.append(f"{len(rows)} inputs: {counts}{rate}")
    return "\n".join(line.rstrip() for line in text)


def describe_plan(plan: BatchPlan, options: JobOptions) -> str:
    """``--dry-run``: this shard's inputs, their folders and whether they are complete."""
    lines = [f"{item.name}\t{'complete' if input_is_complete(plan.root, item, options) else 'to do'}\t{item.source}" for item in plan.mine]
    return "\n".join(lines + [f"{len(plan.mine)} of {len(plan.inputs)} inputs in this shard"])


def exit_status(outcome: BatchOutcome, mine: list[BatchInput]) -> int:
    """0 when every input of this shard succeeded, 1 when any failed."""
    names = {item.name for item in mine}
    return 1 if any(line.status == "failed" for line in outcome.lines if line.name in names) else 0


def default_jobs(threads: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, threads))
