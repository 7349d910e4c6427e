"""Turn the user's FLAME files into a :class:`~engine.head_model.HeadModel`, safely and exactly.

Reads the FLAME model (``generic_model.pkl`` as downloaded: a Python 2 pickle of chumpy objects and a scipy
sparse matrix, or an ``.npz`` with the same keys) and whatever lies beside it: the 68-point landmark
embedding (DECA's ``landmark_embedding.npy`` or the RingNet pair ``flame_static_embedding.pkl`` +
``flame_dynamic_embedding.npy``), metrical-tracker's MediaPipe embedding, a texture space
(``FLAME_albedo_from_BFM.npz`` or ``FLAME_texture.npz``) and UV coordinates (``FLAME_texture.npz`` or
``head_template.obj``), and metrical-tracker's eyelid blendshapes (``l_eyelid.npy`` + ``r_eyelid.npy``).
Every pickle goes through :mod:`engine.safe_pickle`; every problem becomes a
one-line :class:`ModelFileError` naming the file, the key and what was expected.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np

from engine import model_files as mf
from engine.errors import UserError
from engine.head_model import ContourEmbedding, Embedding, HeadModel, MediapipeEmbedding, ModelFileError, TextureSpace
from engine.safe_pickle import AllocationBudget, ArrayRefusedError, RefusedGlobalError, load_npy, load_npz, load_pickle

log = logging.getLogger(__name__)

#: FLAME's shapedirs hold this many identity components; the rest are expression components.
FLAME_SHAPE_COMPONENTS = 300
N_CONTOUR_YAWS, N_CONTOUR_POINTS, N_STATIC_POINTS = 79, 17, 51
N_MEDIAPIPE_LANDMARKS = 478

_T = TypeVar("_T")


def load_flame(
    directory_or_file: str | Path, n_shape: int | None = None, n_exp: int | None = None, n_tex: int | None = None
) -> HeadModel:
    """Load a FLAME model and the embeddings and texture files found beside it.

    ``n_shape``/``n_exp``/``n_tex`` keep only the first components (None: all; ``n_tex=0`` skips the
    texture space, which can be a gigabyte). Raises ModelFileError (a UserError) for any unusable file.
    """
    model_path = mf.find_flame_model(directory_or_file)
    folder = model_path.parent
    sources = {model_path.name: mf.sha256_of(model_path)}
    content = _read_model_content(model_path)
    arrays = _read_model_arrays(model_path, content)
    n_vertices, n_joints = arrays["v_template"].shape[0], arrays["kintree_table"].shape[1]
    n_faces = arrays["f"].shape[0]
    shapedirs = arrays["shapedirs"]
    n_shape = _component_count(n_shape, FLAME_SHAPE_COMPONENTS, "shape", model_path)
    n_exp = _component_count(n_exp, shapedirs.shape[2] - FLAME_SHAPE_COMPONENTS, "expression", model_path)

    model = HeadModel(
        name=_flame_name(model_path, content),
        is_demo=False,
        v_template=arrays["v_template"],
        shapedirs=np.ascontiguousarray(shapedirs[:, :, :n_shape]),
        exprdirs=np.ascontiguousarray(shapedirs[:, :, FLAME_SHAPE_COMPONENTS : FLAME_SHAPE_COMPONENTS + n_exp]),
        posedirs=arrays["posedirs"],
        j_regressor=arrays["J_regressor"],
        lbs_weights=arrays["weights"],
        parents=_parents_from_kintree(arrays["kintree_table"], model_path),
        faces=arrays["f"],
        sources=sources,
    )
    _attach_landmark_embeddings(model, folder, n_faces)
    _attach_eyelids(model, folder)
    _attach_uv_and_texture(model, folder, n_faces, n_tex)
    model.validate()
    log.info(
        "loaded %s from %s: %d vertices, %d joints, %d shape + %d expression components%s",
        model.name, model_path, n_vertices, n_joints, model.n_shape, model.n_exp,
        " + 2 eyelids" if model.eyelids is not None else "",
    )
    return model


def _read(path: Path, reader: Callable[[Path], _T], source: str) -> _T:
    """Run ``reader`` on a model file, turning every failure into one line that names the file."""
    try:
        return reader(path)
    except RefusedGlobalError as error:
        raise ModelFileError(
            f"{path.name} asks to run '{error.qualified_name}', which no model file needs: refused without "
            f"running anything (the file is damaged or malicious); download it again from {source}"
        ) from None
    except ArrayRefusedError as error:
        raise ModelFileError(
            f"{path.name}: {error}: refused before loading it (the file is damaged or malicious); "
            f"download it again from {source}"
        ) from None
    except ModelFileError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure to parse untrusted bytes means a damaged file
        raise ModelFileError(
            f"{path.name} is truncated or corrupt ({type(error).__name__}: {error}); download it again from {source}"
        ) from None


def _read_pickle_file(path: Path) -> Any:
    with path.open("rb") as stream:
        return load_pickle(stream)


def _read_npy_file(path: Path) -> Any:
    with path.open("rb") as stream:
        array = load_npy(stream)
    return array.item() if array.dtype.hasobject and array.shape == () else array


def _read_dict(path: Path, source: str, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A model file's top-level dict, whatever its container: .pkl, .npy holding a dict, or .npz."""
    if path.suffix == ".npz":
        content: Any = _read(path, lambda p: load_npz(p, keys), source)
    elif path.suffix == ".npy":
        content = _read(path, _read_npy_file, source)
    else:
        content = _read(path, _read_pickle_file, source)
    if not isinstance(content, dict):
        raise ModelFileError(
            f"{path.name} holds a {type(content).__name__}, not the expected dict of arrays; "
            f"download it again from {source}"
        )
    return content


