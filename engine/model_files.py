"""Where the model files are, where to get them, and what a models folder holds.

The user brings the FLAME files (they are licensed per user and never redistributed); Google's
``face_landmarker.task`` is taken from the models folder or downloaded once into a per-user cache and
checked against its published sha256. :func:`model_inventory` powers ``run_stream.py models``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from engine.errors import UserError
from engine.head_model import ModelFileError

log = logging.getLogger(__name__)

MODELS_ENV_VAR = "FLAME_LIVE_MODELS"
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

LANDMARKER_NAME = "face_landmarker.task"
LANDMARKER_URL = (
    "https://storage.googleapis.com/mediapipe-models/face_landmarker/face_landmarker/float16/1/face_landmarker.task"
)
LANDMARKER_SHA256 = "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"
#: Download from a mirror instead of Google (institutions that proxy downloads).
LANDMARKER_URL_ENV_VAR = "FLAME_LIVE_LANDMARKER_URL"
# The official file is 3.6 MiB; a server sending far more is not sending it.
_LANDMARKER_MAX_BYTES = 64 * 1024 * 1024

FLAME_SITE = "https://flame.is.tue.mpg.de"


class Need(Enum):
    """How much a file matters, as the `models` table says it."""

    FLAME = "FLAME tracking"
    FLAME_68 = "FLAME tracking (one landmark embedding)"
    AUTO = "all tracking"
    OPTIONAL = "optional"


@dataclass(frozen=True)
class ModelFileSpec:
    """One kind of model file: the names it may have (first found wins), what it is for, its origin."""

    names: tuple[str, ...]
    purpose: str
    need: Need
    source: str
    license: str

    @property
    def name(self) -> str:
        return self.names[0]


FLAME_MODEL = ModelFileSpec(
    names=("generic_model.pkl", "generic_model.npz", "flame2023.pkl", "flame2023.npz"),
    purpose="FLAME 2020/2023 head model",
    need=Need.FLAME,
    source="flame.is.tue.mpg.de (free registration; FLAME 2020 or 2023)",
    license="FLAME model license, per user, no redistribution",
)
FLAME_2023_OPEN = ModelFileSpec(
    names=("flame2023_Open.pkl", "FLAME2023Open.zip"),
    purpose="FLAME 2023 Open head model (the zip as downloaded is read in place)",
    need=Need.FLAME,
    source="flame.is.tue.mpg.de (free registration; FLAME 2023 Open)",
    license="CC-BY-4.0: commercial use allowed, with attribution",
)
#: The member of FLAME2023Open.zip that holds the model; nothing else in the archive is read.
FLAME_2023_OPEN_MEMBER = "flame2023_Open.pkl"
#: The key only FLAME 2023 Open's pickle has (its expression space's provenance): how the release is told apart.
FLAME_2023_OPEN_KEY = "supr_expression_metadata"
FLAME_2023_OPEN_NAME = "FLAME 2023 Open"
DECA_EMBEDDING = ModelFileSpec(
    names=("landmark_embedding.npy",),
    purpose="68 landmarks on FLAME, with yaw-dependent jaw contour (DECA)",
    need=Need.FLAME_68,
    source="github.com/yfeng95/DECA, data/",
    license="DECA license (non-commercial research)",
)
STATIC_EMBEDDING = ModelFileSpec(
    names=("flame_static_embedding.pkl",),
    purpose="51 inner-face landmarks on FLAME (RingNet; TF_FLAME ships the same file)",
    need=Need.FLAME_68,
    source="github.com/soubhiksanyal/RingNet, flame_model/ (or github.com/TimoBolkart/TF_FLAME, data/)",
    license="FLAME-derived data (FLAME terms)",
)
DYNAMIC_EMBEDDING = ModelFileSpec(
    names=("flame_dynamic_embedding.npy",),
    purpose="17 jaw-contour landmarks per head yaw, pairs with the static one",
    need=Need.FLAME_68,
    source="github.com/soubhiksanyal/RingNet, flame_model/",
    license="FLAME-derived data (FLAME terms)",
)
MEDIAPIPE_EMBEDDING = ModelFileSpec(
    names=("mediapipe_landmark_embedding.npz",),
    purpose="105 MediaPipe landmarks on FLAME (denser fits; enough on its own)",
    need=Need.FLAME_68,
    source="github.com/Zielon/metrical-tracker, flame/mediapipe/",
    license="metrical-tracker license (non-commercial research)",
)
BFM_ALBEDO = ModelFileSpec(
    names=("FLAME_albedo_from_BFM.npz",),
    purpose="albedo space for photometric refinement (BFM in FLAME's UV map)",
    need=Need.OPTIONAL,
    source="build it: github.com/TimoBolkart/BFM_to_FLAME",
    license="Basel Face Model 2017 license (non-commercial research)",
)
FLAME_TEXTURE = ModelFileSpec(
    names=("FLAME_texture.npz",),
    purpose="FLAME texture space + UV map for photometric refinement",
    need=Need.OPTIONAL,
    source="flame.is.tue.mpg.de (texture space download)",
    license="FLAME model license, per user, no redistribution",
)
HEAD_TEMPLATE = ModelFileSpec(
    names=("head_template.obj",),
    purpose="FLAME mesh with its UV map (texture coordinates)",
    need=Need.OPTIONAL,
    source="flame.is.tue.mpg.de, or github.com/yfeng95/DECA, data/",
    license="FLAME model license, per user, no redistribution",
)
LEFT_EYELID = ModelFileSpec(
    names=("l_eyelid.npy",),
    purpose="eyelid blendshape that closes the left eye (with r_eyelid.npy: blinks close the lids)",
    need=Need.OPTIONAL,
    source="github.com/Zielon/metrical-tracker, flame/blendshapes/",
    license="metrical-tracker license (non-commercial research)",
)
RIGHT_EYELID = ModelFileSpec(
    names=("r_eyelid.npy",),
    purpose="eyelid blendshape that closes the right eye (pairs with l_eyelid.npy)",
    need=Need.OPTIONAL,
    source="github.com/Zielon/metrical-tracker, flame/blendshapes/",
    license="metrical-tracker license (non-commercial research)",
)
#: The eyelid blendshapes in the order of the ``eyelids`` coefficients: the subject's left eye, then right.
EYELID_FILES = (LEFT_EYELID, RIGHT_EYELID)
FACE_LANDMARKER = ModelFileSpec(
    names=(LANDMARKER_NAME,),
    purpose="MediaPipe Face Landmarker (478 landmarks, blendshapes)",
    need=Need.AUTO,
    source="Google's MediaPipe models (automatic)",
    license="Apache-2.0 (Google)",
)

#: Every file the `models` command reports, in table order. The FLAME ones live beside the FLAME model.
FLAME_FILES = (
    FLAME_MODEL,
    FLAME_2023_OPEN,
    DECA_EMBEDDING,
    STATIC_EMBEDDING,
    DYNAMIC_EMBEDDING,
    MEDIAPIPE_EMBEDDING,
    LEFT_EYELID,
    RIGHT_EYELID,
    BFM_ALBEDO,
    FLAME_TEXTURE,
    HEAD_TEMPLATE,
)


def resolve_models_dir(cli_value: str | Path | None) -> Path:
    """The models folder: ``--models DIR``, else $FLAME_LIVE_MODELS, else ``models/`` beside run_stream.py.

    A folder the user named must exist; the default may be absent (then every file is simply missing).
    """
    for value, origin in ((cli_value, "--models"), (os.environ.get(MODELS_ENV_VAR), f"${MODELS_ENV_VAR}")):
        if value:
            folder = Path(value).expanduser()
            if not folder.is_dir():
                raise UserError(f"{origin} {folder}: no such folder; create it and put the model files there")
            return folder
    return DEFAULT_MODELS_DIR


def find_spec_file(folder: Path, spec: ModelFileSpec) -> Path | None:
    """The first of the spec's names present in ``folder``, or None."""
    for name in spec.names:
        if (folder / name).is_file():
            return folder / name
    return None


