#!/usr/bin/env python3
"""flame-live: real-time FLAME head tracking.

    python run_stream.py [live] --source 0            track a webcam and stream parameters (default command)
    python run_stream.py track VIDEO --out DIR        track a recorded video, images or landmarks offline
    python run_stream.py refine SESSION_DIR           photometric refinement of a recorded session
    python run_stream.py batch INPUT... --out ROOT    track (and refine) many inputs: process pool, Ray or Slurm
    python run_stream.py replay SESSION_DIR           publish a recording again with its original timing
    python run_stream.py render RESULT_DIR --out F    draw the fitted head over the input (MP4, PNG)
    python run_stream.py bench                        measure speed on this machine
    python run_stream.py models                       list the model files and where to get them
    python run_stream.py export --params F.npz ...    write a posed mesh as .obj or .ply
    python run_stream.py export --gltf OUT.glb ...    write the FLAME rig (and its animation) as glTF
    python run_stream.py config COMMAND               print a command's configuration as TOML (start of a --config FILE)
    python run_stream.py blender-addon --out Z.zip    build the Blender add-on (live link, tracking import)

Each subcommand has its own --help. Heavy imports happen inside the handlers so that --help is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cli_checks import (
    CommandLineParser,
    device,
    existing_file,
    existing_path,
    flame_model,
    float_between,
    fov_degrees,
    int_between,
    non_negative_int,
    output_dir,
    output_file,
    output_file_with_suffix,
    positive_float,
    positive_int,
    shard,
    zmq_address,
)

#: The repository's real clips, beside the repository (as the tests find them).
DEFAULT_CLIPS = Path(__file__).resolve().parent.parent / "shared" / "data" / "clips"
VIDEO_SUFFIXES = (".mp4", ".mpg", ".mpeg", ".avi", ".mov", ".mkv", ".webm", ".gif")
COMMANDS = ("live", "track", "refine", "batch", "replay", "render", "bench", "models", "export", "blender-addon", "config")
#: The commands that read a configuration (--config FILE); their trees are in command_configs.py.
CONFIGURED_COMMANDS = ("live", "track", "refine", "batch", "replay", "render", "bench")


def _common_options() -> argparse.ArgumentParser:
    common = CommandLineParser(add_help=False)
    common.add_argument(
        "--models",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder with the model files (default: $FLAME_LIVE_MODELS, else models/ beside run_stream.py)",
    )
    common.add_argument(
        "--flame",
        type=flame_model,
        default=None,
        metavar="DIR|demo",
        help="FLAME model folder, or 'demo' for the demo head built from MediaPipe's canonical face "
        "(default: the models folder when it holds generic_model.pkl, else the demo head)",
    )
    common.add_argument("--device", type=device, default=None, help="torch device: auto (CUDA when present; the default), cpu, cuda, cuda:1")
    common.add_argument(
        "--threads", type=positive_int, default=1, metavar="N",
        help="PyTorch CPU threads (default 1: each fit is small, and more threads only slow it down on a busy "
        "machine; 'bench' measures both)",
    )  # fmt: skip
    common.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="run_stream.py",
        description="Real-time FLAME head tracking: webcam/stream/video -> FLAME parameters -> ZeroMQ, OSC, VMC.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without a subcommand, 'live' runs. See 'run_stream.py COMMAND --help'.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options()
    commands = (
        _add_live, _add_track, _add_refine, _add_batch, _add_replay, _add_render, _add_bench, _add_models, _add_export,
        _add_blender_addon, _add_config,
    )  # fmt: skip
    for add in commands:
        add(subparsers, common)
    return parser


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=existing_file, default=None, metavar="FILE",
        help="configuration file (TOML: 'run_stream.py config COMMAND' prints every key), or a result's meta.json "
        "/ session.json to make it the same way again; options given on the command line override it",
    )  # fmt: skip


def _add_publisher_options(parser: argparse.ArgumentParser) -> None:
    """--zmq, --no-zmq, --osc, --vmc and --livelink, shared by live and replay."""
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--zmq", type=zmq_address, metavar="ADDR", help="ZeroMQ PUB address (default tcp://127.0.0.1:5555)")
    outputs.add_argument("--no-zmq", action="store_true", help="do not publish on ZeroMQ")
    outputs.add_argument("--osc", metavar="HOST:PORT", help="also send OSC (/flame/...) to this receiver")
    outputs.add_argument(
        "--vmc", metavar="HOST:PORT", nargs="?", const="",
        help="also send the VMC protocol (VSeeFace, EVMC4U, VMC4B); default receiver 127.0.0.1:39539",
    )  # fmt: skip
    outputs.add_argument(
        "--livelink", metavar="HOST:PORT", nargs="?", const="",
        help="also send Live Link Face packets (Unreal's Apple ARKit Face Support, MetaHumans); "
        "default receiver 127.0.0.1:11111",
    )  # fmt: skip


def _add_live(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    live = subparsers.add_parser(
        "live",
        parents=[common],
        help="track a camera, stream or file live (default)",
        description="Track faces live and publish FLAME parameters (ZeroMQ by default, OSC and VMC on request). "
        "Ctrl-C stops cleanly; kill -USR1 PID recalibrates identity and field of view from the next frames.",
    )
    live.add_argument("--source", default="0", metavar="0|rtsp://...|FILE|DIR", help="camera index, stream URL, "
                      "video or image file, or folder of images (default: camera 0)")  # fmt: skip
    live.add_argument("--list-cameras", action="store_true", help="list the cameras that work and exit")
    live.add_argument("--fov", type=fov_degrees, metavar="DEG", help="known vertical field of view (default: estimated)")
    timing = live.add_mutually_exclusive_group()
    timing.add_argument("--realtime", dest="realtime", action="store_true", default=True,
                        help="play files at their own rate, dropping frames there is no time for (default)")  # fmt: skip
    timing.add_argument("--as-fast-as-possible", dest="realtime", action="store_false",
                        help="track every frame of a file, as fast as this machine can")  # fmt: skip
    live.add_argument("--max-frames", type=positive_int, metavar="N", help="stop after N processed frames")
    live.add_argument("--landmarks", action="store_true", default=None, help="include MediaPipe's 478 landmarks in frame messages")
    live.add_argument("--record", type=output_dir, metavar="DIR", help="record the video and every published message here")
    live.add_argument("--overwrite", action="store_true", help="replace a session already recorded in --record DIR")
    live.add_argument("--preview", action="store_true", default=None, help="show the fitted mesh over the frames, with fps, latency and "
                      "calibration state (keys: m mesh/landmarks/both, r recalibrate, q or Esc quit)")  # fmt: skip
    live.add_argument(
        "--refine", action="store_true", default=None,
        help="refine identity, texture and light photometrically from keyframes in the background (adopted live)",
    )
    live.add_argument("--open-timeout", type=positive_float, default=None, metavar="S",
                      help="seconds to wait for a network stream to open (default 5)")  # fmt: skip
    live.add_argument("--reconnect-attempts", type=non_negative_int, default=None, metavar="N",
                      help="times a dropped network stream is reopened before live gives up with exit status 1 (default 5)")  # fmt: skip
    _add_publisher_options(live)
    _add_config_option(live)
    live.set_defaults(handler=_run_live)


def _run_live(args: argparse.Namespace) -> int:
    import threading

    from command_configs import command_config
    from realtime.live import LiveOptions, run_live
    from realtime.outputs import check_distinct_ports
    from realtime.shutdown import recalibrate_on_signal, stop_on_signals
    from realtime.sources import format_camera_list, list_cameras

    if args.list_cameras:
        print(format_camera_list(list_cameras()))
        return 0
    config = command_config("live", args, _publisher_overrides(args))
    check_distinct_ports(config.publishers)
    options = LiveOptions(
        source=args.source,
        realtime=args.realtime,
        flame=args.flame,
        models_dir=args.models,
        tracker=config.tracker,
        publishers=config.publishers,
        record_dir=args.record,
        overwrite=args.overwrite,
        source_options=config.source,
        loop=config.live,
    )
    stop, recalibrate = threading.Event(), threading.Event()
    with stop_on_signals(stop), recalibrate_on_signal(recalibrate):
        summary = run_live(options, stop, recalibrate)
    print(summary.describe())
    return 1 if summary.source_lost else 0


def _add_track(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    track = subparsers.add_parser(
        "track",
        parents=[common],
        help="track a video, image(s) or landmarks file offline",
        description="Track every frame offline and write DIR/{frame:06d}.npz (reference format), "
        "DIR/tracking.npz and DIR/meta.json (written last: the result is complete). INPUT is a video, an image, "
        "a folder of images of one size, or a landmarks .npz with mp478 (T,478,2) and/or lmk68 (T,68,2) pixels and "
        "image_size (height, width). Frames are written as they are tracked: after Ctrl-C the same command continues.",
    )
    track.add_argument("input", metavar="INPUT", help="video file, image, folder of images, or landmarks .npz")
    track.add_argument("--out", type=output_dir, required=True, metavar="DIR", help="output folder")
    _add_tracking_options(track)
    track.add_argument(
        "--smoothing", type=float_between(0, 1000), default=None, metavar="LAMBDA",
        help="offline smoothing of expression, jaw and eyes over the whole sequence, past and future frames "
        "(default 3 at 25 fps, see engine/smoothing.py; larger is smoother, 0 keeps the per-frame fits of every "
        "parameter); blinks and fast mouth motion are kept",
    )
    track.add_argument(
        "--pose-smoothing", type=float_between(0, 10000), default=None, metavar="LAMBDA",
        help="the same for the head pose (rotation, translation, neck; default 40 at 25 fps: the head moves slower "
        "than the face); lower it for very fast head turns",
    )  # fmt: skip
    track.add_argument("--photometric", action="store_true", help="also refine every frame photometrically into DIR/photometric")
    track.add_argument(
        "--overwrite", action="store_true",
        help="replace what DIR holds from another input or other options (an interrupted run of the same command "
        "continues without it)",
    )  # fmt: skip
    track.add_argument("--render", action="store_true", help="also draw the fit over the input: DIR/overlay.mp4 "
                       "(overlay.png for an image; with --photometric also DIR/photometric/overlay.mp4)")  # fmt: skip
    _add_photometric_options(track)
    _add_config_option(track)
    track.set_defaults(handler=_run_track)


def _add_tracking_options(parser: argparse.ArgumentParser) -> None:
    """What track (and batch, per input) fits and writes."""
    parser.add_argument("--fov", type=fov_degrees, default=None, metavar="DEG", help="known vertical field of view (default: estimated)")
    parser.add_argument("--save-vertices", action="store_true", help="also store the posed mesh (camera space) per frame")
    parser.add_argument("--n-shape", type=positive_int, default=None, metavar="N", help="identity components to fit (default 100)")
    parser.add_argument("--n-exp", type=positive_int, default=None, metavar="N", help="expression components to fit (default 50)")


def _run_track(args: argparse.Namespace) -> int:
    from command_configs import active_smoothing, command_config
    from engine.errors import UserError, caused_by_ctrl_c
    from engine.model_files import find_face_landmarker, resolve_models_dir
    from engine.model_selection import select_head_model
    from offline.refine_job import TEXTURE_COMPONENTS
    from offline.track_job import PHOTOMETRIC_DIR, TrackOptions, load_landmark_file, track_input, written_frames

    config = command_config("track", args)
    source = Path(args.input)
    landmarks_file = source.suffix.lower() == ".npz"
    if not source.exists() and "://" not in args.input:
        raise UserError(f"{args.input} does not exist: give a video, an image, a folder of images or a landmarks .npz")
    if args.photometric and landmarks_file:
        raise UserError("--photometric needs the video or images themselves, not a landmarks file")
    if args.render and landmarks_file:
        raise UserError("--render needs the video or images themselves, not a landmarks file")
    # The cheap checks of the input and the model come before any frame is read.
    task = None
    if landmarks_file:
        load_landmark_file(source)
    else:
        from realtime.sources import open_source

        open_source(args.input, realtime=False).stop()  # a file that is no video or image fails here, in one line
    models_dir = resolve_models_dir(args.models)
    head = select_head_model(args.flame, models_dir, n_tex=TEXTURE_COMPONENTS if args.photometric else 0)
    if not landmarks_file:
        task = find_face_landmarker(models_dir)
    options = TrackOptions(config.tracker, args.save_vertices, active_smoothing(config.smoothing), overwrite=args.overwrite)
    try:
        result = track_input(args.input, args.out, head, task, options)
    except (KeyboardInterrupt, SystemError) as error:
        if not caused_by_ctrl_c(error):
            raise
        print(f"interrupted: {written_frames(args.out)} frames are saved in {args.out}; run the same command again to continue", file=sys.stderr)
        return 130
    if result.resumed_frames == len(result.results):
        print(f"{args.out} already holds this tracking")
    elif result.resumed_frames:
        print(f"continued an earlier run: {result.resumed_frames} frames were already written")
    if args.photometric:
        from offline.refine_job import refine_video

        out = args.out / PHOTOMETRIC_DIR
        refined = refine_video(args.input, result.tracker, result.results, result.sequence.mp478, out, _refine_options(config))
        print(f"photometric refinement: {refined['seconds_per_frame']:.2f} s per frame -> {out}")
        if args.render:
            _render_next_to(out, args.input, head, single_image=len(result.results) == 1)
    if args.render:
        _render_next_to(args.out, args.input, head, single_image=len(result.results) == 1)
    print(f"tracked {result.valid_frames}/{len(result.results)} frames with the {head.name} -> {args.out}")
    if "frames_per_second" in result.timings:
        timings = result.timings
        print(f"{timings['frames_per_second']:.1f} frames per second end to end; MediaPipe alone: {timings['mediapipe_alone_fps']:.1f}")
    return 0


def _render_next_to(result_dir: Path, source: str | Path, head, single_image: bool) -> None:
    """track/refine --render: the overlay of a result just written, beside it (overlay.mp4, or overlay.png)."""
    from offline.render_job import render_beside

    print(render_beside(result_dir, source, head, single_image).describe())


def _add_refine(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    refine = subparsers.add_parser(
        "refine",
        parents=[common],
        help="photometric refinement of a recorded session",
        description="Refine a session recorded by 'live --record' against its video: identity, albedo and SH "
        "lighting from keyframes, then every frame. Writes OUT/{frame:06d}.npz (track's format plus tex, light), "
        "OUT/identity.npz, OUT/texture.png, OUT/tracking.npz and OUT/meta.json; an interrupted run resumes.",
    )
    refine.add_argument("session", metavar="SESSION_DIR", type=Path, help="a folder written by live --record")
    refine.add_argument("--out", type=output_dir, default=None, metavar="DIR", help="output folder (default SESSION_DIR/refined)")
    refine.add_argument("--render", action="store_true", help="also draw the refined, textured fit over the video: DIR/overlay.mp4")
    _add_photometric_options(refine)
    _add_config_option(refine)
    refine.set_defaults(handler=_run_refine)


def _add_photometric_options(parser: argparse.ArgumentParser) -> None:
    # Defaults live in engine.photometric.PhotometricConfig (not imported here: it loads torch).
    parser.add_argument("--size", type=int_between(32, 1024), default=None, help="photometric crop size in pixels (default 128)")
    parser.add_argument("--iterations", type=non_negative_int, default=None, help="L-BFGS iterations per window of frames (default 4)")
    parser.add_argument("--window", type=positive_int, default=None, help="consecutive frames refined together (default 8)")


def _refine_options(config):
    """The [refine] table of a configuration, with ``smoothing.strength = 0`` meaning not smoothed."""
    from dataclasses import replace

    from command_configs import active_smoothing

    return replace(config.refine, smoothing=active_smoothing(config.refine.smoothing))


def _run_refine(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from command_configs import command_config
    from engine.model_files import find_face_landmarker, resolve_models_dir
    from engine.model_selection import select_head_model
    from engine.tracker import Tracker
    from offline.refine_job import TEXTURE_COMPONENTS, refine_session

    config = command_config("refine", args)
    options = _refine_options(config)
    models_dir = resolve_models_dir(args.models)
    head = select_head_model(args.flame, models_dir, n_tex=TEXTURE_COMPONENTS)

    def tracker_factory(image_size: tuple[int, int], n_shape: int, n_exp: int, known_fov_deg: float | None) -> Tracker:
        recorded = replace(config.tracker, n_shape=n_shape, n_exp=n_exp, fov_deg=known_fov_deg, fit_fov=known_fov_deg is None)
        return Tracker(head, image_size, recorded)

    def landmarker_task() -> Path | None:
        try:
            return find_face_landmarker(models_dir)
        except Exception:  # noqa: BLE001 - only needed when the session lacks landmarks; refine_session says so
            return None

    out_dir = args.out or args.session / "refined"
    timings = refine_session(args.session, tracker_factory, out_dir, landmarker_task(), options)
    print(f"refined {args.session} -> {out_dir} ({timings['seconds_per_frame']:.2f} s per frame)")
    if args.render:
        from realtime.session import VIDEO_FILE

        _render_next_to(out_dir, args.session / VIDEO_FILE, head, single_image=False)
    return 0


def _add_batch(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    batch = subparsers.add_parser(
        "batch",
        parents=[common],
        help="track (and refine) many inputs: locally, on Ray or as a Slurm array",
        description="Run 'track' (with --refine also the photometric refinement) for every input into ROOT/NAME/, "
        "exactly as for that input alone. Complete inputs are skipped, interrupted ones resume, a failing input "
        "is recorded with its reason while the others go on. Writes ROOT/summary.json and prints a table; "
        "exit status 1 when any input failed. --threads is per input.",
    )
    batch.add_argument("inputs", nargs="+", metavar="INPUT", help="videos, image folders, recorded sessions, landmark "
                       ".npz files, globs (quoted), or .txt files listing them one per line")  # fmt: skip
    batch.add_argument("--out", type=output_dir, required=True, metavar="ROOT", help="output root; on a cluster, a path every node sees")
    batch.add_argument("--refine", action="store_true", help="also refine every input photometrically into ROOT/NAME/photometric")
    batch.add_argument("--render", action="store_true", help="also draw each fit over its input: ROOT/NAME/overlay.mp4 "
                       "(and photometric/overlay.mp4 with --refine), as track --render does")  # fmt: skip
    batch.add_argument("--jobs", type=positive_int, default=None, metavar="N", help="inputs at once in a local process pool, "
                       "or on a local Ray (default: CPU cores / --threads)")  # fmt: skip
    batch.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS", help="one Ray task per input, on the "
                       "cluster at ADDRESS ('auto', HOST:PORT, ray://HOST:PORT) or a local Ray started for the run")  # fmt: skip
    batch.add_argument("--gpus-per-job", type=float_between(0, 64), default=None, metavar="G", help="GPUs Ray reserves per "
                       "input (default 1 with a CUDA --device, else 0)")  # fmt: skip
    batch.add_argument("--shard", type=shard, default=(0, 1), metavar="I/N", help="take every N-th input starting at I "
                       "(from 0), for job arrays: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")  # fmt: skip
    batch.add_argument("--dry-run", action="store_true", help="list this shard's inputs, their folders and what is done; run nothing")
    _add_tracking_options(batch)
    batch.add_argument("--overwrite", action="store_true", help="replace results of an input tracked with other options")
    _add_photometric_options(batch)
    _add_config_option(batch)
    batch.set_defaults(handler=_run_batch)


def _run_batch(args: argparse.Namespace) -> int:
    from functools import partial

    from command_configs import active_smoothing, command_config
    from engine.model_files import find_face_landmarker, resolve_models_dir
    from engine.model_selection import select_head_model
    from offline import batch

    config = command_config("batch", args)
    plan = batch.plan_batch(args.inputs, args.out.resolve(), *args.shard)
    models_dir = resolve_models_dir(args.models).resolve()
    select_head_model(args.flame, models_dir)  # a bad model fails here, before any work
    options = batch.JobOptions(
        models_dir=models_dir,
        landmarker_task=find_face_landmarker(models_dir).resolve() if any(not i.is_landmarks for i in plan.mine) else None,
        flame=str(Path(args.flame).resolve()) if args.flame not in (None, "demo") else args.flame,
        tracker=config.tracker,
        smoothing=active_smoothing(config.smoothing),
        save_vertices=args.save_vertices,
        overwrite=args.overwrite,
        refine=_refine_options(config) if args.refine else None,
        render=args.render,
        threads=args.threads,
    )
    if args.dry_run:
        print(batch.describe_plan(plan, options))
        return 0
    jobs = args.jobs or batch.default_jobs(args.threads)
    if args.ray is not None:
        batch.import_ray(args.ray or None)  # before any work: Ray installed, the cluster reachable
        gpus = args.gpus_per_job if args.gpus_per_job is not None else float(options.tracker.device.startswith("cuda"))
        local_cpus = args.jobs * args.threads if args.jobs else None
        ray_options = batch.RayOptions(args.ray or None, args.threads, gpus, local_cpus)
        engine = partial(batch.run_ray, root=plan.root, options=options, ray_options=ray_options)
    elif jobs > 1:
        engine = partial(batch.run_pool, root=plan.root, options=options, jobs=jobs)
    else:
        engine = partial(batch.run_inline, root=plan.root, options=options)
    outcome = batch.run_batch(plan, options, engine)
    print(batch.summary_table(outcome, plan.mine))
    return batch.exit_status(outcome, plan.mine)


def _add_replay(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    replay = subparsers.add_parser(
        "replay",
        parents=[common],
        help="publish a recording again with its timing",
        description="Publish the frame and shape messages of a session recorded with 'live --record' again, "
        "with their original timing, so receivers (Unity, Blender, your code) can be tested without a camera.",
    )
    replay.add_argument("session", type=Path, metavar="SESSION_DIR", help="folder written by live --record")
    replay.add_argument("--speed", type=positive_float, default=1.0, help="playback speed factor (default 1; 2 = twice as fast)")
    replay.add_argument("--wait", type=float_between(0.0, 600.0), default=3.0, metavar="S",
                        help="seconds to wait for a first ZeroMQ subscriber, so it misses nothing (default 3)")  # fmt: skip
    _add_publisher_options(replay)
    _add_config_option(replay)
    replay.set_defaults(handler=_run_replay)


def _publisher_overrides(args: argparse.Namespace) -> dict[str, object]:
    """--zmq, --no-zmq, --osc, --vmc and --livelink as configuration keys (None: not given)."""
    from engine.config import NONE
    from realtime.outputs import publisher_options

    given = publisher_options(args.zmq, args.osc, args.vmc, args.livelink)
    return {"publishers.zmq": NONE if args.no_zmq else given.zmq, "publishers.osc": given.osc,
            "publishers.vmc": given.vmc, "publishers.livelink": given.livelink}  # fmt: skip


def _run_replay(args: argparse.Namespace) -> int:
    import threading

    from command_configs import command_config
    from realtime.outputs import check_distinct_ports
    from realtime.replay import run_replay
    from realtime.shutdown import stop_on_signals

    config = command_config("replay", args, _publisher_overrides(args))
    check_distinct_ports(config.publishers)
    stop = threading.Event()
    with stop_on_signals(stop):
        summary = run_replay(args.session, config.publishers, args.speed, stop, args.wait)
    print(summary.describe())
    return 0


def _add_render(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    render = subparsers.add_parser(
        "render",
        parents=[common],
        help="draw the fitted head over the input frames (MP4 or PNGs)",
        description="Draw the fitted head of a result over its original frames, one output frame per input frame: "
        "the shaded mesh blended over the frame (overlay), input and overlay side by side (side; after "
        "refine: input | textured render | overlay), or the mesh alone on grey (mesh); compare draws another "
        "result of the same input (--against, e.g. the track fit a refinement started from) beside this one, both "
        "with the refinement's texture and light, over each fit's photometric error in the face mask and the "
        "difference of the two, cropped around --zoom. RESULT_DIR is a folder written by track or refine "
        "(meta.json) or by live --record (session.json). Frames without a fit show the input with a red border "
        "and 'no fit'.",
    )
    render.add_argument("result", type=Path, metavar="RESULT_DIR", help="a track / refine output folder or a recorded session")
    render.add_argument("--out", type=Path, required=True, metavar="FILE.mp4|FILE.png|DIR",
                        help="H.264 video at the input's frame rate, one PNG (one frame), or a folder of PNGs")  # fmt: skip
    render.add_argument("--style", choices=("overlay", "side", "mesh", "compare"), default=None, help="what to draw (default overlay)")
    render.add_argument("--landmarks", action="store_true", default=None, help="also draw observed (green) and fitted (magenta) landmarks")
    render.add_argument("--frames", default=None, metavar="A:B", help="only input frames A..B-1 (A: or :B also work)")
    render.add_argument("--video", type=Path, default=None, metavar="PATH",
                        help="the input's video, image or image folder, when the result's own record of it is wrong or gone")  # fmt: skip
    render.add_argument("--appearance", type=Path, default=None, metavar="REFINE_DIR",
                        help="draw with this refinement's texture and lighting (compare a track fit with its refinement)")  # fmt: skip
    render.add_argument("--against", type=Path, default=None, metavar="OTHER_DIR",
                        help="--style compare: the result drawn beside RESULT_DIR, e.g. the track folder a refinement started from")  # fmt: skip
    render.add_argument("--zoom", choices=("face", "mouth", "eyes", "cheeks"), default=None,
                        help="--style compare: the face region every panel shows (default face)")  # fmt: skip
    render.add_argument("--overwrite", action="store_true", default=None, help="replace --out if it exists")
    _add_config_option(render)
    render.set_defaults(handler=_run_render)


def _run_render(args: argparse.Namespace) -> int:
    from command_configs import command_config
    from engine.config import NONE
    from engine.errors import UserError
    from offline.render_job import parse_frame_range, render_result

    first, stop = parse_frame_range(args.frames) if args.frames else (None, None)
    given = {"first_frame": first, "stop_frame": NONE if args.frames and stop is None else stop, "video": args.video,
             "overwrite": args.overwrite, "flame": args.flame, "models_dir": args.models, "appearance": args.appearance,
             "against": args.against, "zoom": args.zoom}  # fmt: skip
    config = command_config("render", args, {f"render.{key}": value for key, value in given.items()})
    if args.zoom is not None and config.render.style != "compare":
        raise UserError(f"--zoom crops the panels of --style compare; with --style {config.render.style} leave it out")
    print(render_result(args.result, args.out, config.render).describe())
    return 0


def _add_bench(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    bench = subparsers.add_parser(
        "bench",
        parents=[common],
        help="measure speed on this machine",
        description="Measure the engine on this machine, on the CPU and on CUDA when present, in one run: "
        "landmark-only vs dense FLAME forward, per-frame tracking with and without warm start, calibration; "
        "with --live CLIP also the end-to-end live pipeline. Medians and ratios, never single samples.",
    )
    bench.add_argument("--clip", type=existing_file, default=None, metavar="VIDEO", help="also track MediaPipe landmarks of this video")
    bench.add_argument("--frames", type=positive_int, default=200, help="frames of the clip / synthetic sequence (default 200)")
    bench.add_argument("--live", type=existing_file, default=None, metavar="VIDEO", help="also run the live pipeline on this video at 640x480 "
                       "(with a display also with --preview, to show what drawing costs)")  # fmt: skip
    bench.add_argument("--memory-frames", type=positive_int, default=3000, metavar="N",
                       help="with --live: after the speed runs, run the loop flat out on the repeated video for N frames and "
                       "report resident memory growth per 10,000 frames (default 3000)")
    bench.add_argument("--track", type=existing_file, default=None, metavar="VIDEO",
                       help="also run the offline 'track' job on this video (into a temporary folder) against MediaPipe alone "
                       "on the same frames, with the cost of each frame file's fsync")
    bench.add_argument("--accuracy", action="store_true", help="also measure accuracy: synthetic ground truth, --clip, and offline smoothing on --clips")
    bench.add_argument(
        "--clips", type=existing_path, default=None, metavar="DIR",
        help="with --accuracy: videos whose offline tracking is measured before and after smoothing "
        f"(default {DEFAULT_CLIPS.relative_to(DEFAULT_CLIPS.parents[3])} when present)",
    )  # fmt: skip
    bench.add_argument("--photometric", action="store_true", help="also measure the renderer and a photometric iteration")
    bench.add_argument("--refine", type=existing_file, default=None, metavar="VIDEO",
                       help="with --accuracy: track and refine the first --frames frames of this video and compare both "
                       "(landmark error, jitter, mouth and blink correlation, image error, time per frame)")
    bench.add_argument("--json", type=output_file, default=None, metavar="FILE", help="also write all figures as JSON")
    bench.add_argument("--soak", type=positive_float, default=None, metavar="SECONDS",
                       help="instead, run the live loop on --live VIDEO (repeated) for SECONDS with a subscriber, "
                       "and report delivery and memory growth (a stability check; 3600 for an hour)")  # fmt: skip
    _add_config_option(bench)
    bench.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    import numpy as np
    import torch

    from command_configs import command_config
    from engine.benchmark import bench_flame_layer, bench_solve_against_mediapipe, bench_threads, bench_tracking
    from engine.config import to_tree
    from engine.errors import UserError
    from engine.model_files import find_face_landmarker, resolve_models_dir
    from engine.model_selection import select_head_model
    from engine.synthetic import SyntheticMotion, synthetic_sequence
    from engine.tracker import Tracker

    def status(stage: str) -> None:
        print(f"bench: {stage} ...", file=sys.stderr, flush=True)

    config = command_config("bench", args)
    if args.refine and not args.accuracy:
        raise UserError("--refine compares accuracy: run 'bench --accuracy --refine VIDEO'")
    models_dir = resolve_models_dir(args.models)
    if args.soak is not None:
        from realtime.bench import run_soak

        if args.live is None:
            raise UserError("--soak needs a video to repeat: add --live VIDEO")
        status(f"soak: the live loop on {args.live} for {args.soak:g} s")
        soak = run_soak(args.live, args.soak, flame=args.flame or "demo", models_dir=models_dir, device=config.tracker.device)
        _print_report({"soak": soak})
        if args.json:
            args.json.write_text(json.dumps({"soak": soak}, indent=2) + "\n")
        return 0
    head = select_head_model(args.flame, models_dir)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report: dict[str, object] = {"model": head.name, "torch": torch.__version__, "threads": torch.get_num_threads()}
    clip = None
    if args.clip:
        from offline.track_job import detect_landmarks

        status(f"MediaPipe landmarks of {args.clip}")
        clip, mediapipe_ms = detect_landmarks(str(args.clip), find_face_landmarker(models_dir), max_frames=args.frames)
        if clip.observed_frames == 0:
            raise UserError(f"--clip {args.clip}: no face found in its first {clip.n_frames} frames; give a video of a face")
        report["mediapipe_clip"] = {"frames": len(mediapipe_ms), "median_ms": float(np.median(mediapipe_ms))}

    for torch_device in devices:
        tracker_config = replace(config.tracker, device=torch_device)
        status(f"FLAME layer on {torch_device}")
        section: dict[str, object] = {"flame_layer": bench_flame_layer(head, torch_device)}
        status(f"tracking {args.frames} synthetic frames on {torch_device}")
        synthetic = synthetic_sequence(Tracker(head, (512, 512), tracker_config).rig.layer, SyntheticMotion(frames=args.frames))
        section["tracking_synthetic"] = bench_tracking(head, synthetic.mp478, synthetic.lmk68, (512, 512), synthetic.fps, tracker_config)
        if clip is not None:
            status(f"tracking the clip on {torch_device}")
            section["tracking_clip"] = bench_tracking(head, clip.mp478, clip.lmk68, clip.image_size, clip.fps, tracker_config)
            # Targets: numpy_over_mediapipe <= 0.1 with a FLAME-sized model, <= 0.05 with the demo head.
            status(f"per-frame solve (NumPy and PyTorch) against MediaPipe on the clip, on {torch_device}")
            section["solve_against_mediapipe"] = bench_solve_against_mediapipe(
                head, str(args.clip), find_face_landmarker(models_dir), clip.mp478, clip.image_size, clip.fps, tracker_config, args.frames
            )
        if args.photometric:
            from engine.photometric import bench_photometric
            from engine.render import benchmark_render

            status(f"renderer and photometric fitting on {torch_device}")
            section["render_256"] = benchmark_render(torch_device, size=256)
            section["photometric_256"] = bench_photometric(head, torch_device, size=256)
        report[torch_device] = section
    status("tracking with one thread and with one per core")
    report["torch_threads"] = bench_threads(head, synthetic.mp478, synthetic.lmk68, (512, 512), synthetic.fps, args.threads)
    if args.accuracy:
        from engine.evaluation import clip_accuracy, synthetic_accuracy
        from engine.filters import OneEuroConfig

        status("accuracy")
        measured = replace(config.tracker, device="cpu")  # accuracy figures are the CPU's, whatever else runs
        accuracy: dict[str, object] = {"synthetic": synthetic_accuracy(head, SyntheticMotion(frames=args.frames), measured)}
        if clip is not None:
            accuracy["clip"] = clip_accuracy(head, clip.mp478, clip.image_size, clip.fps, measured)
            accuracy["clip_one_euro"] = clip_accuracy(
                head, clip.mp478, clip.image_size, clip.fps, replace(measured, output_filter=measured.output_filter or OneEuroConfig())
            )
        if args.refine:
            from offline.refine_accuracy import compare_refine_with_track

            status("refinement against tracking")
            accuracy["refine_vs_track"] = compare_refine_with_track(
                head, str(args.refine), find_face_landmarker(models_dir), args.frames, device=devices[-1])
        accuracy["offline_smoothing"] = _bench_smoothing(head, args, models_dir, status, measured, config.smoothing)
        report["accuracy"] = accuracy
    if args.live:
        from realtime.bench import mediapipe_alone_benchmark, run_live_benchmark, run_memory_check
        from realtime.preview import display_available

        status("MediaPipe alone on the live clip")
        alone_before = mediapipe_alone_benchmark(str(args.live), models_dir)
        live_runs: dict[str, dict[str, object]] = {}
        # The same clip with and without the preview window (its cost to tracking), when there is a display.
        previews = (False, True) if display_available() else (False,)
        for device in devices:
            # Paced at the file's own rate (latency as with a camera), then as fast as possible (throughput).
            for paced, label in ((True, "realtime"), (False, "as_fast_as_possible")):
                for preview in previews:
                    status(f"live pipeline on {device}, {label.replace('_', ' ')}" + (", with --preview" if preview else ""))
                    live_runs[f"live_{device}_{label}" + ("_preview" if preview else "")] = run_live_benchmark(
                        str(args.live), flame=args.flame or "demo", models_dir=models_dir, device=device, realtime=paced,
                        preview=preview,
                    )
        status("MediaPipe alone on the live clip, again (the machine's load may have changed)")
        alone_after = mediapipe_alone_benchmark(str(args.live), models_dir)
        # The ratios use MediaPipe alone before and after the live runs, averaged.
        alone = {
            key: (alone_before[key] + alone_after[key]) / 2 for key in ("median_ms", "fps", "cpu_ms_per_frame", "max_over_median")
        } | {"before": alone_before, "after": alone_after}
        report["live_mediapipe_alone"] = alone
        for name, figures in live_runs.items():
            figures["fps_over_mediapipe_alone"] = figures["fps"] / alone["fps"]
            figures["latency_p95_minus_mediapipe_ms"] = figures["latency_p95_ms"] - alone["median_ms"]
            figures["cpu_over_mediapipe_alone"] = figures["cpu_ms_per_frame"] / alone["cpu_ms_per_frame"]
            report[name] = figures
        for device in devices:  # issue 10's live targets side by side
            paced, flat = report[f"live_{device}_realtime"], report[f"live_{device}_as_fast_as_possible"]
            report[f"live_{device}_targets"] = {
                "fps_over_mediapipe_alone (flat out, target >= 0.9)": flat["fps_over_mediapipe_alone"],
                "mediapipe_idle_share (flat out, ideally 0)": flat["mediapipe_idle_share"],
                "latency_p95_minus_mediapipe_ms (paced, target <= 5)": paced["latency_p95_minus_mediapipe_ms"],
                "added_p95_ms (paced: capture->publish minus the frame's own MediaPipe time)": paced["added_p95_ms"],
                "frame_max_over_median (paced / flat out, target <= 3)": f"{paced['frame_max_over_median']:.2f} / {flat['frame_max_over_median']:.2f}",
                "mediapipe_alone_max_over_median (same measure, MediaPipe alone)": alone["max_over_median"],
                "frame_max_over_median during / outside the background calibration (paced; flat out)": (
                    f"{paced['frame_max_over_median_during_calibration']:.2f} / {paced['frame_max_over_median_outside_calibration']:.2f}; "
                    f"{flat['frame_max_over_median_during_calibration']:.2f} / {flat['frame_max_over_median_outside_calibration']:.2f}"
                ),
                "mediapipe_median_ms during / outside the background calibration (paced, frames during it)": (
                    f"{paced['mediapipe_median_during_calibration_ms']:.1f} / {paced['mediapipe_median_outside_calibration_ms']:.1f} "
                    f"({paced['calibration_frames']})"
                ),
            }
        for device in devices if len(previews) == 2 else ():
            report[f"live_{device}_preview_fps"] = {
                label: f"{report[f'live_{device}_{label}']['fps']:.1f} without, {report[f'live_{device}_{label}_preview']['fps']:.1f} with --preview"
                for label in ("realtime", "as_fast_as_possible")
            }
        status(f"memory: the live loop flat out on the repeated clip for {args.memory_frames} frames")
        report["live_memory"] = run_memory_check(
            str(args.live), args.memory_frames, flame=args.flame or "demo", models_dir=models_dir, device=config.tracker.device
        )
    if args.track:
        from offline.track_bench import bench_track

        status(f"offline track of {args.track} against MediaPipe alone")
        report["track"] = bench_track(args.track, head, find_face_landmarker(models_dir))
    _print_report(report)
    if args.json:  # with the configuration measured, which 'bench --config FILE.json' reads back
        args.json.write_text(json.dumps({**report, "config": to_tree(config)}, indent=2) + "\n")
    return 0


def _bench_smoothing(head, args: argparse.Namespace, models_dir: Path, status, tracker_config, smoothing) -> dict[str, object]:
    """Offline tracking before and after smoothing: a synthetic sequence, and every video in --clips."""
    from engine.evaluation import clip_smoothing_accuracy, synthetic_smoothing_accuracy
    from engine.model_files import find_face_landmarker
    from engine.synthetic import SyntheticMotion
    from offline.track_job import detect_landmarks

    status("offline smoothing on a synthetic sequence")
    report: dict[str, object] = {"settings": smoothing.describe()}
    report["synthetic"] = synthetic_smoothing_accuracy(head, SyntheticMotion(frames=args.frames), tracker_config, smoothing)
    folder = args.clips if args.clips is not None else DEFAULT_CLIPS if DEFAULT_CLIPS.is_dir() else None
    if folder is None:
        return report
    clips = sorted(p for p in (folder.iterdir() if folder.is_dir() else [folder]) if p.suffix.lower() in VIDEO_SUFFIXES)
    for path in clips:
        status(f"offline smoothing on {path.name}")
        sequence, _ = detect_landmarks(str(path), find_face_landmarker(models_dir), max_frames=args.frames)
        if sequence.observed_frames < 4:
            report[path.name] = "fewer than 4 frames with a face"
            continue
        report[path.name] = clip_smoothing_accuracy(head, sequence, tracker_config, smoothing, find_face_landmarker(models_dir))
    return report


def _print_report(report: dict[str, object], indent: str = "") -> None:
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_report(value, indent + "  ")
        elif isinstance(value, float):
            print(f"{indent}{key}: {value:.3g}")
        else:
            print(f"{indent}{key}: {value}")


def _add_models(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    models = subparsers.add_parser(
        "models",
        parents=[common],
        help="list model files: found, missing, where to get",
        description="List every model file (required or optional): found or missing, sha256, where to get it, "
        "its license; then load the FLAME model to check it. Exit status 1 when a required file is missing: "
        "the FLAME model or a landmark embedding the tracker can use: DECA's, RingNet's static + dynamic pair, or "
        "metrical-tracker's MediaPipe one (unless --flame demo). face_landmarker.task never "
        "counts as missing: it downloads on first use. See models/README.md.",
    )
    models.set_defaults(handler=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from engine.model_files import model_inventory, resolve_models_dir

    models_dir = resolve_models_dir(args.models)
    flame = None if args.flame == "demo" else Path(args.flame).expanduser() if args.flame else models_dir
    inventory = model_inventory(models_dir, flame)
    print(f"models folder: {models_dir}")
    print(inventory.table())
    if not inventory.ready:
        print("\nmissing for FLAME tracking (see models/README.md; without them, --flame demo uses the demo head):")
        print("\n".join(f"  - {item}" for item in inventory.missing))
        return 1
    if flame is not None:
        from engine.assets import load_flame

        model = load_flame(flame, n_tex=0)
        landmarks = "68 (with jaw contour)" if model.contour68 is not None else "51 (no jaw contour)"
        mediapipe = f", {len(model.mediapipe.face_idx)} MediaPipe" if model.mediapipe is not None else ""
        eyelids = " + 2 eyelids (blinks close the lids)" if model.eyelids is not None else ""
        print(
            f"\n{model.name} loads: {model.n_vertices} vertices, {model.n_shape} shape + {model.n_exp} expression "
            f"components{eyelids}, landmarks {landmarks}{mediapipe}; checksum {model.checksum}"
        )
    return 0


def _add_export(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    export = subparsers.add_parser(
        "export",
        parents=[common],
        help="write a posed mesh (.obj/.ply) or the animated glTF rig (.glb)",
        description="--out MESH: the posed mesh of one tracked frame (--space model: FLAME's frame, head pose zero; "
        "--space camera: OpenCV camera coordinates that overlay the input image through K). "
        "--gltf OUT.glb: the FLAME rig as glTF 2.0 (skinned mesh, expression and pose-corrective morph targets) "
        "with the identity of --params and, for a sequence, its animation; without --params the mean shape.",
    )
    export.add_argument(
        "--params", type=existing_path, default=None, metavar="TRACK_DIR|SESSION_DIR|FRAME.npz",
        help="tracked parameters: a frame .npz or tracking.npz (--out, --gltf), or a track/refine output folder or "
        "a live --record session folder (--gltf)",
    )  # fmt: skip
    export.add_argument("--frame", type=non_negative_int, default=None, help="frame index within a stacked tracking.npz (--out; default 0)")
    export.add_argument("--space", choices=("model", "camera"), default="model", help="coordinate frame of --out (default model)")
    output = export.add_mutually_exclusive_group(required=True)
    output.add_argument("--out", type=output_file_with_suffix(".obj", ".ply"), metavar="MESH", help="output .obj or .ply: one posed frame")
    output.add_argument("--gltf", type=output_file_with_suffix(".glb"), metavar="OUT.glb", help="output glTF rig, animated when --params is a sequence")
    export.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from engine.errors import UserError
    from engine.export import frame_arrays, posed_vertices, write_mesh
    from engine.flame import FlameLayer
    from engine.model_files import resolve_models_dir
    from engine.model_selection import select_head_model

    if args.gltf is not None:
        if args.frame is not None:
            raise UserError("--frame applies to --out; --gltf exports the whole sequence that --params names")
        from offline.gltf_export import export_gltf

        head = select_head_model(args.flame, resolve_models_dir(args.models), tracking=False)
        print(export_gltf(args.gltf, head, args.params))
        return 0
    if args.params is None or not args.params.is_file():
        raise UserError("--out needs --params FILE.npz: a frame .npz or tracking.npz written by 'run_stream.py track'")
    head = select_head_model(args.flame, resolve_models_dir(args.models), tracking=False)
    arrays = frame_arrays(args.params, args.frame, head)
    layer = FlameLayer(head, arrays["shape"].shape[1], arrays["exp"].shape[1])
    write_mesh(args.out, posed_vertices(layer, arrays, args.space), head.faces)
    print(f"wrote {args.out}: {head.n_vertices} vertices of the {head.name}, {args.space} space")
    return 0


def use_threads(count: int) -> None:
    """Give PyTorch (and the BLAS/OpenMP libraries under it) exactly ``count`` CPU threads.

    Their default, one thread per core, spin-waits for cores another process holds: on a busy 2-core
    machine offline tracking ran 5.7x slower with it. Set before torch is imported where possible.
    """
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(count)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(count)


def _add_blender_addon(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    addon = subparsers.add_parser(
        "blender-addon",
        help="build the Blender add-on zip",
        description="Build the installable Blender add-on (live link over OSC, Record, Import tracking) as a zip "
        "for Edit > Preferences > Add-ons > Install from Disk (Blender 4.2 or newer).",
    )
    addon.add_argument(
        "--out", type=output_file_with_suffix(".zip"), default="flame_live_blender.zip",
        help="zip to write (default flame_live_blender.zip)",
    )  # fmt: skip
    addon.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    addon.set_defaults(handler=_run_blender_addon, threads=1)  # no PyTorch work; main() sets threads for all


def _run_blender_addon(args: argparse.Namespace) -> int:
    from flame_live_blender.packaging import build_addon_zip

    count = build_addon_zip(args.out)
    print(f"wrote {args.out} ({count} files): install it in Blender with Edit > Preferences > Add-ons > Install from Disk")
    return 0


def _add_config(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    config = subparsers.add_parser(
        "config",
        help="print a command's configuration as TOML: its defaults, or a file checked and resolved",
        description="Print every configuration key COMMAND reads, as a TOML file to start from "
        "('run_stream.py config track > my.toml', edit, then 'run_stream.py track ... --config my.toml'). "
        "With --config FILE, FILE is checked and printed resolved over the defaults, as COMMAND would use it.",
    )
    config.add_argument("for_command", choices=CONFIGURED_COMMANDS, metavar="COMMAND", help=", ".join(CONFIGURED_COMMANDS))
    config.add_argument("--config", type=existing_file, default=None, metavar="FILE", help="a configuration file or a result's meta.json")
    config.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    config.set_defaults(handler=_run_config, threads=1)


def _run_config(args: argparse.Namespace) -> int:
    from command_configs import COMMAND_CONFIGS
    from engine.config import dump_toml, resolve

    resolved = resolve(COMMAND_CONFIGS[args.for_command](), args.config)
    origin = f"{args.config} resolved over the defaults" if args.config else "the defaults"
    header = (f"flame-live {args.for_command} configuration: {origin}.\n"
              f"Use: run_stream.py {args.for_command} ... --config FILE (options given there override the file).\n"
              'Optional values are "none" when unset. Remove keys to keep their defaults.')  # fmt: skip
    sys.stdout.write(dump_toml(resolved, header))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "live")
    args = build_parser().parse_args(argv)
    use_threads(args.threads)
    # Long-running commands report progress in the log; the others stay quiet unless asked (-v).
    chatty = args.command in ("live", "replay", "refine") or (args.command == "track" and args.photometric)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if chatty else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from engine.errors import UserError, caused_by_ctrl_c

    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemError) as error:
        if not caused_by_ctrl_c(error):
            raise
        return 130


if __name__ == "__main__":
    sys.exit(main())
