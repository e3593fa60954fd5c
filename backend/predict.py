"""Photo -> avatar vector: load, detect, align, estimate, decode.

    from likeness.backend.predict import Predictor
    predictor = Predictor("default", "estimator.onnx")          # pack name/folder or a Pack
    result = predictor.predict("selfie.jpg")
    result.vector.to_json()          # the avatar vector
    result.alternatives["hair"]      # top-3 (option id, label, probability) per slot
    result.warnings                  # things the user should know (several faces, small face, ...)
    result.colour_sources            # {"hair": "photo", "skin": "photo", "lips": "model", ...}

Colours: with ``colours="photo"`` (the default when the face parser and the pack's colour
calibration are found, ``backend.models``) colour parameters come from the photo itself: the parser
segments the aligned crop, each region's robust colour (measured on a second, 256 px crop) is
matched to the pack's calibrated engine colours (``backend.colour_match``), and the estimator's
values are kept for a region that is too small, has no engine colour near enough, or that the
parser's metadata leaves to the model (the shipped parser reads hair, skin and lips; eyes stay the
estimator's). ``colours="model"`` keeps the estimator's values throughout.

Headwear from the photo: in photo mode the same parse also says whether a hat is there (its hat
pixels' share of the frame against the parser's rule, ``<parser>.rules.json``, chosen on TRAIN photos;
the rule validation applies to true masks where a parser has none). Trained
mostly on renders, the estimator misses many real hats (beanies, dark or white caps, scarves): when
it says "none" and the parse shows a hat, the likeliest headwear option is taken instead
(``Prediction.presence_sources``). Measured on the 256 validation photos: headwear balanced accuracy
0.706 -> 0.82 (README); glasses gained nothing that way, so they stay the estimator's.

What the avatar shows, from the photo: in photo mode the attribute reader (``backend.attributes``:
frozen face networks trained on millions of faces, heads fitted on viewed labels) reads glasses and
their type, facial hair, hair length, fringe, hat, hair colour and skin tone. Each slot whose options
carry the matching tag takes the estimator's likeliest option among those showing the read class
(the hairstyle is then re-chosen for the hair amount within that class), and hair and skin colours are
matched only among the engine colours the colour rule reads as the read class where the reader is
at least ``min_confidence`` sure, else as the class of the photo's own colour (so the render shows
the photo colour's category even where the nearest engine colour lies across a boundary). Without
the reader's files, or with ``attributes="model"``, the parse rules below for hats and fringes
apply instead (``Prediction.attributes`` is then empty).

Policy for difficult photos (errors are ``UserError``: the CLI prints one line, the add-on a report):
  * no face: error "no face found in <file>" (upright first, then turned by 90/270/180 degrees, for
    photos whose orientation tag was lost; a face found that way gives a warning);
  * several faces: the largest is used, with a warning when another has at least a quarter of its
    area (a stronger one when two are about as large); smaller ones (background) are ignored;
  * small face: below ``MIN_EYE_DISTANCE_ERROR`` px between the eyes an error (the crop would be
    mostly interpolation), below ``MIN_EYE_DISTANCE_WARN`` a warning;
  * face cut off by the border: two or more landmarks outside the photo is an error, one landmark
    outside or more than ``CUT_OFF_WARN`` of the face box outside is a warning (the hidden part of
    the frame is filled like the training photos', but what the estimator sees there is guessed);
  * face turned away (nose far off the eyes' midline) or strongly tilted: a warning.

Pure numpy + Pillow + onnxruntime: runs inside Blender.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from . import align as _align
from . import fidelity
from . import models as _models
from .colour_match import (COLOUR_CROP, ColourMatcher, ParserModel, PhotoColours, RegionColour,
                           load_calibration, measure_regions, parse_fringe, parse_shows)
from .contract import EstimatorModel, load_model
from .errors import UserError
from .face_detect import Face, detect_faces
from .image_io import describe, load_photo
from .schema import AvatarVector, Pack, find_pack
from .attributes import COLOUR_REGIONS as READER_REGIONS, SOFT_PARTS
from .viewer import COLOUR_READING, TAG_READING

MIN_EYE_DISTANCE_ERROR = 16.0   # px in the photo
MIN_EYE_DISTANCE_WARN = 40.0
CUT_OFF_WARN = 0.10             # fraction of the face box outside the photo
TURNED_WARN = 0.35              # |nose offset from the eyes' midline| / eye distance (3.5 % of CelebA-HQ)
TILT_WARN = 30.0                # degrees of roll
SIMILAR_SIZE = 0.8              # a second face with this fraction of the largest's area: ambiguous
OTHER_FACE = 0.25               # smaller faces (background people, false alarms) are not mentioned
TOP_K = 3
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif")
COLOUR_MODES = ("photo", "model")

Photo = Union[str, os.PathLike, bytes, bytearray, np.ndarray]


@dataclass(frozen=True)
class Alternative:
    option: str
    label: str
    probability: float


@dataclass
class Prediction:
    source: str
    vector: AvatarVector
    continuous: np.ndarray                          # normalised [0, 1], pack parameter order
    probabilities: dict[str, dict[str, float]]      # slot -> option id -> probability
    alternatives: dict[str, list[Alternative]]      # slot -> top-3, most likely first
    crop: np.ndarray                                # the aligned face the estimator saw
    face: Face                                      # in the photo's pixels (as loaded)
    aligned: _align.AlignedFace
    photo_size: tuple[int, int]                     # (width, height) as loaded
    n_faces: int
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)   # seconds
    colours: dict[str, RegionColour] = field(default_factory=dict)   # region -> where it came from
    colour_mode: str = "model"                      # what the predictor was set to
    colour_note: str = ""
    presence_sources: dict[str, str] = field(default_factory=dict)  # tag -> "photo" | "model"
    shape_from_photo: list[str] = field(default_factory=list)     # measures the sliders (and, for
                                                                  # hair_fraction, the hairstyle) follow
    attributes: dict[str, dict[str, float]] = field(default_factory=dict)  # the attribute reader's
                                                  # attribute -> class -> probability (empty: no reader)

    @property
    def colour_sources(self) -> dict[str, str]:
        """Per colour region: "photo" or "model" (the estimator)."""
        return {r: self.colours[r].source if r in self.colours else "model" for r in fidelity.COLOURS}

    def to_json(self) -> dict[str, Any]:
        colours: dict[str, Any] = {"mode": self.colour_mode, "sources": self.colour_sources}
        if self.colour_note:
            colours["note"] = self.colour_note
        if self.colours:
            colours["regions"] = {r: c.to_json() for r, c in self.colours.items()}
        return {
            "source": self.source,
            "vector": self.vector.to_json(),
            "slots": {s: {"choice": self.vector.slots[s],
                          "probability": round(self.probabilities[s][self.vector.slots[s]], 4),
                          "alternatives": [{"option": a.option, "label": a.label,
                                            "probability": round(a.probability, 4)} for a in alts]}
                      for s, alts in self.alternatives.items()},
            "face": self.face.to_json(),
            "faces_found": self.n_faces,
            "photo_size": list(self.photo_size),
            "colours": colours,
            "presence_sources": dict(self.presence_sources),
            "attributes": {a: {c: round(v, 4) for c, v in p.items()} for a, p in self.attributes.items()},
            "shape_from_photo": list(self.shape_from_photo),
            "warnings": list(self.warnings),
            "timings_ms": {k: round(v * 1000, 1) for k, v in self.timings.items()},
        }


@dataclass
class Failure:
    """A photo of ``predict_many`` that could not be turned into a vector."""
    source: str
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "error": self.error}


@dataclass
class _Prepared:
    source: str
    crop: np.ndarray
    face: Face
    aligned: _align.AlignedFace
    photo_size: tuple[int, int]
    n_faces: int
    warnings: list[str]
    timings: dict[str, float]
    colour_crop: np.ndarray | None = None            # a larger aligned crop to measure colours on


def _outside_fraction(box: np.ndarray, W: int, H: int) -> float:
    x0, y0, x1, y1 = box
    area = max(1e-9, (x1 - x0) * (y1 - y0))
    ix = max(0.0, min(x1, W) - max(x0, 0.0))
    iy = max(0.0, min(y1, H) - max(y0, 0.0))
    return 1.0 - ix * iy / area


# The presence tags the real-photo loss trains (facial hair: from the photo pixels, fidelity.facial_hair_cue).
PRESENCE_TAGS = ("glasses", "headwear", "earrings", "bangs", "facial_hair")
# Presence the photo's parse may switch on (hats: colour_match.PARSE_PRESENCE's pixel rule; the
# fringe: colour_match.parse_fringe's forehead band). Glasses gained nothing that way.
PHOTO_PRESENCE = ("headwear", "bangs")


def _parse_presence(parts: np.ndarray, names: Sequence[str], tag: str,
                    rules: Mapping[str, float] | None = None) -> bool:
    """Whether one parsed crop shows ``tag``: by the parser's own rule (``rules``, its
    ``.rules.json``, chosen on TRAIN photos) where it has one, else by validation's rule for true masks."""
    threshold = (rules or {}).get(tag)
    if tag == "bangs":
        return bool(parse_fringe(parts[None], names, threshold)[0] == 1)
    return bool(parse_shows(parts, names, tag, threshold))