def find_flame_model(directory_or_file: str | Path) -> Path:
    """The FLAME model file itself: the path given, or the first FLAME model name found in the folder."""
    path = Path(directory_or_file).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        found = find_spec_file(path, FLAME_MODEL) or find_spec_file(path, FLAME_2023_OPEN)
        if found is not None:
            return found
        raise ModelFileError(
            f"no FLAME model in {path}: put {FLAME_MODEL.name} there from {FLAME_MODEL.source} (or "
            f"{FLAME_2023_OPEN.names[1]}, {FLAME_2023_OPEN.license}), or use --flame demo for the demo head"
        )
    raise ModelFileError(f"{path} does not exist: give a folder holding {FLAME_MODEL.name}, or the file itself")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Per-user download cache: $XDG_CACHE_HOME/flame-live, else ~/.cache/flame-live."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # XDG: ignore relative paths
    return base / "flame-live"


def find_face_landmarker(
    models_dir: Path, *, url: str | None = None, cache_dir: Path | None = None, timeout_s: float = 60.0
) -> Path:
    """``face_landmarker.task`` from the models folder, else the cache, else downloaded once into the cache.

    The download is checked against Google's published sha256 and written atomically, so the cache never
    holds a partial or foreign file. ``url`` (or $FLAME_LIVE_LANDMARKER_URL) replaces Google's address.
    """
    in_models = models_dir / LANDMARKER_NAME
    if in_models.is_file():
        return in_models
    cache_dir = cache_dir or default_cache_dir()
    cached = cache_dir / LANDMARKER_NAME
    if cached.is_file():
        if sha256_of(cached) == LANDMARKER_SHA256:
            return cached
        log.warning("%s does not match the official checksum; downloading it again", cached)
    url = url or os.environ.get(LANDMARKER_URL_ENV_VAR) or LANDMARKER_URL
    _download_verified(url, cached, LANDMARKER_SHA256, models_dir, timeout_s)
    return cached