_FLAME_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")


def _read_model_content(path: Path) -> dict[str, Any]:
    """The model file's dict: a .pkl or .npz, or FLAME2023Open.zip as downloaded (only its model member)."""
    if path.suffix.lower() == ".zip":
        return _read_zip_member_dict(path, mf.FLAME_2023_OPEN_MEMBER, mf.FLAME_2023_OPEN.source)
    return _read_dict(path, mf.FLAME_MODEL.source, keys=(*_FLAME_KEYS, mf.FLAME_2023_OPEN_KEY))


def _read_zip_member_dict(path: Path, member_name: str, source: str) -> dict[str, Any]:
    """One pickle inside a zip archive, read through the allow-listed unpickler without unpacking anything
    else (the member is found by its file name, in any folder of the archive)."""

    def read(archive_path: Path) -> Any:
        with zipfile.ZipFile(archive_path) as archive:
            members = [m for m in archive.infolist() if PurePosixPath(m.filename).name == member_name and not m.is_dir()]
            if not members:
                raise ModelFileError(f"{path.name} holds no {member_name}: it is not the archive from {source}")
            with archive.open(members[0]) as stream:
                return load_pickle(stream)

    content = _read(path, read, source)
    if not isinstance(content, dict):
        raise ModelFileError(f"{member_name} in {path.name} holds a {type(content).__name__}, not the expected dict of arrays")
    return content