def choose_option(slot, p: np.ndarray) -> int:
    """The option to apply for one slot's probabilities.

    For a presence slot (its options carry a presence tag, some "none"), first decide presence
    (P(none) summed over the "none" options against 0.5), then take the likeliest option of that
    side. Plain argmax would let "none" win at 0.35 while the other options together hold 0.65,
    and presence is what the estimator's real-photo loss trains and what users notice first.
    """
    tag = next((t for t in PRESENCE_TAGS if any(t in o.tags for o in slot.options)), None)
    if tag is None:
        return int(np.argmax(p))
    is_none = np.array([o.tags.get(tag) == "none" for o in slot.options])
    if not is_none.any() or is_none.all():
        return int(np.argmax(p))
    side = is_none if p[is_none].sum() >= 0.5 else ~is_none
    return int(np.flatnonzero(side)[np.argmax(p[side])])


def check_face(face: Face, faces: list[Face], W: int, H: int, name: str) -> list[str]:
    """Warnings for the chosen face; raises ``UserError`` when it cannot give a usable crop."""
    warnings = []
    eye = face.eye_distance
    if eye < MIN_EYE_DISTANCE_ERROR:
        raise UserError(f"the face in {name} is too small ({eye:.0f} px between the eyes, at least "
                        f"{MIN_EYE_DISTANCE_ERROR:.0f} needed): use a closer or higher-resolution photo")
    lm = face.landmarks
    outside = int(np.sum((lm[:, 0] < 0) | (lm[:, 1] < 0) | (lm[:, 0] > W) | (lm[:, 1] > H)))
    if outside >= 2:
        raise UserError(f"the face in {name} is cut off by the image border: use a photo showing "
                        "the whole face")
    others = [f for f in faces[1:] if f.area >= OTHER_FACE * face.area]
    if others:
        n = len(others) + 1
        if others[0].area >= SIMILAR_SIZE * face.area:
            warnings.append(f"{n} faces found, two of about the same size; using the larger one: "
                            "crop the photo to one person to be sure")
        else:
            warnings.append(f"{n} faces found; using the largest")
    if eye < MIN_EYE_DISTANCE_WARN:
        warnings.append(f"the face is small ({eye:.0f} px between the eyes; {MIN_EYE_DISTANCE_WARN:.0f}+ "
                        "recommended): details may be lost")
    frac = _outside_fraction(face.box, W, H)
    if outside == 1 or frac > CUT_OFF_WARN:
        warnings.append(f"the face is partly outside the photo ({frac:.0%} of it): the hidden part is guessed")
    return warnings