def _download_verified(url: str, target: Path, sha256: str, models_dir: Path, timeout_s: float) -> None:
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise UserError(f"{LANDMARKER_URL_ENV_VAR}={url}: only http(s) addresses can be downloaded")
    manual_fix = f"download {LANDMARKER_URL} on a machine with internet access and put it in {models_dir}"
    log.info("downloading %s from %s into %s", LANDMARKER_NAME, url, target.parent)
    partial: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout_s) as response, tempfile.NamedTemporaryFile(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False
        ) as out:
            partial = Path(out.name)
            digest, size = hashlib.sha256(), 0
            while chunk := response.read(1 << 16):
                size += len(chunk)
                if size > _LANDMARKER_MAX_BYTES:
                    raise UserError(f"{url} sent more than {_LANDMARKER_MAX_BYTES >> 20} MiB: not {LANDMARKER_NAME}")
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise UserError(
                f"{LANDMARKER_NAME} from {url} has sha256 {digest.hexdigest()[:16]}..., expected "
                f"{sha256[:16]}...: refused and not saved; {manual_fix}"
            )
        os.replace(partial, target)
        partial = None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise UserError(
            f"{LANDMARKER_NAME} is not in {models_dir} and could not be downloaded ({reason}); {manual_fix}"
        ) from None
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class FileStatus:
    """One row of the `models` table."""

    spec: ModelFileSpec
    path: Path | None
    sha256: str | None
    state: str  # found / missing / cached / missing (downloads on first use) / found (not the official file)
    required: bool
    needed_for: str


@dataclass(frozen=True)
class Inventory:
    """What a models folder holds for the chosen head model, and what is still missing."""

    models_dir: Path
    flame_dir: Path | None  # None: the demo head was chosen, FLAME files are not needed
    rows: tuple[FileStatus, ...]
    missing: tuple[str, ...]  # required and absent, in words; empty when tracking can start

    @property
    def ready(self) -> bool:
        return not self.missing

    def table(self) -> str:
        header = ("file", "status", "needed for", "sha256", "where to get it", "license")
        lines = [
            (
                row.spec.name if row.path is None else row.path.name,
                row.state,
                row.needed_for,
                row.sha256[:16] if row.sha256 else "-",
                row.spec.source,
                row.spec.license,
            )
            for row in self.rows
        ]
        widths = [max(len(cells[i]) for cells in (header, *lines)) for i in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip() for cells in (header, *lines)
        )