def _read_model_arrays(path: Path, content: dict[str, Any]) -> dict[str, np.ndarray]:
    """FLAME's arrays, checked against each other: V, J and F come from v_template, kintree_table and f."""
    arrays: dict[str, np.ndarray] = {}
    for key in _FLAME_KEYS:
        if key not in content:
            raise ModelFileError(
                f"{path.name} has no '{key}': it is not a FLAME model; get {mf.FLAME_MODEL.name} from {mf.FLAME_SITE}"
            )
        try:
            arrays[key] = np.asarray(content[key], dtype=np.int64 if key in ("kintree_table", "f") else np.float64)
        except (TypeError, ValueError, OverflowError) as error:
            raise ModelFileError(f"{path.name}: '{key}' is not a numeric array ({error})") from None
    _check_shape(path, "v_template", arrays["v_template"], (None, 3), "(V, 3)")
    _check_shape(path, "kintree_table", arrays["kintree_table"], (2, None), "(2, J)")
    _check_shape(path, "f", arrays["f"], (None, 3), "(F, 3)")
    n_vertices, n_joints = arrays["v_template"].shape[0], arrays["kintree_table"].shape[1]
    shapedirs_layout = f"({n_vertices}, 3, {FLAME_SHAPE_COMPONENTS} + E)"
    _check_shape(path, "shapedirs", arrays["shapedirs"], (n_vertices, 3, None), shapedirs_layout)
    if arrays["shapedirs"].shape[2] <= FLAME_SHAPE_COMPONENTS:
        raise ModelFileError(
            f"{path.name}: 'shapedirs' has shape {arrays['shapedirs'].shape}, expected {shapedirs_layout}: "
            f"{FLAME_SHAPE_COMPONENTS} identity then E expression components"
        )
    _check_shape(path, "posedirs", arrays["posedirs"], (n_vertices, 3, 9 * (n_joints - 1)))
    _check_shape(path, "J_regressor", arrays["J_regressor"], (n_joints, n_vertices))
    _check_shape(path, "weights", arrays["weights"], (n_vertices, n_joints))
    for key, array in arrays.items():
        if not np.all(np.isfinite(array)):
            raise ModelFileError(f"{path.name}: '{key}' contains NaN or infinite values; download the file again")
    return arrays


def _check_shape(
    path: Path, key: str, array: np.ndarray, shape: tuple[int | None, ...], pretty: str | None = None
) -> None:
    """Raise naming the key and the expected shape unless ``array`` has it (None matches any length)."""
    if array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape)):
        pretty = pretty or str(shape)
        raise ModelFileError(f"{path.name}: '{key}' has shape {array.shape}, expected {pretty}")


def _component_count(requested: int | None, available: int, kind: str, path: Path) -> int:
    if requested is None:
        return available
    if not 0 <= requested <= available:
        raise UserError(
            f"asked for {requested} {kind} components, but {path.name} has {available}: choose 0..{available}"
        )
    return requested


def _parents_from_kintree(kintree: np.ndarray, path: Path) -> np.ndarray:
    """kintree_table row 0 holds parent ids, row 1 the joint ids; the root's parent is a sentinel (2**32-1)."""
    column_of = {int(joint_id): column for column, joint_id in enumerate(kintree[1])}
    try:
        parents = [-1] + [column_of[int(parent_id)] for parent_id in kintree[0, 1:]]
    except KeyError as missing:
        raise ModelFileError(
            f"{path.name}: kintree_table names parent joint {missing}, which is not in the table"
        ) from None
    return np.asarray(parents, dtype=np.int64)


def _flame_name(model_path: Path, content: dict[str, Any]) -> str:
    """The FLAME release: FLAME 2023 Open by its content (its expression metadata), the others by the file or
    folder name (FLAME2020/, flame2023.pkl), as their content does not say."""
    if mf.FLAME_2023_OPEN_KEY in content:
        return mf.FLAME_2023_OPEN_NAME
    names = [model_path.stem.lower(), model_path.parent.name.lower()]
    for year in ("2023", "2020"):
        if any(year in name for name in names):
            return f"FLAME {year}"
    return "FLAME"


