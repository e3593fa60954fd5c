"""Asset packs and avatar vectors: the schema every part of Likeness shares.

Pure Python (stdlib only) so it runs in Blender, in the backend, in training and in tests.

A pack is a folder with a ``pack.toml`` manifest. The manifest declares
  * continuous parameters: name, group, range, default, sampling distribution, and what they drive
    (shape keys, object properties, material colours);
  * discrete slots: options with ids, labels, attribute tags, sampling weights, and what each option
    shows (objects) or sets (shape keys);
  * the segmentation classes of its materials (CelebAMask-HQ vocabulary).

An avatar vector has two faithful forms:
  * JSON: ``{"pack": id, "schema": hash, "params": {name: value}, "slots": {name: option_id}}``
  * arrays: continuous values normalised to [0, 1] in declaration order, one option index per slot.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import UserError

SCHEMA_VERSION = 1

# CelebAMask-HQ label ids: one segmentation vocabulary for photos and avatars.
CLASSES = (
    "background", "skin", "nose", "eyeglasses", "l_eye", "r_eye", "l_brow", "r_brow",
    "l_ear", "r_ear", "mouth", "u_lip", "l_lip", "hair", "hat", "earring", "necklace",
    "neck", "cloth",
)
CLASS_IDS = {name: i for i, name in enumerate(CLASSES)}

# Attribute tags shared across packs, so priors, UI filters and evaluation can reason about options.
TAG_VOCABULARY: dict[str, tuple[str, ...]] = {
    "hair_length": ("bald", "buzz", "short", "medium", "long"),
    "facial_hair": ("none", "stubble", "mustache", "goatee", "beard"),
    "glasses": ("none", "eyeglasses", "sunglasses"),
    "headwear": ("none", "hat"),
    "earrings": ("none", "earrings"),
    "bangs": ("none", "bangs"),
    "hair_texture": ("straight", "wavy", "curly"),
}

DISTRIBUTIONS = ("uniform", "normal", "beta")
PACKS_DIR = Path(__file__).resolve().parent.parent / "packs"
PACK_ALIASES = {"default": "stylized"}


class SchemaError(UserError, ValueError):
    """A pack manifest or an avatar vector is invalid. The message names the offending field."""


# --------------------------------------------------------------------------------------------
# Manifest data
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Drive:
    """One thing a continuous parameter drives. Kinds:

    * ``shape_key``: ``object``, ``key``; key value = value * scale + offset.
    * ``property``: ``object``, ``path`` (RNA path such as ``scale``), optional ``index``;
      property = value * scale + offset.
    * ``ramp``: ``materials``, ``colors`` (hex sRGB stops); the colour at ``value`` along the stops.
    * ``tint``: ``materials``, ``color`` (hex); lerp the current colour toward ``color`` by value*scale.
    Colour drives apply in manifest order, so a ramp sets a base that later tints modify.
    """
    kind: str
    object: str = ""
    key: str = ""
    path: str = ""
    index: int = -1
    materials: tuple[str, ...] = ()
    colors: tuple[str, ...] = ()
    color: str = ""
    scale: float = 1.0
    offset: float = 0.0


@dataclass(frozen=True)
class Parameter:
    name: str
    group: str
    min: float
    max: float
    default: float
    label: str = ""
    distribution: str = "uniform"
    mean: float | None = None     # normal: in parameter units
    std: float | None = None
    alpha: float | None = None    # beta: over the normalised [0, 1] range
    beta: float | None = None
    drives: tuple[Drive, ...] = ()

    def normalize(self, value: float) -> float:
        return (value - self.min) / (self.max - self.min)

    def denormalize(self, u: float) -> float:
        return self.min + u * (self.max - self.min)


@dataclass(frozen=True)
class Option:
    id: str
    label: str
    tags: Mapping[str, str] = field(default_factory=dict)
    weight: float = 1.0
    show: tuple[str, ...] = ()                           # object names made visible
    shape_keys: Mapping[str, float] = field(default_factory=dict)  # "Object:key" -> value


@dataclass(frozen=True)
class Slot:
    name: str
    label: str
    options: tuple[Option, ...]
    default: str = ""

    @property
    def option_ids(self) -> tuple[str, ...]:
        return tuple(o.id for o in self.options)

    def index(self, option_id: str) -> int:
        try:
            return self.option_ids.index(option_id)
        except ValueError:
            raise SchemaError(
                f"slot '{self.name}': unknown option '{option_id}' "
                f"(options: {', '.join(self.option_ids)})") from None

    def option(self, option_id: str) -> Option:
        return self.options[self.index(option_id)]

    @property
    def controlled_objects(self) -> tuple[str, ...]:
        """Every object any option of this slot shows; the chosen option's stay visible."""
        seen: dict[str, None] = {}
        for o in self.options:
            for name in o.show:
                seen.setdefault(name, None)
        return tuple(seen)

    @property
    def controlled_shape_keys(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for o in self.options:
            for name in o.shape_keys:
                seen.setdefault(name, None)
        return tuple(seen)


@dataclass(frozen=True)
class Pack:
    id: str
    name: str
    version: str
    root: Path
    parameters: tuple[Parameter, ...]
    slots: tuple[Slot, ...]
    segmentation: Mapping[str, str]       # material-name pattern -> class name
    blend: str = ""                       # .blend file relative to root ("" for code-built packs)
    builder: str = ""                     # built-in builder name for packs built by code
    collection: str = "Likeness"          # collection holding the avatar
    camera: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    # ---- lookups -------------------------------------------------------------------------
    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    @property
    def slot_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.slots)

    def parameter(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise SchemaError(f"pack '{self.id}': unknown parameter '{name}'")

    def slot(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise SchemaError(f"pack '{self.id}': unknown slot '{name}'")

    @property
    def n_continuous(self) -> int:
        return len(self.parameters)

    @property
    def slot_sizes(self) -> tuple[int, ...]:
        return tuple(len(s.options) for s in self.slots)

    @property
    def n_options(self) -> int:
        return sum(self.slot_sizes)

    @property
    def schema_hash(self) -> str:
        """Hash of what a model depends on: parameter names and ranges, slot and option ids, order."""
        spine = {
            "v": SCHEMA_VERSION,
            "pack": self.id,
            "params": [[p.name, p.min, p.max] for p in self.parameters],
            "slots": [[s.name, list(s.option_ids)] for s in self.slots],
        }
        blob = json.dumps(spine, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def class_of_material(self, material: str) -> str | None:
        """Segmentation class of a material by the manifest's patterns (first match wins)."""
        for pattern, cls in self.segmentation.items():
            if fnmatch.fnmatchcase(material, pattern):
                return cls
        return None

    def tag_of(self, slot_name: str, option_id: str, tag: str) -> str | None:
        return self.slot(slot_name).option(option_id).tags.get(tag)

    def slots_with_tag(self, tag: str) -> tuple[str, ...]:
        return tuple(s.name for s in self.slots if any(tag in o.tags for o in s.options))

    def blend_path(self) -> Path | None:
        return (self.root / self.blend) if self.blend else None

    # ---- vectors --------------------------------------------------------------------------
    def default_vector(self) -> "AvatarVector":
        return AvatarVector(
            self, {p.name: p.default for p in self.parameters},
            {s.name: (s.default or s.options[0].id) for s in self.slots})

    def vector_from_json(self, data: Mapping[str, Any] | str, *, partial: bool = False) -> "AvatarVector":
        """Parse and validate the JSON form. ``partial`` fills missing entries with defaults.

        Every vector file Likeness writes is accepted: the bare vector (``apply``, the add-on's
        Export and Copy), a record holding it under ``"vector"`` (``create``'s ``vector.json`` with
        its probabilities, a dataset's ``vectors/N.json``) and a JSON Lines file with one such record
        (``predict --out`` of one photo)."""
        if isinstance(data, (bytes, bytearray)):
            try:
                data = bytes(data).decode("utf-8-sig")
            except UnicodeDecodeError:
                raise SchemaError("vector is not a text file (not UTF-8): expected vector JSON") from None
        if isinstance(data, str):
            data = _loads_vector_text(data)
        if isinstance(data, Mapping) and "params" not in data and "vector" in data:
            if "error" in data and not isinstance(data.get("vector"), Mapping):
                raise SchemaError(f"this record is a failed prediction: {data['error']}")
            data = data["vector"]
        elif isinstance(data, Mapping) and "params" not in data and "error" in data:
            raise SchemaError(f"this record is a failed prediction ({data.get('source', '?')}): "
                              f"{data['error']}")
        if not isinstance(data, Mapping):
            raise SchemaError("vector must be a JSON object with 'params' and 'slots'")
        pack_id = data.get("pack", self.id)
        if pack_id != self.id:
            raise SchemaError(f"wrong pack: vector is for pack '{pack_id}', expected '{self.id}'")
        schema = data.get("schema")
        if schema is not None and schema != self.schema_hash:
            raise SchemaError(
                f"stale schema: vector has schema {schema}, pack '{self.id}' is {self.schema_hash}")
        params = data.get("params", {})
        slots = data.get("slots", {})
        if not isinstance(params, Mapping) or not isinstance(slots, Mapping):
            raise SchemaError("'params' and 'slots' must be JSON objects")
        base = self.default_vector() if partial else None
        values: dict[str, float] = {}
        for name, value in params.items():
            p = self.parameter(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SchemaError(f"parameter '{name}': value {value!r} is not a finite number")
            if not (p.min <= value <= p.max):
                raise SchemaError(f"parameter '{name}': value {value} out of range [{p.min}, {p.max}]")
            values[name] = float(value)
        choices: dict[str, str] = {}
        for name, option_id in slots.items():
            s = self.slot(name)
            if not isinstance(option_id, str):
                raise SchemaError(f"slot '{name}': option must be a string id, got {option_id!r}")
            s.index(option_id)
            choices[name] = option_id
        for p in self.parameters:
            if p.name not in values:
                if base is None:
                    raise SchemaError(f"missing parameter '{p.name}'")
                values[p.name] = base.params[p.name]
        for s in self.slots:
            if s.name not in choices:
                if base is None:
                    raise SchemaError(f"missing slot '{s.name}'")
                choices[s.name] = base.slots[s.name]
        return AvatarVector(self, values, choices)

    def vector_from_arrays(self, continuous: Sequence[float], discrete: Sequence[int]) -> "AvatarVector":
        if len(continuous) != self.n_continuous:
            raise SchemaError(f"continuous array has {len(continuous)} values, pack '{self.id}' "
                              f"has {self.n_continuous} parameters")
        if len(discrete) != len(self.slots):
            raise SchemaError(f"discrete array has {len(discrete)} entries, pack '{self.id}' "
                              f"has {len(self.slots)} slots")
        values = {}
        for p, u in zip(self.parameters, continuous):
            u = float(u)
            if not math.isfinite(u):
                raise SchemaError(f"parameter '{p.name}': value {u} is not finite")
            values[p.name] = p.denormalize(min(1.0, max(0.0, u)))
        choices = {}
        for s, i in zip(self.slots, discrete):
            i = int(i)
            if not 0 <= i < len(s.options):
                raise SchemaError(f"slot '{s.name}': index {i} out of range [0, {len(s.options) - 1}]")
            choices[s.name] = s.options[i].id
        return AvatarVector(self, values, choices)

    def sample(self, rng: random.Random) -> "AvatarVector":
        """One random vector from the manifest's distributions and option weights."""
        values = {}
        for p in self.parameters:
            if p.distribution == "normal":
                mean = p.default if p.mean is None else p.mean
                std = (p.max - p.min) / 4 if p.std is None else p.std
                v = min(p.max, max(p.min, rng.gauss(mean, std)))
            elif p.distribution == "beta":
                v = p.denormalize(rng.betavariate(p.alpha or 1.0, p.beta or 1.0))
            else:
                v = rng.uniform(p.min, p.max)
            values[p.name] = v
        choices = {}
        for s in self.slots:
            choices[s.name] = rng.choices(s.options, weights=[o.weight for o in s.options])[0].id
        return AvatarVector(self, values, choices)

    def sample_seeded(self, seed: int, index: int) -> "AvatarVector":
        """The vector of sample ``index`` of a job seeded with ``seed``: independent of sharding."""
        return self.sample(random.Random(f"likeness:{self.id}:{seed}:{index}"))

    def info(self) -> dict[str, Any]:
        """Everything about the pack as plain JSON data (``likeness pack info --json``)."""
        return {
            "id": self.id, "name": self.name, "version": self.version, "root": str(self.root),
            "schema": self.schema_hash, "description": self.description,
            "counts": {"parameters": self.n_continuous, "slots": len(self.slots),
                       "options": self.n_options},
            "parameters": [
                {"name": p.name, "label": p.label or p.name, "group": p.group, "min": p.min,
                 "max": p.max, "default": p.default, "distribution": p.distribution,
                 "drives": [d.kind for d in p.drives]} for p in self.parameters],
            "slots": [
                {"name": s.name, "label": s.label, "default": s.default or s.options[0].id,
                 "options": [{"id": o.id, "label": o.label, "tags": dict(o.tags),
                              "weight": o.weight} for o in s.options]} for s in self.slots],
        }


@dataclass
class AvatarVector:
    """A validated point of a pack's avatar space. Build it through ``Pack`` methods."""
    pack: Pack
    params: dict[str, float]
    slots: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "pack": self.pack.id,
            "schema": self.pack.schema_hash,
            "params": {p.name: self.params[p.name] for p in self.pack.parameters},
            "slots": {s.name: self.slots[s.name] for s in self.pack.slots},
        }

    def dumps(self, **kw) -> str:
        return json.dumps(self.to_json(), **kw)

    def to_arrays(self) -> tuple[list[float], list[int]]:
        cont = [p.normalize(self.params[p.name]) for p in self.pack.parameters]
        disc = [s.index(self.slots[s.name]) for s in self.pack.slots]
        return cont, disc

    def tag(self, tag: str) -> str | None:
        """The value of an attribute tag across slots ('none' wins only if no slot says more)."""
        found = None
        for s in self.pack.slots:
            value = s.option(self.slots[s.name]).tags.get(tag)
            if value is not None and (found is None or found == "none"):
                found = value
        return found

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, AvatarVector) and other.pack.id == self.pack.id
                and other.params == self.params and other.slots == self.slots)


# --------------------------------------------------------------------------------------------
# Loading manifests
# --------------------------------------------------------------------------------------------

def _req(table: Mapping[str, Any], key: str, where: str, types: type | tuple) -> Any:
    if key not in table:
        raise SchemaError(f"{where}: missing '{key}'")
    value = table[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise SchemaError(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
    if not isinstance(value, types):
        raise SchemaError(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def _check_hex(color: str, where: str) -> str:
    c = color.lstrip("#")
    if len(c) != 6 or any(ch not in "0123456789abcdefABCDEF" for ch in c):
        raise SchemaError(f"{where}: '{color}' is not a hex colour like '#a0522d'")
    return "#" + c.lower()


def _loads_vector_text(text: str):
    """JSON, or JSON Lines holding exactly one record (``likeness predict --out`` of one photo)."""
    text = text.lstrip("\ufeff")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > 1:
            try:
                records = [json.loads(ln) for ln in lines]
            except json.JSONDecodeError:
                raise SchemaError(f"vector is not valid JSON: {e}") from None
            ok = [r for r in records if isinstance(r, Mapping) and "vector" in r]
            raise SchemaError(f"this is JSON Lines with {len(records)} records ({len(ok)} vectors, "
                              "e.g. `likeness predict --out` of several photos); save one line as "
                              "its own file") from None
        raise SchemaError(f"vector is not valid JSON: {e}") from None


def _parse_drive(d: Mapping[str, Any], where: str) -> Drive:
    kind = _req(d, "kind", where, str)
    num = (int, float)
    if kind == "shape_key":
        return Drive(kind, object=_req(d, "object", where, str), key=_req(d, "key", where, str),
                     scale=float(d.get("scale", 1.0)), offset=float(d.get("offset", 0.0)))
    if kind == "property":
        return Drive(kind, object=_req(d, "object", where, str), path=_req(d, "path", where, str),
                     index=int(d.get("index", -1)), scale=float(d.get("scale", 1.0)),
                     offset=float(d.get("offset", 0.0)))
    if kind in ("ramp", "tint"):
        mats = _req(d, "materials", where, list)
        if not mats or not all(isinstance(m, str) for m in mats):
            raise SchemaError(f"{where}: 'materials' must be a non-empty list of names")
        if kind == "ramp":
            colors = _req(d, "colors", where, list)
            if len(colors) < 2:
                raise SchemaError(f"{where}: a ramp needs at least two colours")
            return Drive(kind, materials=tuple(mats),
                         colors=tuple(_check_hex(c, where) for c in colors))
        scale = d.get("scale", 1.0)
        if not isinstance(scale, num):
            raise SchemaError(f"{where}: 'scale' must be a number")
        return Drive(kind, materials=tuple(mats), color=_check_hex(_req(d, "color", where, str), where),
                     scale=float(scale))
    raise SchemaError(f"{where}: unknown drive kind '{kind}' (shape_key, property, ramp, tint)")


def _parse_parameter(t: Mapping[str, Any], i: int) -> Parameter:
    where = f"parameters[{i}]"
    name = _req(t, "name", where, str)
    where = f"parameter '{name}'"
    num = (int, float)
    lo, hi = float(_req(t, "min", where, num)), float(_req(t, "max", where, num))
    if not lo < hi:
        raise SchemaError(f"{where}: min {lo} must be below max {hi}")
    default = float(t.get("default", (lo + hi) / 2))
    if not lo <= default <= hi:
        raise SchemaError(f"{where}: default {default} out of range [{lo}, {hi}]")
    dist = t.get("distribution", "uniform")
    if dist not in DISTRIBUTIONS:
        raise SchemaError(f"{where}: unknown distribution '{dist}' ({', '.join(DISTRIBUTIONS)})")
    drives = t.get("drives", [])
    if not isinstance(drives, list):
        raise SchemaError(f"{where}: 'drives' must be a list of tables")
    return Parameter(
        name=name, group=str(t.get("group", "other")), min=lo, max=hi, default=default,
        label=str(t.get("label", "")), distribution=dist,
        mean=t.get("mean"), std=t.get("std"), alpha=t.get("alpha"), beta=t.get("beta"),
        drives=tuple(_parse_drive(d, f"{where}: drives[{j}]") for j, d in enumerate(drives)))


def _parse_slot(t: Mapping[str, Any], i: int) -> Slot:
    name = _req(t, "name", f"slots[{i}]", str)
    where = f"slot '{name}'"
    raw = _req(t, "options", where, list)
    if len(raw) < 2:
        raise SchemaError(f"{where}: needs at least two options")
    options = []
    for j, o in enumerate(raw):
        oid = _req(o, "id", f"{where}: options[{j}]", str)
        ow = f"{where}: option '{oid}'"
        tags = o.get("tags", {})
        for tag, value in tags.items():
            allowed = TAG_VOCABULARY.get(tag)
            if allowed is None:
                raise SchemaError(f"{ow}: unknown tag '{tag}' (known: {', '.join(TAG_VOCABULARY)})")
            if value not in allowed:
                raise SchemaError(f"{ow}: tag {tag} = '{value}' not in {', '.join(allowed)}")
        weight = o.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise SchemaError(f"{ow}: weight must be a non-negative number")
        keys = o.get("shape_keys", {})
        for k, v in keys.items():
            if ":" not in k:
                raise SchemaError(f"{ow}: shape key '{k}' must be written 'Object:key'")
        options.append(Option(id=oid, label=str(o.get("label", oid)), tags=dict(tags),
                              weight=float(weight), show=tuple(o.get("show", [])),
                              shape_keys={k: float(v) for k, v in keys.items()}))
    ids = [o.id for o in options]
    dup = {x for x in ids if ids.count(x) > 1}
    if dup:
        raise SchemaError(f"{where}: duplicate option ids {sorted(dup)}")
    if sum(o.weight for o in options) <= 0:
        raise SchemaError(f"{where}: option weights sum to zero")
    default = str(t.get("default", ids[0]))
    if default not in ids:
        raise SchemaError(f"{where}: default '{default}' is not one of its options")
    return Slot(name=name, label=str(t.get("label", name)), options=tuple(options), default=default)


def load_pack(path: str | os.PathLike) -> Pack:
    """Load a pack from its folder (or its pack.toml), validating the manifest."""
    path = Path(path)
    manifest = path / "pack.toml" if path.is_dir() else path
    if not manifest.is_file():
        raise SchemaError(f"no pack manifest at {manifest}")
    try:
        data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SchemaError(f"{manifest}: not valid TOML: {e}") from None
    head = data.get("pack")
    if not isinstance(head, dict):
        raise SchemaError(f"{manifest}: missing [pack] table")
    pack_id = _req(head, "id", "[pack]", str)
    params = tuple(_parse_parameter(t, i) for i, t in enumerate(data.get("parameters", [])))
    slots = tuple(_parse_slot(t, i) for i, t in enumerate(data.get("slots", [])))
    if not params and not slots:
        raise SchemaError(f"{manifest}: declares no parameters and no slots")
    for kind, names in (("parameter", [p.name for p in params]), ("slot", [s.name for s in slots])):
        dup = {x for x in names if names.count(x) > 1}
        if dup:
            raise SchemaError(f"{manifest}: duplicate {kind} names {sorted(dup)}")
    seg = data.get("segmentation", {})
    for pattern, cls in seg.items():
        if cls not in CLASS_IDS:
            raise SchemaError(f"[segmentation] '{pattern}': unknown class '{cls}' "
                              f"(classes: {', '.join(CLASSES)})")
    blend = str(head.get("blend", ""))
    builder = str(head.get("builder", ""))
    if not blend and not builder:
        raise SchemaError(f"{manifest}: [pack] needs 'blend' (a .blend file) or 'builder'")
    if blend and not (manifest.parent / blend).is_file():
        raise SchemaError(f"{manifest}: blend file '{blend}' not found in {manifest.parent}")
    return Pack(
        id=pack_id, name=str(head.get("name", pack_id)), version=str(head.get("version", "0")),
        root=manifest.parent.resolve(), parameters=params, slots=slots, segmentation=dict(seg),
        blend=blend, builder=builder, collection=str(head.get("collection", "Likeness")),
        camera=dict(data.get("camera", {})), description=str(head.get("description", "")))


def pack_search_path() -> list[Path]:
    """Folders searched for packs by name: $LIKENESS_PACKS_PATH entries, then the built-in packs."""
    extra = [Path(p) for p in os.environ.get("LIKENESS_PACKS_PATH", "").split(os.pathsep) if p]
    return extra + [PACKS_DIR]


def find_pack(name_or_path: str | os.PathLike = "default") -> Pack:
    """A pack by name (``default`` is the built-in stylized pack) or by folder/manifest path."""
    p = Path(name_or_path)
    if p.exists():
        return load_pack(p)
    name = PACK_ALIASES.get(str(name_or_path), str(name_or_path))
    for folder in pack_search_path():
        if (folder / name / "pack.toml").is_file():
            return load_pack(folder / name)
    known = sorted({d.name for f in pack_search_path() if f.is_dir() for d in f.iterdir()
                    if (d / "pack.toml").is_file()})
    raise SchemaError(f"unknown pack '{name_or_path}' (known: {', '.join(known) or 'none'})")


def read_vectors_jsonl(path: str | os.PathLike, pack: Pack) -> Iterable[AvatarVector]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield pack.vector_from_json(json.loads(line)["vector"])
                except (KeyError, json.JSONDecodeError, SchemaError) as e:
                    raise SchemaError(f"{path}:{n}: {e}") from None