def model_inventory(models_dir: Path, flame: Path | None = None, *, cache_dir: Path | None = None) -> Inventory:
    """Check which model files are present (with their sha256) without loading them.

    ``flame`` is the FLAME model file or the folder holding it (usually ``models_dir``); None means the demo
    head was chosen (``--flame demo``), so only the landmarker is required. "Required and missing" means:
    the FLAME model, or every landmark embedding the tracker can use (:func:`missing_landmark_files`), is
    absent. The landmarker never counts as missing: it downloads on first use.
    """
    flame_dir = flame.parent if flame is not None and flame.is_file() else flame
    rows = [_landmarker_status(models_dir, cache_dir or default_cache_dir())]
    model_spec = _model_spec_in(flame, flame_dir)
    for spec in FLAME_FILES:
        if spec in (FLAME_MODEL, FLAME_2023_OPEN) and spec is not model_spec:
            continue  # one row for the model: the release that is there (FLAME 2020/2023 when none is)
        if flame is not None and flame.is_file() and spec is model_spec:
            path: Path | None = flame
        else:
            path = find_spec_file(flame_dir, spec) if flame_dir is not None else None
        rows.append(
            FileStatus(
                spec=spec,
                path=path,
                sha256=sha256_of(path) if path else None,
                state="found" if path else "missing",
                required=flame_dir is not None and spec.need in (Need.FLAME, Need.FLAME_68),
                needed_for=spec.need.value if flame_dir is not None else "FLAME only (--flame demo chosen)",
            )
        )
    found = {row.spec.name for row in rows if row.path is not None}
    missing: list[str] = []
    if flame_dir is not None:
        if model_spec.name not in found:
            missing.append(
                f"{FLAME_MODEL.name} (the FLAME model) from {FLAME_MODEL.source}, or {FLAME_2023_OPEN.names[1]} "
                f"({FLAME_2023_OPEN.license})"
            )
        landmarks = missing_landmark_files(found)
        if landmarks is not None:
            missing.append(landmarks)
    return Inventory(models_dir=models_dir, flame_dir=flame_dir, rows=tuple(rows), missing=tuple(missing))


def _model_spec_in(flame: Path | None, flame_dir: Path | None) -> ModelFileSpec:
    """Which model row the inventory shows: FLAME 2023 Open when that is the file given or the only one there."""
    if flame is not None and flame.is_file():
        return FLAME_2023_OPEN if flame.name in FLAME_2023_OPEN.names else FLAME_MODEL
    if flame_dir is not None and find_spec_file(flame_dir, FLAME_MODEL) is None and find_spec_file(flame_dir, FLAME_2023_OPEN):
        return FLAME_2023_OPEN
    return FLAME_MODEL


def missing_landmark_files(found: set[str]) -> str | None:
    """What a FLAME folder holding the files ``found`` (names) lacks for tracking, in words; None if nothing.

    The tracker needs the 51 inner-face points together with a jaw contour (DECA's file, which holds both, or
    RingNet's static + dynamic pair), or metrical-tracker's MediaPipe embedding. The 51 points alone would
    leave the jaw and the face outline unconstrained: the fit then follows the pupils and little else.
    """
    if DECA_EMBEDDING.name in found or MEDIAPIPE_EMBEDDING.name in found:
        return None
    if STATIC_EMBEDDING.name in found and DYNAMIC_EMBEDDING.name in found:
        return None
    alternative = f"or {MEDIAPIPE_EMBEDDING.name} from {MEDIAPIPE_EMBEDDING.source}"
    if STATIC_EMBEDDING.name in found:
        return (
            f"{DYNAMIC_EMBEDDING.name} (the jaw contour that pairs with {STATIC_EMBEDDING.name}) from "
            f"{DYNAMIC_EMBEDDING.source}, or {DECA_EMBEDDING.name} from {DECA_EMBEDDING.source}, {alternative}"
        )
    return (
        f"a landmark embedding: {DECA_EMBEDDING.name} from {DECA_EMBEDDING.source}, or "
        f"{STATIC_EMBEDDING.name} + {DYNAMIC_EMBEDDING.name} from {DYNAMIC_EMBEDDING.source}, {alternative}"
    )


def _landmarker_status(models_dir: Path, cache_dir: Path) -> FileStatus:
    places = ((models_dir / LANDMARKER_NAME, "found"), (cache_dir / LANDMARKER_NAME, f"cached in {cache_dir}"))
    for path, where in places:
        if path.is_file():
            digest = sha256_of(path)
            state = where if digest == LANDMARKER_SHA256 else f"{where} (not the official file)"
            return FileStatus(FACE_LANDMARKER, path, digest, state, required=True, needed_for=Need.AUTO.value)
    return FileStatus(
        FACE_LANDMARKER, None, None, "missing (downloads on first use)", required=True, needed_for=Need.AUTO.value
    )