def _attach_landmark_embeddings(model: HeadModel, folder: Path, n_faces: int) -> None:
    deca = mf.find_spec_file(folder, mf.DECA_EMBEDDING)
    static = mf.find_spec_file(folder, mf.STATIC_EMBEDDING)
    dynamic = mf.find_spec_file(folder, mf.DYNAMIC_EMBEDDING)
    if deca is not None:
        content = _read_dict(deca, mf.DECA_EMBEDDING.source)
        model.static68 = _embedding(
            content, deca, "static_lmk_faces_idx", "static_lmk_bary_coords", (N_STATIC_POINTS,), n_faces
        )
        model.contour68 = _contour(content, deca, "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords", n_faces)
        if "full_lmk_faces_idx" in content:  # not in every DECA-derived variant of the file
            model.full68 = _embedding(content, deca, "full_lmk_faces_idx", "full_lmk_bary_coords", (68,), n_faces)
        model.sources[deca.name] = mf.sha256_of(deca)
    elif static is not None:
        content = _read_dict(static, mf.STATIC_EMBEDDING.source)
        model.static68 = _embedding(content, static, "lmk_face_idx", "lmk_b_coords", (N_STATIC_POINTS,), n_faces)
        model.sources[static.name] = mf.sha256_of(static)
        if dynamic is not None:
            content = _read_dict(dynamic, mf.DYNAMIC_EMBEDDING.source)
            model.contour68 = _contour(content, dynamic, "lmk_face_idx", "lmk_b_coords", n_faces)
            model.sources[dynamic.name] = mf.sha256_of(dynamic)
    mediapipe = mf.find_spec_file(folder, mf.MEDIAPIPE_EMBEDDING)
    if mediapipe is not None:
        content = _read_dict(mediapipe, mf.MEDIAPIPE_EMBEDDING.source)
        embedding = _embedding(content, mediapipe, "lmk_face_idx", "lmk_b_coords", ("K",), n_faces)
        count = embedding.face_idx.shape
        indices = _indices(content, mediapipe, "landmark_indices", count, N_MEDIAPIPE_LANDMARKS, "MediaPipe landmarks")
        model.mediapipe = MediapipeEmbedding(face_idx=embedding.face_idx, bary=embedding.bary, landmark_indices=indices)
        model.sources[mediapipe.name] = mf.sha256_of(mediapipe)


def _attach_eyelids(model: HeadModel, folder: Path) -> None:
    """metrical-tracker's eyelid blendshapes, both or none: each a (V, 3) float array of vertex offsets."""
    found = [mf.find_spec_file(folder, spec) for spec in mf.EYELID_FILES]
    if not any(found):
        return
    if not all(found):
        present = next(spec.name for spec, path in zip(mf.EYELID_FILES, found) if path is not None)
        absent = next(spec.name for spec, path in zip(mf.EYELID_FILES, found) if path is None)
        raise ModelFileError(
            f"{present} is in {folder} but {absent} is not: the eyelid blendshapes come as a pair from "
            f"{mf.LEFT_EYELID.source}; add {absent} or remove {present}"
        )
    offsets = [_read(path, lambda p: _eyelid_offsets(p, model.n_vertices), spec.source) for spec, path in zip(mf.EYELID_FILES, found)]
    model.eyelids = np.stack(offsets, axis=2)
    for path in found:
        model.sources[path.name] = mf.sha256_of(path)


def _eyelid_offsets(path: Path, n_vertices: int) -> np.ndarray:
    """One eyelid blendshape: (V, 3) (or (1, V, 3)) floats, finite. The budget admits one float64 (V, 3)
    array, so a header promising more is refused before anything is allocated."""
    with path.open("rb") as stream:
        array = load_npy(stream, AllocationBudget(limit=n_vertices * 3 * 8 + 1024))
    if array.dtype.kind != "f":
        raise ModelFileError(f"{path.name} holds {array.dtype} values, not the float vertex offsets of an eyelid blendshape")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.shape != (n_vertices, 3):
        raise ModelFileError(
            f"{path.name} has shape {array.shape}, expected ({n_vertices}, 3): it belongs to another model"
        )
    if not np.all(np.isfinite(array)):
        raise ModelFileError(f"{path.name} contains NaN or infinite values; download it again")
    return array.astype(np.float64)


def require_tracking_landmarks(model: HeadModel) -> None:
    """Refuse a FLAME model the tracker cannot fit properly: it needs the 51 inner-face points with a jaw contour
    (or DECA's full 68) or the MediaPipe embedding. Raises ModelFileError naming the missing file and its source."""
    with_contour = model.static68 is not None and (model.contour68 is not None or model.full68 is not None)
    if model.is_demo or with_contour or model.mediapipe is not None:
        return
    missing = mf.missing_landmark_files(set(model.sources)) or "a landmark embedding (see models/README.md)"
    raise ModelFileError(f"{model.name} cannot be tracked without {missing}")


