"""Loading FLAME files: exact arrays from every supported format, and one clear line for every bad input."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flame_fixtures import N_FACES, flame_arrays, write_flame_folder

from engine.assets import load_flame
from engine.errors import UserError
from engine.head_model import ModelFileError
from engine.safe_pickle import RefusedGlobalError, load_npy, load_pickle

REPO_ROOT = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def plain_model(flame_dir: Path) -> dict:
    """The fixture model as a plain dict of numpy arrays; tests damage copies of it and pickle them again."""
    with (flame_dir / "generic_model.pkl").open("rb") as stream:
        return load_pickle(stream)


def _folder_with_model(tmp_path: Path, flame_dir: Path, model: dict) -> Path:
    """A FLAME folder whose generic_model.pkl is ``model`` (plain pickle) beside the fixture's embeddings."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(flame_dir / "landmark_embedding.npy", folder)
    (folder / "generic_model.pkl").write_bytes(pickle.dumps(model, protocol=2))
    return folder


def _load_error(path: Path) -> str:
    with pytest.raises(ModelFileError) as caught:
        load_flame(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------ exact loading


def test_chumpy_pickle_loads_exactly(flame_dir: Path) -> None:
    model = load_flame(flame_dir)
    truth = flame_arrays()
    assert model.name == "FLAME" and not model.is_demo
    np.testing.assert_array_equal(model.v_template, truth.v_template)
    np.testing.assert_array_equal(model.shapedirs, truth.shapedirs[:, :, :300])
    np.testing.assert_array_equal(model.exprdirs, truth.shapedirs[:, :, 300:])
    np.testing.assert_array_equal(model.posedirs, truth.posedirs)
    np.testing.assert_array_equal(model.j_regressor, truth.j_regressor)  # rebuilt from the csc matrix
    np.testing.assert_array_equal(model.lbs_weights, truth.weights)
    np.testing.assert_array_equal(model.faces, truth.faces)
    assert model.faces.dtype == np.int64 and model.v_template.dtype == np.float64
    np.testing.assert_array_equal(model.parents, [-1, 0, 1, 1, 1])  # root's 4294967295 sentinel becomes -1

    np.testing.assert_array_equal(model.static68.face_idx, truth.static_idx)
    np.testing.assert_allclose(model.static68.bary, truth.static_bary)
    np.testing.assert_array_equal(model.contour68.face_idx, truth.contour_idx)  # from DECA's torch tensors
    np.testing.assert_allclose(model.contour68.bary, truth.contour_bary, atol=1e-7)  # stored as float32
    np.testing.assert_array_equal(model.full68.face_idx, truth.full_idx)
    np.testing.assert_array_equal(model.mediapipe.face_idx, truth.mediapipe_idx)
    np.testing.assert_array_equal(model.mediapipe.landmark_indices, truth.mediapipe_landmarks)

    np.testing.assert_array_equal(model.uv_coords, truth.uv_coords)
    np.testing.assert_array_equal(model.uv_faces, truth.uv_faces)
    assert model.texture.name == "FLAME texture space"
    np.testing.assert_allclose(model.texture.mean, truth.texture_mean, atol=1e-6)  # BGR 0..255 -> RGB 0..1
    np.testing.assert_allclose(model.texture.basis, truth.texture_basis, atol=1e-6)

    read = ["generic_model.pkl", "landmark_embedding.npy", "mediapipe_landmark_embedding.npz", "FLAME_texture.npz"]
    assert model.sources == {name: _sha256(flame_dir / name) for name in read}
    model.validate()


def test_npz_model_with_bfm_albedo_and_obj_uvs_matches(flame_dir: Path, flame_npz_dir: Path) -> None:
    from_pickle, from_npz = load_flame(flame_dir), load_flame(flame_npz_dir)
    for key in ("v_template", "shapedirs", "exprdirs", "posedirs", "j_regressor", "lbs_weights", "parents", "faces"):
        np.testing.assert_array_equal(getattr(from_npz, key), getattr(from_pickle, key), err_msg=key)
    truth = flame_arrays()
    np.testing.assert_allclose(from_npz.uv_coords, truth.uv_coords, atol=1e-6)  # parsed from head_template.obj
    np.testing.assert_array_equal(from_npz.uv_faces, truth.uv_faces)
    assert from_npz.texture.name == "BFM albedo"
    np.testing.assert_allclose(from_npz.texture.mean, truth.texture_mean, atol=1e-6)
    np.testing.assert_allclose(from_npz.texture.basis, truth.texture_basis, atol=1e-6)
    assert set(from_npz.sources) >= {"generic_model.npz", "FLAME_albedo_from_BFM.npz", "head_template.obj"}


def test_ringnet_pair_alone_gives_static_and_contour(tmp_path: Path) -> None:
    folder = write_flame_folder(tmp_path, embeddings=("ringnet",), texture=None)
    model = load_flame(folder)
    truth = flame_arrays()
    np.testing.assert_array_equal(model.static68.face_idx, truth.static_idx)
    np.testing.assert_array_equal(model.contour68.face_idx, truth.contour_idx)
    np.testing.assert_allclose(model.contour68.bary, truth.contour_bary)
    assert model.full68 is None and model.mediapipe is None and model.texture is None and model.uv_coords is None
    assert set(model.sources) == {"generic_model.pkl", "flame_static_embedding.pkl", "flame_dynamic_embedding.npy"}


def test_component_counts_and_texture_size(flame_dir: Path) -> None:
    model = load_flame(flame_dir / "generic_model.pkl", n_shape=50, n_exp=10, n_tex=2)
    truth = flame_arrays()
    assert (model.n_shape, model.n_exp, model.texture.basis.shape[-1]) == (50, 10, 2)
    np.testing.assert_array_equal(model.exprdirs, truth.shapedirs[:, :, 300:310])
    assert load_flame(flame_dir, n_tex=0).texture is None
    with pytest.raises(UserError, match="300"):
        load_flame(flame_dir, n_shape=301)


def test_version_comes_from_file_or_folder_name(tmp_path: Path, flame_dir: Path) -> None:
    folder_2020 = tmp_path / "FLAME2020"
    folder_2020.mkdir()
    shutil.copy(flame_dir / "generic_model.pkl", folder_2020)
    assert load_flame(folder_2020).name == "FLAME 2020"
    flame_2023 = tmp_path / "flame2023.pkl"
    shutil.copy(flame_dir / "generic_model.pkl", flame_2023)
    assert load_flame(flame_2023).name == "FLAME 2023"


# ------------------------------------------------------------------------------------------- bad input


def test_missing_model_names_the_file_and_where_to_get_it(tmp_path: Path) -> None:
    message = _load_error(tmp_path)
    assert "generic_model.pkl" in message and "flame.is.tue.mpg.de" in message
    assert "does not exist" in _load_error(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupt_pickle(tmp_path: Path, flame_dir: Path, damage: str) -> None:
    data = (flame_dir / "generic_model.pkl").read_bytes()
    (tmp_path / "generic_model.pkl").write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    message = _load_error(tmp_path)
    assert message.startswith("generic_model.pkl is truncated or corrupt") and "download it again" in message


def test_truncated_npz(tmp_path: Path, flame_npz_dir: Path) -> None:
    data = (flame_npz_dir / "generic_model.npz").read_bytes()
    (tmp_path / "generic_model.npz").write_bytes(data[: len(data) // 3])
    assert _load_error(tmp_path).startswith("generic_model.npz is truncated or corrupt")


def test_missing_key_is_named(tmp_path: Path, flame_dir: Path, plain_model: dict) -> None:
    model = {key: value for key, value in plain_model.items() if key != "posedirs"}
    assert "'posedirs'" in _load_error(_folder_with_model(tmp_path, flame_dir, model))


@pytest.mark.parametrize(
    ("key", "damage", "expected"),
    [
        ("weights", lambda a: a[:, :4], "(5023, 5)"),
        ("posedirs", lambda a: a[:, :, :35], "(5023, 3, 36)"),
        ("shapedirs", lambda a: a[:, :, :300], "(5023, 3, 300 + E)"),
        ("J_regressor", lambda a: a[:, :-1], "(5, 5023)"),
        ("f", lambda a: a[:, :2], "(F, 3)"),
    ],
)
def test_wrong_shape_names_key_and_expected_shape(
    tmp_path: Path, flame_dir: Path, plain_model: dict, key: str, damage, expected: str
) -> None:
    model = {**plain_model, key: damage(plain_model[key])}
    message = _load_error(_folder_with_model(tmp_path, flame_dir, model))
    assert f"'{key}'" in message and expected in message


def test_non_finite_values_are_refused(tmp_path: Path, flame_dir: Path, plain_model: dict) -> None:
    model = {**plain_model, "v_template": plain_model["v_template"].copy()}
    model["v_template"][10, 1] = np.nan
    assert "'v_template' contains NaN" in _load_error(_folder_with_model(tmp_path, flame_dir, model))


def test_embedding_beyond_the_mesh_is_refused(tmp_path: Path, flame_dir: Path) -> None:
    folder = write_flame_folder(tmp_path, embeddings=(), texture=None)
    truth = flame_arrays()
    embedding = {
        "static_lmk_faces_idx": truth.static_idx + N_FACES,
        "static_lmk_bary_coords": truth.static_bary,
        "dynamic_lmk_faces_idx": truth.contour_idx,
        "dynamic_lmk_bary_coords": truth.contour_bary,
        "full_lmk_faces_idx": truth.full_idx[None],
        "full_lmk_bary_coords": truth.full_bary[None],
    }
    np.save(folder / "landmark_embedding.npy", embedding, allow_pickle=True)
    message = _load_error(folder)
    assert message.startswith("landmark_embedding.npy: 'static_lmk_faces_idx'") and f"{N_FACES} triangles" in message


def test_mediapipe_indices_beyond_478_are_refused(tmp_path: Path) -> None:
    folder = write_flame_folder(tmp_path, embeddings=("deca",), texture=None)
    truth = flame_arrays()
    np.savez(
        folder / "mediapipe_landmark_embedding.npz",
        lmk_face_idx=truth.mediapipe_idx,
        lmk_b_coords=truth.mediapipe_bary,
        landmark_indices=truth.mediapipe_landmarks + 400,
    )
    assert "478 MediaPipe landmarks" in _load_error(folder)


# ------------------------------------------------------------------------------------- malicious files


class _RunsCommand:
    """A pickle payload that would run ``function(*args)`` when loaded by plain pickle."""

    def __init__(self, function, args: tuple) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _payloads(marker: Path) -> dict[str, _RunsCommand]:
    command = f"touch {marker}"
    return {
        "os.system": _RunsCommand(os.system, (command,)),
        "subprocess.call": _RunsCommand(subprocess.call, (["touch", str(marker)],)),
        "builtins.eval": _RunsCommand(eval, (f"__import__('os').system({command!r})",)),
        "builtins.exec": _RunsCommand(exec, (f"import os; os.system({command!r})",)),
    }


@pytest.mark.parametrize("payload", ["os.system", "subprocess.call", "builtins.eval", "builtins.exec"])
def test_malicious_model_pickle_is_refused_and_runs_nothing(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    evil = _payloads(marker)[payload]
    (tmp_path / "generic_model.pkl").write_bytes(pickle.dumps({"v_template": evil}, protocol=2))
    message = _load_error(tmp_path)
    assert "refused without running anything" in message and "generic_model.pkl" in message
    assert not marker.exists()


def test_malicious_embedding_npy_is_refused(tmp_path: Path) -> None:
    folder = write_flame_folder(tmp_path / "flame", embeddings=(), texture=None)
    marker = tmp_path / "pwned"
    evil = {"static_lmk_faces_idx": _payloads(marker)["os.system"]}
    np.save(folder / "landmark_embedding.npy", evil, allow_pickle=True)
    assert "landmark_embedding.npy asks to run 'posix.system'" in _load_error(folder)
    assert not marker.exists()


def test_malicious_pickle_inside_a_torch_storage_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    inner = pickle.dumps(_payloads(marker)["os.system"], protocol=2)
    # torch.storage._load_from_bytes(inner): GLOBAL, BINBYTES, TUPLE1, REDUCE, STOP.
    outer = b"\x80\x03ctorch.storage\n_load_from_bytes\nB" + struct.pack("<I", len(inner)) + inner + b"\x85R."
    with pytest.raises(RefusedGlobalError):
        load_pickle(io.BytesIO(outer))
    assert not marker.exists()


def test_plain_numpy_npy_round_trips_through_the_safe_reader() -> None:
    stream = io.BytesIO()
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T  # Fortran order on disk
    np.save(stream, array)
    stream.seek(0)
    np.testing.assert_array_equal(load_npy(stream), array)


def test_cli_prints_one_error_line_for_a_malicious_model(tmp_path: Path, flame_dir: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(flame_dir / "landmark_embedding.npy", folder)
    (folder / "generic_model.pkl").write_bytes(pickle.dumps(_payloads(marker)["os.system"], protocol=2))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_stream.py"), "models", "--models", str(folder)],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: generic_model.pkl asks to run")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", range(6))
def test_safe_reader_rebuilds_real_numpy_and_scipy_pickles(protocol: int) -> None:
    sparse = pytest.importorskip("scipy.sparse")
    dense = np.array([[0.0, 2.5, 0.0], [1.0, 0.0, 3.0]])
    content = {
        "csc": sparse.csc_matrix(dense),
        "csr": sparse.csr_matrix(dense),
        "array": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "scalar": np.float64(1.5),
        "names": {"lbs", "lrotmin"},
    }
    plain = load_pickle(io.BytesIO(pickle.dumps(content, protocol=protocol)))
    np.testing.assert_array_equal(plain["csc"], dense)
    np.testing.assert_array_equal(plain["csr"], dense)
    np.testing.assert_array_equal(plain["array"], content["array"])
    assert plain["scalar"] == 1.5 and plain["names"] == {"lbs", "lrotmin"}


# ------------------------------------------------------------------------------------------- FLAME 2023 Open


@pytest.mark.parametrize("model_format", ["open", "open_zip"])
def test_flame_2023_open_is_recognised_by_its_content_and_read_exactly(tmp_path: Path, model_format: str) -> None:
    folder = write_flame_folder(tmp_path / "FLAME2020", model_format=model_format, embeddings=("deca",), texture=None)
    model = load_flame(folder)  # the folder's name says 2020: the content wins
    assert model.name == "FLAME 2023 Open"
    truth = flame_arrays()
    np.testing.assert_array_equal(model.v_template, truth.v_template)
    np.testing.assert_array_equal(model.exprdirs, truth.shapedirs[:, :, 300:])
    expected = "FLAME2023Open.zip" if model_format == "open_zip" else "flame2023_Open.pkl"
    assert expected in model.sources


def test_a_zip_without_the_model_member_is_one_line(tmp_path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(tmp_path / "FLAME2023Open.zip", "w") as archive:
        archive.writestr("FLAME2023Open/readme.txt", "no model here\n")
    message = _load_error(tmp_path)
    assert message.startswith("FLAME2023Open.zip holds no flame2023_Open.pkl")


def test_a_malicious_pickle_inside_the_zip_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    import zipfile

    marker = tmp_path / "pwned"
    with zipfile.ZipFile(tmp_path / "FLAME2023Open.zip", "w") as archive:
        archive.writestr("FLAME2023Open/flame2023_Open.pkl", pickle.dumps({"v_template": _payloads(marker)["os.system"]}, protocol=2))
    message = _load_error(tmp_path)
    assert "refused without running anything" in message and "FLAME2023Open.zip" in message
    assert not marker.exists()


def test_models_names_the_open_release_and_its_commercial_license(tmp_path: Path) -> None:
    from engine.model_files import model_inventory

    folder = write_flame_folder(tmp_path / "flame", model_format="open_zip", embeddings=("mediapipe",), texture=None)
    inventory = model_inventory(folder, folder, cache_dir=tmp_path)
    assert inventory.ready
    table = inventory.table()
    assert "FLAME2023Open.zip" in table and "CC-BY-4.0: commercial use allowed" in table
    assert "generic_model.pkl" not in table
