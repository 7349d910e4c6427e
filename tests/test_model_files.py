"""Where model files are looked up, the face_landmarker.task download, and the `models` command."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flame_fixtures import write_flame_folder

from engine.errors import UserError
from engine.head_model import ModelFileError
from engine.model_files import (
    DEFAULT_MODELS_DIR,
    LANDMARKER_SHA256,
    LANDMARKER_URL,
    MODELS_ENV_VAR,
    find_face_landmarker,
    find_flame_model,
    model_inventory,
    resolve_models_dir,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _serving(body: bytes) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 answering every GET with ``body``; yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            """Keep test output quiet."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/face_landmarker.task"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: downloading from it fails like being offline."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/face_landmarker.task"


def _run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_stream.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
        timeout=120,
    )


# ------------------------------------------------------------------------------------- the models folder


def test_models_dir_from_flag_then_environment_then_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_flag, from_env = tmp_path / "flag", tmp_path / "env"
    from_flag.mkdir()
    from_env.mkdir()
    monkeypatch.delenv(MODELS_ENV_VAR, raising=False)
    assert resolve_models_dir(None) == DEFAULT_MODELS_DIR == REPO_ROOT / "models"
    monkeypatch.setenv(MODELS_ENV_VAR, str(from_env))
    assert resolve_models_dir(None) == from_env
    assert resolve_models_dir(str(from_flag)) == from_flag


def test_a_named_models_dir_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="--models .*no such folder"):
        resolve_models_dir(tmp_path / "absent")
    monkeypatch.setenv(MODELS_ENV_VAR, str(tmp_path / "absent"))
    with pytest.raises(UserError, match=f"\\${MODELS_ENV_VAR}"):
        resolve_models_dir(None)


def test_flame_model_lookup(tmp_path: Path, flame_dir: Path) -> None:
    assert find_flame_model(flame_dir) == flame_dir / "generic_model.pkl"
    assert find_flame_model(flame_dir / "generic_model.pkl") == flame_dir / "generic_model.pkl"
    with pytest.raises(ModelFileError, match="no FLAME model in .*generic_model.pkl.*flame.is.tue.mpg.de"):
        find_flame_model(tmp_path)


# ----------------------------------------------------------------------------------- face_landmarker.task


def test_landmarker_in_the_models_folder_is_used_without_network(tmp_path: Path) -> None:
    (tmp_path / "face_landmarker.task").write_bytes(b"user's own copy")
    found = find_face_landmarker(tmp_path, url=_closed_port_url(), cache_dir=tmp_path / "cache")
    assert found == tmp_path / "face_landmarker.task"


def test_landmarker_downloads_once_into_the_cache(tmp_path: Path, landmarker_task: Path) -> None:
    cache = tmp_path / "cache"
    with _serving(landmarker_task.read_bytes()) as url:
        downloaded = find_face_landmarker(tmp_path, url=url, cache_dir=cache)
    assert downloaded == cache / "face_landmarker.task"
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == LANDMARKER_SHA256
    assert sorted(p.name for p in cache.iterdir()) == ["face_landmarker.task"]  # no partial file left
    # The server is gone: the cached copy is used.
    assert find_face_landmarker(tmp_path, url=_closed_port_url(), cache_dir=cache) == downloaded


def test_wrong_checksum_is_refused_and_nothing_is_cached(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with _serving(b"not the model" * 1000) as url, pytest.raises(UserError) as caught:
        find_face_landmarker(tmp_path, url=url, cache_dir=cache)
    message = str(caught.value)
    assert "sha256" in message and "refused" in message and "\n" not in message
    assert list(cache.iterdir()) == []


def test_a_damaged_cached_copy_is_replaced(tmp_path: Path, landmarker_task: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "face_landmarker.task").write_bytes(b"half a download")
    with _serving(landmarker_task.read_bytes()) as url:
        found = find_face_landmarker(tmp_path, url=url, cache_dir=cache)
    assert hashlib.sha256(found.read_bytes()).hexdigest() == LANDMARKER_SHA256


def test_offline_error_says_where_to_put_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError) as caught:
        find_face_landmarker(tmp_path, url=_closed_port_url(), cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path) in message and LANDMARKER_URL in message