def _pose_warnings(aligned: _align.AlignedFace, face: Face) -> list[str]:
    out = []
    dx, dy = face.landmarks[1] - face.landmarks[0]
    roll = math.degrees(math.atan2(dy, dx))
    if abs(roll) > 60:
        out.append(f"the photo seems rotated (the face is turned {roll:+.0f} degrees); it was straightened")
    elif abs(roll) > TILT_WARN:
        out.append(f"the head is strongly tilted ({roll:+.0f} degrees); it was straightened")
    lm = aligned.landmarks
    eye_mid = lm[:2].mean(axis=0)
    eye_dist = float(np.hypot(*(lm[1] - lm[0])))
    turn = (lm[2, 0] - eye_mid[0]) / max(eye_dist, 1e-9)
    if abs(turn) > TURNED_WARN:
        out.append("the face is turned away from the camera; a frontal photo works best")
    return out


def expand_photos(items: Iterable[Photo]) -> list[Photo]:
    """Folders become their image files (sorted, not recursive); other items are kept.
    A folder without a single photo of a supported type is a ``UserError`` naming the types.
    """
    out: list[Photo] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
            files = sorted(p for p in Path(item).iterdir() if p.is_file() and not p.name.startswith("."))
            found = [str(p) for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                kinds = sorted({p.suffix.lower() or "extension-less" for p in files})
                held = f"it holds only {', '.join(kinds)} files" if kinds else "it is empty"
                raise UserError(f"no photos in {item}: {held}; supported types: "
                                f"{' '.join(IMAGE_SUFFIXES)} (convert HEIC/AVIF photos to JPEG or PNG)")
            out.extend(found)
        else:
            out.append(item)
    return out


def prepare_photo(photo: Photo, name: str | None = None, size: int = 256,
                  try_rotations: bool = True, colour_size: int | None = None) -> _Prepared:
    """Load, detect and align one photo into a ``size`` px crop (everything before an estimator).

    ``Predictor.prepare`` and the evaluation harness (which aligns once for every method) share it;
    an unusable photo raises ``UserError``. ``colour_size``: also align a crop of that size for
    measuring colours (``_Prepared.colour_crop``).
    """
    timings = {}
    t0 = time.perf_counter()
    if isinstance(photo, np.ndarray):
        name = name or "<image>"
        rgb = np.asarray(photo)
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
            raise UserError(f"{name}: expected an RGB image array, got shape {rgb.shape}")
        if rgb.dtype != np.uint8:
            rgb = np.clip(rgb * (255.0 if rgb.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        rgb = np.ascontiguousarray(rgb[..., :3])
    else:
        name = name or describe(photo)
        rgb = load_photo(photo, name=name)
    t1 = time.perf_counter()
    timings["load"] = t1 - t0
    faces = detect_faces(rgb, try_rotations=try_rotations)
    t2 = time.perf_counter()
    timings["detect"] = t2 - t1
    if not faces:
        raise UserError(f"no face found in {name}: use a photo where the face is clearly visible "
                        "and not too small")
    H, W = rgb.shape[:2]
    face = faces[0]
    warnings = check_face(face, faces, W, H, name)
    aligned = _align.align_face(rgb, face, size=size)
    colour_crop = None
    if colour_size and colour_size != size:
        colour_crop = _align.align_face(rgb, face, size=colour_size).crop
    timings["align"] = time.perf_counter() - t2
    warnings += _pose_warnings(aligned, face)
    return _Prepared(name, aligned.crop, face, aligned, (W, H), len(faces), warnings, timings,
                     colour_crop)


class Predictor:
    """An estimator for one pack, ready to turn photos into avatar vectors.

    ``device``: "auto" (CUDA when onnxruntime-gpu can, else CPU), "cpu" or "cuda".
    ``threads``: onnxruntime threads for the estimator and the parser (0: all cores).
    ``colours``: "photo" or "model" (see the module notes); None: "photo" when a face parser and
    the pack's calibration are found, else "model" (``colour_note`` says why). "photo" without
    them also falls back to the model, with a warning on every prediction.
    ``parser``, ``calibration``: a parser .onnx, a calibration .json (or its dict); default
    ``backend.models.find_parser`` / ``find_calibration``. ``photo_regions``: the regions read
    from the photo (default: the parser's ``likeness.colour_regions``).
    """

    def __init__(self, pack: Pack | str | os.PathLike, model_path: str | os.PathLike,
                 device: str = "auto", threads: int = 0, try_rotations: bool = True,
                 colours: str | None = None, parser: str | os.PathLike | None = None,
                 calibration: str | os.PathLike | Mapping[str, Any] | None = None,
                 photo_regions: Sequence[str] | None = None, shape: str | None = None,
                 shape_table: str | os.PathLike | None = None, attributes: str | None = None,
                 reader: str | os.PathLike | None = None):
        self.pack = pack if isinstance(pack, Pack) else find_pack(pack)
        t = time.perf_counter()
        self.model: EstimatorModel = load_model(model_path, self.pack, device=device, threads=threads)
        self.try_rotations = try_rotations
        self._setup_colours(colours, parser, calibration, photo_regions, model_path, device, threads)
        self._setup_shape(shape, shape_table, model_path)
        self._setup_reader(attributes, reader, device)
        self.load_seconds = time.perf_counter() - t

    def _setup_colours(self, colours, parser, calibration, photo_regions, model_path, device, threads):
        if colours is not None and colours not in COLOUR_MODES:
            raise UserError(f"colours must be 'photo' or 'model', not {colours!r}")
        self.photo: PhotoColours | None = None
        self.colour_note, self._colour_warning = "", ""
        if colours == "model":
            self.colour_note = "colours from the estimator, as asked"
            return
        parser_path = Path(parser) if parser is not None else _models.find_parser(self.pack, model_path)
        cal_path = None
        if not isinstance(calibration, Mapping):
            cal_path = Path(calibration) if calibration is not None else \
                _models.find_calibration(self.pack, model_path)
        missing = []
        if parser_path is None or not parser_path.is_file():
            missing.append(f"no face parser ({parser_path or _models.PARSER})")
        if not isinstance(calibration, Mapping) and (cal_path is None or not cal_path.is_file()):
            missing.append(f"no colour calibration for pack '{self.pack.id}' "
                           f"({cal_path or _models.CALIBRATION + ' beside the estimator'})")
        if missing:
            self.colour_note = "colours from the estimator: " + "; ".join(missing)
            if colours == "photo":                  # asked for explicitly: say so on every result
                self._colour_warning = self.colour_note
            return
        if cal_path is not None:
            cal, source = load_calibration(cal_path, self.pack), str(cal_path)
        else:
            cal, source = calibration, "the given colour calibration"
        matcher = ColourMatcher(self.pack, cal, source)
        self.photo = PhotoColours(self.pack, ParserModel(parser_path, device=device, threads=threads),
                                  matcher, photo_regions)
        self.colour_note = (f"colours of {', '.join(self.photo.regions)} from the photo"
                            if self.photo.regions else "no colour region is read from the photo")

    def _setup_shape(self, shape, table, model_path):
        """``shape``: "photo" (sliders from the parse, ``backend.shape_match``), "model", or None:
        "photo" when the photo is parsed anyway (colours from the photo) and the pack's
        ``shape.json`` is beside the estimator (or ``shape_table``)."""
        from .shape_match import load_shape_table
        if shape is not None and shape not in COLOUR_MODES:
            raise UserError(f"shape must be 'photo' or 'model', not {shape!r}")
        self.shape = None
        self.shape_note = "shape from the estimator"
        if shape == "model":
            return
        path = Path(table) if table is not None else _models.find_shape(self.pack, model_path)
        missing = []
        if self.photo is None:
            missing.append("the photo is not parsed (colours from the model)")
        if path is None or not path.is_file():
            missing.append(f"no shape table ({path or _models.SHAPE + ' beside the estimator'})")
        if missing:
            self.shape_note += ": " + "; ".join(missing)
            if shape == "photo":
                raise UserError("shape from the photo is not possible: " + "; ".join(missing))
            return
        self.shape = load_shape_table(path, self.pack)
        self.shape_note = f"shape sliders fitted to the photo's {', '.join(self.shape.measures)}"
        if self.shape.hair is not None:
            self.shape_note += "; hairstyle chosen for the photo's hair amount"

    def _setup_reader(self, attributes, folder, device):
        """``attributes``: "photo" (the attribute reader decides what the avatar shows: options
        through their tags, hair and skin colours through the colour rule's categories), "model"
        (the estimator and the parse rules alone), or None: "photo" when the photo is parsed and the
        reader's files are found (``backend.attributes``)."""
        from .attributes import AttributeReader, find_reader
        from .viewer import ColourCategories, default_colour_rule
        if attributes is not None and attributes not in COLOUR_MODES:
            raise UserError(f"attributes must be 'photo' or 'model', not {attributes!r}")
        self.reader, self.colour_rule = None, None
        self.reader_note = "attributes from the estimator"
        if attributes == "model":
            return
        path = Path(folder) if folder is not None else find_reader()
        missing = []
        if self.photo is None:
            missing.append("the photo is not parsed (colours from the model)")
        if path is None or not (path / "reader.json").is_file():
            missing.append("no attribute reader (models/attributes/reader.json)")
        if missing:
            self.reader_note += ": " + "; ".join(missing)
            if attributes == "photo":
                raise UserError("attributes from the photo are not possible: " + "; ".join(missing))
            return
        self.reader = AttributeReader(path, device=device, threads=1)
        rule = path / "colour_rule.json"
        self.colour_rule = ColourCategories.load(rule) if rule.is_file() else default_colour_rule()
        self.reader_note = "what the avatar shows read from the photo (attribute reader)"

    @property
    def colour_mode(self) -> str:
        return "photo" if self.photo is not None else "model"

    @property
    def input_size(self) -> int:
        return self.model.input_size

    # ---- stages ---------------------------------------------------------------------------
    def prepare(self, photo: Photo, name: str | None = None) -> _Prepared:
        """Load, detect and align one photo (everything before the estimator)."""
        return prepare_photo(photo, name, self.model.input_size, self.try_rotations,
                             COLOUR_CROP if self.photo is not None else None)

    def _parse(self, crops: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(part maps of the crops for photo colours, the parser's ``SOFT_PARTS`` probabilities for
        a reader that reads them); (None, None) in model mode."""
        if self.photo is None:
            return None, None
        # a reader with parsers of its own parses the crop itself (AttributeReader.read_own)
        if self.reader is not None and self.reader.parse_soft and not self.reader.parsers:
            return self.photo.parser.run_soft(crops, SOFT_PARTS)
        return self.photo.parser.run(crops), None

    def _decode(self, prep: _Prepared, cont: np.ndarray, probs: list[np.ndarray],
                parts: np.ndarray | None = None, soft: np.ndarray | None = None) -> Prediction:
        pack = self.pack
        choice = [choose_option(slot, p) for slot, p in zip(pack.slots, probs)]
        reading, measured, hair_allowed = {}, None, None
        if self.reader is not None and parts is not None:
            t = time.perf_counter()
            crop = prep.colour_crop if prep.colour_crop is not None else prep.crop
            regions = tuple(dict.fromkeys(self.photo.regions + READER_REGIONS))
            measured = measure_regions(crop, parts, self.photo.parser.parts, regions)
            reading = self.reader.read_own(prep.crop, crop) if self.reader.parsers else \
                self.reader.read(prep.crop, parts, self.photo.parser.parts, measured, crop, soft)
            presence, hair_allowed = self._attribute_choice(choice, probs, reading)
            prep.timings["attributes"] = time.perf_counter() - t
        else:
            presence = self._photo_presence(choice, probs, parts)
        shape_from: list[str] = []
        if self.shape is not None and parts is not None:
            from .shape_match import photo_hair_fraction, photo_measures, photo_side_hair
            t = time.perf_counter()
            parser_parts = self.photo.parser.parts
            choice, _ = self.shape.choose_hair(cont, choice, probs,
                                               photo_hair_fraction(parts, parser_parts),
                                               allowed=hair_allowed,
                                               side_share=photo_side_hair(parts, parser_parts))
            cont, shape_from = self.shape.fit(cont, choice, photo_measures(parts, parser_parts))
            if self.shape.hair is not None:
                shape_from.append("hair_fraction")
            prep.timings["shape"] = time.perf_counter() - t
        colours: dict[str, RegionColour] = {}
        if self.photo is not None and parts is not None:
            t = time.perf_counter()
            cont = np.array(cont, np.float32)
            slots = {s.name: s.options[c].id for s, c in zip(pack.slots, choice)}
            crop = prep.colour_crop if prep.colour_crop is not None else prep.crop
            categories = self._colour_categories(reading, measured) if reading else None
            colours = self.photo.apply(crop, parts, cont, slots, measured=measured,
                                       categories=categories)
            prep.timings["colours"] = time.perf_counter() - t
        if self._colour_warning:
            prep.warnings.append(self._colour_warning)
        vector = pack.vector_from_arrays(cont.tolist(), choice)
        probabilities, alternatives = {}, {}
        for slot, p in zip(pack.slots, probs):
            probabilities[slot.name] = {o.id: float(v) for o, v in zip(slot.options, p)}
            top = np.argsort(-p, kind="stable")[:TOP_K]
            alternatives[slot.name] = [Alternative(slot.options[i].id, slot.options[i].label, float(p[i]))
                                       for i in top]
        return Prediction(source=prep.source, vector=vector, continuous=np.asarray(cont, np.float32),
                          probabilities=probabilities, alternatives=alternatives, crop=prep.crop,
                          face=prep.face, aligned=prep.aligned, photo_size=prep.photo_size,
                          n_faces=prep.n_faces, warnings=prep.warnings, timings=prep.timings,
                          colours=colours, colour_mode=self.colour_mode, colour_note=self.colour_note,
                          presence_sources=presence, shape_from_photo=shape_from,
                          attributes=reading)

    def _colour_categories(self, reading, measured) -> dict[str, tuple] | None:
        """Region -> (rule, attribute, class) the engine colour must be read as: the reader's class
        where it is at least ``min_confidence`` sure, else the class of the photo's own colour, so
        the render shows the category the photo's colour is in even where the nearest engine colour
        (or its render on this hairstyle) strays across the boundary."""
        if self.colour_rule is None:
            return None
        out = {}
        for attr, region in COLOUR_READING.items():
            if attr not in reading:
                continue
            if max(reading[attr].values()) >= self.reader.min_confidence[attr]:
                out[region] = (self.colour_rule, attr, max(reading[attr], key=reading[attr].get))
            elif measured and measured.get(region) is not None:
                out[region] = (self.colour_rule, attr, self.colour_rule.classify(attr, measured[region]))
        return out

    def _attribute_choice(self, choice: list[int], probs, reading) -> tuple[dict[str, str], dict]:
        """Each tag-read attribute's slot takes the estimator's likeliest option among those that
        show the reader's class (``choice`` updated in place). Returns (tag -> "photo" | "model",
        slot index -> allowed options mask for the hair re-choice)."""
        sources, allowed = {}, {}
        for attr, (tag, classes) in TAG_READING.items():
            if attr not in reading:
                continue
            want = max(reading[attr], key=reading[attr].get)
            for k, slot in enumerate(self.pack.slots):
                shows = [classes.get(o.tags.get(tag)) for o in slot.options]
                if not any(shows):
                    continue
                ok = np.array([c == want for c in shows])
                if attr == "glasses" and want == "any" and "glasses_type" in reading:
                    kinds = [o.tags.get(tag) for o in slot.options]
                    t = reading["glasses_type"]
                    kind = "sunglasses" if t.get("sunglasses", 0) > t.get("eyeglasses", 0) else "eyeglasses"
                    if any(k == kind for k in kinds):
                        ok &= np.array([k == kind for k in kinds])
                if not ok.any():
                    sources[tag] = "model"
                    continue
                allowed[k] = ok
                if ok[choice[k]]:
                    sources[tag] = "model"
                else:
                    p = np.asarray(probs[k])
                    choice[k] = int(np.flatnonzero(ok)[np.argmax(p[ok])])
                    sources[tag] = "photo"
        return sources, allowed

    def _photo_presence(self, choice: list[int], probs, parts: np.ndarray | None) -> dict[str, str]:
        """Switch on what the photo's parse shows and the estimator missed (``PHOTO_PRESENCE``);
        ``choice`` is updated in place. Returns tag -> "photo" | "model" for those tags."""
        if self.photo is None or parts is None:
            return {}
        names = self.photo.parser.parts
        out = {}
        for k, slot in enumerate(self.pack.slots):
            tag = next((t for t in PHOTO_PRESENCE if any(t in o.tags for o in slot.options)), None)
            if tag is None:
                continue
            none = np.array([o.tags.get(tag) == "none" for o in slot.options])
            out[tag] = "model"
            if none.all() or not none[choice[k]]:
                continue
            if _parse_presence(parts, names, tag, self.photo.parser.rules):
                p = np.asarray(probs[k])
                choice[k] = int(np.flatnonzero(~none)[np.argmax(p[~none])])
                out[tag] = "photo"
        return out

    def run_estimator(self, crops: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The estimator on the crops [N, S, S, 3] and their mirror images in one batch: the
        options' probabilities are the mean of both, so a photo and its mirror image (the other
        side of one face) get the same options; the sliders are the photo's own (a parting or a
        tilt has a side)."""
        n = len(crops)
        cont, probs = self.model.run(np.concatenate([crops, crops[:, :, ::-1]]))
        return cont[:n], [(p[:n] + p[n:]) / 2 for p in probs]

    # ---- public ---------------------------------------------------------------------------
    def predict(self, photo: Photo, name: str | None = None) -> Prediction:
        """One photo (path, encoded bytes or RGB array) -> ``Prediction``; ``UserError`` if unusable."""
        t0 = time.perf_counter()
        prep = self.prepare(photo, name)
        t1 = time.perf_counter()
        cont, probs = self.run_estimator(prep.crop[None])
        t2 = time.perf_counter()
        prep.timings["estimator"] = t2 - t1
        parts, soft = self._parse(prep.crop[None])
        if parts is not None:
            prep.timings["parser"] = time.perf_counter() - t2
        result = self._decode(prep, cont[0], [p[0] for p in probs], None if parts is None else parts[0],
                              None if soft is None else soft[0])
        result.timings["total"] = time.perf_counter() - t0
        return result

    def predict_many(self, photos: Iterable[Photo], batch_size: int = 16,
                     on_error: str = "collect") -> list[Prediction | Failure]:
        """Many photos (folders expand to their images) in one process, the estimator batched.

        Results keep the input order. ``on_error="collect"`` turns an unusable photo into a
        ``Failure`` and goes on; ``"raise"`` stops at the first. An estimator's batch time is
        shared equally by the photos of the batch in their ``timings["estimator"]``.
        """
        if on_error not in ("collect", "raise"):
            raise ValueError("on_error must be 'collect' or 'raise'")
        items = expand_photos(photos)
        results: list[Prediction | Failure | None] = [None] * len(items)
        pending: list[tuple[int, _Prepared]] = []

        def flush():
            if not pending:
                return
            t = time.perf_counter()
            crops = np.stack([p.crop for _, p in pending])
            cont, probs = self.run_estimator(crops)
            t2 = time.perf_counter()
            parts, soft = self._parse(crops)
            share, parse_share = (t2 - t) / len(pending), (time.perf_counter() - t2) / len(pending)
            for k, (i, prep) in enumerate(pending):
                prep.timings["estimator"] = share
                if parts is not None:
                    prep.timings["parser"] = parse_share
                r = self._decode(prep, cont[k], [p[k] for p in probs], None if parts is None else parts[k],
                                 None if soft is None else soft[k])
                r.timings["total"] = sum(v for key, v in r.timings.items() if key != "total")
                results[i] = r
            pending.clear()

        for i, item in enumerate(items):
            try:
                prep = self.prepare(item)
            except UserError as e:
                if on_error == "raise":
                    raise
                results[i] = Failure(describe(item) if not isinstance(item, np.ndarray) else "<image>", str(e))
                continue
            pending.append((i, prep))
            if len(pending) >= batch_size:
                flush()
        flush()
        return [r for r in results if r is not None]


def cli_predict(args) -> int:
    """CLI handler: ``args.photos`` (files/folders), ``args.model``, ``args.pack``, optional
    ``args.device``, ``args.out`` (JSON Lines file; stdout when absent), ``args.crops`` (folder).
    A photo that fails is a line ``{"source", "error"}``; exit 0 all done, 3 some failed
    (``outputs.EXIT_PARTIAL``), 1 none done. Crops are named like ``create``'s folders
    (``outputs.result_names``: face.jpg -> face_jpg.png)."""
    import json
    import sys
    from .outputs import EXIT_PARTIAL, check_output_dir, check_output_file, result_names
    crops = getattr(args, "crops", None)
    if getattr(args, "out", None):
        check_output_file(args.out)
    if crops:
        check_output_dir(crops, "--crops")
    expand_photos(args.photos)              # no photos at all: say so before loading the model
    pred = Predictor(args.pack, args.model, device=getattr(args, "device", "auto") or "auto")
    results = pred.predict_many(args.photos)
    names = result_names([r.source for r in results])
    out = open(args.out, "w", encoding="utf-8") if getattr(args, "out", None) else sys.stdout
    failed = 0
    try:
        for r, name in zip(results, names):
            out.write(json.dumps(r.to_json()) + "\n")
            if isinstance(r, Failure):
                failed += 1
                print(f"likeness predict: {r.error}", file=sys.stderr)
            elif crops:
                from PIL import Image
                Image.fromarray(r.crop).save(Path(crops) / f"{name}.png")
            if isinstance(r, Prediction):
                for w in r.warnings:
                    print(f"likeness predict: {r.source}: warning: {w}", file=sys.stderr)
    finally:
        if out is not sys.stdout:
            out.close()
    if failed and failed < len(results):
        print(f"likeness predict: {failed} of {len(results)} photos failed (their lines carry "
              "\"error\")", file=sys.stderr)
    if results and failed == len(results):
        return 1
    return EXIT_PARTIAL if failed else 0