def _embedding(
    content: dict[str, Any], path: Path, idx_key: str, bary_key: str, count: tuple[Any, ...], n_faces: int
) -> Embedding:
    face_idx = _indices(content, path, idx_key, count, n_faces, "triangles")
    bary = _array(content, path, bary_key, (*face_idx.shape, 3))
    return Embedding(face_idx=face_idx, bary=bary)


def _contour(content: dict[str, Any], path: Path, idx_key: str, bary_key: str, n_faces: int) -> ContourEmbedding:
    face_idx = _indices(content, path, idx_key, (N_CONTOUR_YAWS, N_CONTOUR_POINTS), n_faces, "triangles")
    bary = _array(content, path, bary_key, (N_CONTOUR_YAWS, N_CONTOUR_POINTS, 3))
    return ContourEmbedding(face_idx=face_idx, bary=bary)


def _array(
    content: dict[str, Any], path: Path, key: str, shape: tuple[Any, ...], dtype: type[np.floating] = np.float64
) -> np.ndarray:
    """A float array of the given shape (a leading 1, as in DECA's (1, 68, 3), is dropped)."""
    if key not in content:
        raise ModelFileError(f"{path.name} has no '{key}': it is not the expected file; download it again")
    try:
        array = np.asarray(content[key], dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise ModelFileError(f"{path.name}: '{key}' is not a numeric array") from None
    if array.ndim == len(shape) + 1 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != len(shape) or any(isinstance(s, int) and s != a for s, a in zip(shape, array.shape)):
        raise ModelFileError(f"{path.name}: '{key}' has shape {array.shape}, expected ({', '.join(map(str, shape))})")
    if not np.all(np.isfinite(array)):
        raise ModelFileError(f"{path.name}: '{key}' contains NaN or infinite values; download the file again")
    return array


def _indices(
    content: dict[str, Any], path: Path, key: str, shape: tuple[Any, ...], limit: int, what: str
) -> np.ndarray:
    array = _array(content, path, key, shape)
    if np.any(array != np.round(array)):
        raise ModelFileError(f"{path.name}: '{key}' should hold whole-number indices")
    if array.size and (array.min() < 0 or array.max() >= limit):
        raise ModelFileError(
            f"{path.name}: '{key}' refers to index {int(array.max() if array.max() >= limit else array.min())}, "
            f"but there are {limit} {what} (0..{limit - 1}): the file belongs to another model"
        )
    return array.astype(np.int64)


def _attach_uv_and_texture(model: HeadModel, folder: Path, n_faces: int, n_tex: int | None) -> None:
    flame_texture = mf.find_spec_file(folder, mf.FLAME_TEXTURE)
    head_template = mf.find_spec_file(folder, mf.HEAD_TEMPLATE)
    if flame_texture is not None:
        content = _read_dict(flame_texture, mf.FLAME_TEXTURE.source, keys=("vt", "ft"))
        if "vt" in content and "ft" in content:
            model.uv_coords, model.uv_faces = _uv(content["vt"], content["ft"], flame_texture, n_faces)
            model.sources[flame_texture.name] = mf.sha256_of(flame_texture)
    if model.uv_coords is None and head_template is not None:
        vt, ft = _read(head_template, lambda p: _read_obj_uv(p, model.faces), mf.HEAD_TEMPLATE.source)
        model.uv_coords, model.uv_faces = _uv(vt, ft, head_template, n_faces)
        model.sources[head_template.name] = mf.sha256_of(head_template)
    if n_tex == 0:
        return
    bfm = mf.find_spec_file(folder, mf.BFM_ALBEDO)
    if bfm is not None:
        model.texture = _bfm_albedo(bfm, n_tex)
        model.sources[bfm.name] = mf.sha256_of(bfm)
    elif flame_texture is not None:
        model.texture = _flame_texture(flame_texture, n_tex)
        model.sources[flame_texture.name] = mf.sha256_of(flame_texture)
    if model.texture is not None and model.uv_coords is None:
        log.warning(
            "%s has no UV map: add %s or %s to use it", model.texture.name, mf.FLAME_TEXTURE.name, mf.HEAD_TEMPLATE.name
        )


def _uv(vt: Any, ft: Any, path: Path, n_faces: int) -> tuple[np.ndarray, np.ndarray]:
    content = {"vt": vt, "ft": ft}
    uv_coords = _array(content, path, "vt", ("Vt", 2))
    uv_faces = _indices(content, path, "ft", (n_faces, 3), len(uv_coords), "texture coordinates")
    return uv_coords, uv_faces


def _read_obj_uv(path: Path, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Texture coordinates (vt) and per-triangle vt indices of an OBJ whose triangles must be the model's."""
    uv: list[list[float]] = []
    vertex_faces: list[list[int]] = []
    uv_faces: list[list[int]] = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            fields = line.split()
            if not fields:
                continue
            if fields[0] == "vt":
                uv.append([float(fields[1]), float(fields[2])])
            elif fields[0] == "f":
                corners = [corner.split("/") for corner in fields[1:]]
                if len(corners) != 3 or any(len(c) < 2 or not c[1] for c in corners):
                    raise ModelFileError(
                        f"{path.name}: faces must be triangles with texture indices (f v/vt v/vt v/vt)"
                    )
                vertex_faces.append([int(c[0]) - 1 for c in corners])
                uv_faces.append([int(c[1]) - 1 for c in corners])
    if not np.array_equal(np.asarray(vertex_faces, dtype=np.int64).reshape(-1, 3), faces):
        raise ModelFileError(
            f"{path.name}: its triangles differ from the FLAME model's, so its UV map does not fit this model"
        )
    return np.asarray(uv), np.asarray(uv_faces)


def _bfm_albedo(path: Path, n_tex: int | None) -> TextureSpace:
    """BFM_to_FLAME's albedo: MU (H*W*3,) and PC (H*W*3, T), in [0, 1], BGR, pixel rows from the top (v = 1)."""
    content = _read_dict(path, mf.BFM_ALBEDO.source, keys=("MU", "PC"))
    mean = _array(content, path, "MU", ("H*W*3",), np.float32)
    side = int(round(np.sqrt(mean.size / 3)))
    if side * side * 3 != mean.size:
        raise ModelFileError(f"{path.name}: 'MU' has {mean.size} values, not a square RGB image (H*W*3)")
    basis = _array(content, path, "PC", (mean.size, "T"), np.float32)
    return _texture_space(mean.reshape(side, side, 3), basis.reshape(side, side, 3, -1), 1.0, n_tex, "BFM albedo")


def _flame_texture(path: Path, n_tex: int | None) -> TextureSpace:
    """The FLAME texture space: mean (H, W, 3) and tex_dir (H, W, 3, T) in 0..255, BGR, rows from the top."""
    content = _read_dict(path, mf.FLAME_TEXTURE.source, keys=("mean", "tex_dir"))
    mean = _array(content, path, "mean", ("H", "W", 3), np.float32)
    basis = _array(content, path, "tex_dir", (*mean.shape, "T"), np.float32)
    return _texture_space(mean, basis, 1.0 / 255.0, n_tex, "FLAME texture space")


def _texture_space(
    mean_bgr: np.ndarray, basis_bgr: np.ndarray, scale: float, n_tex: int | None, name: str
) -> TextureSpace:
    """RGB in [0, 1] from the files' OpenCV-style BGR; float32 because a full basis is about a gigabyte."""
    n_tex = basis_bgr.shape[-1] if n_tex is None else min(n_tex, basis_bgr.shape[-1])
    mean = np.ascontiguousarray(mean_bgr[..., ::-1])
    basis = np.ascontiguousarray(basis_bgr[..., ::-1, :n_tex])
    mean *= np.float32(scale)
    basis *= np.float32(scale)
    return TextureSpace(mean=mean, basis=basis, name=name)