def test_only_http_urls_are_downloaded(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="only http"):
        find_face_landmarker(tmp_path, url=f"file://{tmp_path}/x.task", cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------ the inventory


def test_inventory_of_a_complete_folder(tmp_path: Path, flame_dir: Path) -> None:
    inventory = model_inventory(flame_dir, flame_dir, cache_dir=tmp_path)
    assert inventory.ready and inventory.missing == ()
    rows = {row.spec.name: row for row in inventory.rows}
    assert rows["face_landmarker.task"].state == "missing (downloads on first use)"
    model_bytes = (flame_dir / "generic_model.pkl").read_bytes()
    assert rows["generic_model.pkl"].sha256 == hashlib.sha256(model_bytes).hexdigest()
    assert rows["FLAME_albedo_from_BFM.npz"].state == "missing"
    table = inventory.table()
    for row in inventory.rows:
        assert row.spec.name in table and row.spec.license in table and row.spec.source in table


def test_inventory_names_what_is_missing(tmp_path: Path) -> None:
    folder = write_flame_folder(tmp_path / "flame", embeddings=(), texture=None)
    (folder / "generic_model.pkl").unlink()
    missing = model_inventory(folder, folder, cache_dir=tmp_path).missing
    assert len(missing) == 2 and "generic_model.pkl" in missing[0] and "landmark_embedding.npy" in missing[1]
    # The MediaPipe embedding alone is enough for the tracker.
    write_flame_folder(tmp_path / "mediapipe_only", embeddings=("mediapipe",), texture=None)
    assert model_inventory(tmp_path, tmp_path / "mediapipe_only", cache_dir=tmp_path).missing == ()


def _static_only_folder(path: Path) -> Path:
    """What TF_FLAME users have: the model and the 51-point static embedding, no jaw contour."""
    folder = write_flame_folder(path, embeddings=("ringnet",), texture=None)
    (folder / "flame_dynamic_embedding.npy").unlink()
    return folder


def test_a_static_embedding_alone_is_not_enough_and_the_dynamic_one_is_named_with_its_source(tmp_path: Path) -> None:
    folder = _static_only_folder(tmp_path / "static_only")
    missing = model_inventory(tmp_path, folder, cache_dir=tmp_path).missing
    assert len(missing) == 1
    assert missing[0].startswith("flame_dynamic_embedding.npy") and "github.com/soubhiksanyal/RingNet, flame_model/" in missing[0]
    result = _run_cli("models", "--models", str(folder), cache=tmp_path)
    assert result.returncode == 1 and "flame_dynamic_embedding.npy" in result.stdout


def test_track_refuses_a_folder_without_a_jaw_contour_in_one_line(tmp_path: Path) -> None:
    folder = _static_only_folder(tmp_path / "static_only")
    landmarks = tmp_path / "landmarks.npz"
    np.savez(landmarks, lmk68=np.full((2, 68, 2), 100.0), image_size=np.array([256, 256]))
    result = _run_cli("track", str(landmarks), "--out", str(tmp_path / "out"), "--flame", str(folder), cache=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "flame_dynamic_embedding.npy" in result.stderr and "RingNet" in result.stderr
    assert not (tmp_path / "out" / "job.json").exists()


def test_demo_head_needs_no_flame_files(tmp_path: Path) -> None:
    inventory = model_inventory(tmp_path, None, cache_dir=tmp_path)
    assert inventory.ready
    assert all(not row.required for row in inventory.rows if row.spec.name != "face_landmarker.task")


# --------------------------------------------------------------------------------- run_stream.py models


def test_cli_lists_a_complete_folder_and_loads_the_model(tmp_path: Path, flame_dir: Path) -> None:
    result = _run_cli("models", "--models", str(flame_dir), cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "generic_model.pkl" in result.stdout and "found" in result.stdout
    assert "FLAME loads: 5023 vertices, 300 shape + 100 expression" in result.stdout


def test_cli_exits_1_when_required_files_are_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run_cli("models", "--models", str(empty), cache=tmp_path)
    assert result.returncode == 1
    assert "missing for FLAME tracking" in result.stdout and "flame.is.tue.mpg.de" in result.stdout
    assert _run_cli("models", "--models", str(empty), "--flame", "demo", cache=tmp_path).returncode == 0


def test_cli_error_for_a_missing_models_folder_is_one_line(tmp_path: Path) -> None:
    result = _run_cli("models", "--models", str(tmp_path / "absent"), cache=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --models") and result.stderr.count("\n") == 1
