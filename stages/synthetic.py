"""Synthetic open-vocabulary data: coloured shapes on textured backgrounds (detection scenes)
and small captioned images (the corpus the toy CLIP teacher is trained on).

A category is a shape ("circle": drawn in any colour that contrasts with the ground) or a
colour and a shape ("red circle": always drawn in that colour, and named with it). The
embedded default uses the second kind: 6 shapes x 4 colours, so every pair of categories
differs in a property a 48 px teacher sees clearly (see `category_parts`).

Everything is drawn with PIL / numpy and is a pure function of a `numpy.random.Generator`,
so one seed gives the same pixels on every machine. Boxes are (x1, y1, x2, y2) in pixels of
the image they belong to: the tight box of the drawn shape (occluded parts included) clipped
to the image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "hexagon", "cross", "arrow", "pentagon", "diamond",
          "star", "heart", "crescent", "ring")

# Saturated fill colours, named for captions. Backgrounds are muted, so these stand out.
COLOURS = {
    "red": (220, 35, 35),
    "green": (35, 165, 60),
    "blue": (40, 75, 225),
    "yellow": (245, 220, 40),
    "orange": (245, 135, 20),
    "purple": (140, 50, 185),
    "pink": (250, 125, 195),
    "cyan": (40, 205, 225),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
BACKGROUNDS = ("gradient", "noisy", "striped", "spotted")

SUPERSAMPLE = 4  # masks are drawn at 4x and box-filtered down: anti-aliased edges
MIN_VISIBLE = 0.65  # every object keeps at least this fraction of its pixels visible
MIN_INSIDE = 0.8  # and at least this fraction of its pixels inside the image
MIN_CONTRAST = 90  # L1 distance (sum over RGB) between a fill colour and the ground under it


@dataclass(frozen=True)
class SyntheticSpec:
    """The `synthetic:` block of a generated dataset's manifest."""

    seed: int = 0
    n_train: int = 1000
    n_val: int = 200
    image_side: tuple[int, int] = (160, 320)  # each side drawn independently in this range
    objects_per_image: tuple[int, int] = (1, 6)
    object_size: tuple[int, int] = (24, 112)  # shape extent in px, capped at 0.6 x short side
    n_captions: int = 20000
    caption_size: int = 64  # caption images are square
    caption_crop_fraction: float = 0.5  # share of crop-like caption images
    # Share of captions that name the fill colour. Colour is far easier to see than shape
    # for a small CLIP, so captions that mostly name it teach a colour matcher.
    caption_colour_prob: float = 0.0

    @classmethod
    def from_dict(cls, d: dict, where: str = "synthetic") -> SyntheticSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        kw = {k: (tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else v)
              for k, v in d.items()}
        spec = cls(**kw)
        for name in ("image_side", "objects_per_image", "object_size"):
            lo, hi = getattr(spec, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{where}: {name} must be [min, max] with 0 < min <= max, "
                                 f"got {[lo, hi]}")
        if spec.n_train < 1 or spec.n_val < 0 or spec.n_captions < 0:
            raise ValueError(f"{where}: n_train must be >= 1 and n_val, n_captions >= 0")
        for name in ("caption_crop_fraction", "caption_colour_prob"):
            if not 0.0 <= getattr(spec, name) <= 1.0:
                raise ValueError(f"{where}: {name} must be in [0, 1]")
        return spec


@dataclass
class SceneObject:
    category: str
    colour: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2, tight, clipped to the image
    area: int = 0  # visible pixels
    full_area: int = 0  # pixels of the whole shape, hidden and off-image parts included
    mask: np.ndarray | None = field(default=None, repr=False)  # bool[H, W], visible pixels


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    background: str


# ----------------------------------------------------------------------------- geometry


def _ngon(n: int, radius: float = 1.0, start: float = -math.pi / 2) -> np.ndarray:
    t = start + np.arange(n) * 2 * math.pi / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    t = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


def category_parts(name: str) -> tuple[str, str | None]:
    """A category name -> (shape, fixed colour or None): "red circle" -> ("circle", "red"),
    "circle" -> ("circle", None). Raises ValueError for a name the generator cannot draw."""
    words = name.split()
    if len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES:
        return words[1], words[0]
    if name in SHAPES:
        return name, None
    raise ValueError(f"unknown category {name!r}: the generator draws a shape of {list(SHAPES)}, "
                     f"optionally after a colour of {list(COLOURS)} (e.g. 'red circle')")


def drawable_vocabulary(dataset, what: str, where: str | None = None) -> list[str]:
    """Every category name of a generated dataset's manifest (pipeline.manifests.
    DatasetManifest), base then novel (ids 1..K in that order); ManifestError naming the file
    when it has no explicit base/novel lists ("<file>: <what> needs explicit base/novel
    lists") or a name the generator cannot draw ("<file>: <where>: <why>")."""
    from ovdistill.pipeline.manifests import ManifestError

    if dataset.base is None:
        raise ManifestError(f"{dataset.path}: {what} explicit base/novel lists")
    names = list(dataset.base) + list(dataset.novel or ())
    for n in names:
        try:
            category_parts(n)
        except ValueError as e:
            raise ManifestError(f"{dataset.path}: {where + ': ' if where else ''}{e}") from None
    return names


def shape_polygons(name: str) -> list[tuple[np.ndarray, int]]:
    """Outline of shape `name` in unit coordinates, as (points: float[K, 2], fill) pairs drawn
    in order; fill 255 adds area, 0 cuts a hole. The shape spans about [-1, 1]^2."""
    if name == "circle":
        return [(_ngon(64), 255)]
    if name == "square":
        return [(np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]), 255)]
    if name == "triangle":
        return [(_ngon(3) + [0, 0.2], 255)]
    if name == "hexagon":
        return [(_ngon(6, start=0.0), 255)]
    if name == "pentagon":
        return [(_ngon(5) + [0, 0.1], 255)]
    if name == "diamond":
        return [(np.array([[0, -1], [0.58, 0], [0, 1], [-0.58, 0]]), 255)]
    if name == "cross":
        a, b = 0.3, 0.95
        return [(np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b],
                           [-a, a], [-b, a], [-b, -a], [-a, -a]]), 255)]
    if name == "arrow":
        return [(np.array([[-1, -0.22], [0.15, -0.22], [0.15, -0.62], [1, 0], [0.15, 0.62],
                           [0.15, 0.22], [-1, 0.22]]), 255)]
    if name == "star":
        return [(_star() + [0, 0.1], 255)]
    if name == "heart":
        return [(_heart(), 255)]
    if name == "crescent":
        return [(_ngon(64), 255), (_ngon(64, 0.82) + [0.42, -0.18], 0)]
    if name == "ring":
        return [(_ngon(64), 255), (_ngon(64, 0.58), 0)]
    raise ValueError(f"unknown shape {name!r}; drawable shapes are {list(SHAPES)}")


def shape_alpha(name: str, size: float, angle: float, aspect: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage of shape `name`, `size` px across, rotated by `angle` radians and
    stretched by `aspect` along its own x axis.

    Returns: float32[h, w] in [0, 1], cropped to the shape plus a 1 px margin."""
    polys = shape_polygons(name)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    scaled = [((p * [aspect, 1.0]) @ rot.T * (size / 2), f) for p, f in polys]
    outer = np.concatenate([p for p, f in scaled if f])
    lo = outer.min(0) - 1
    w, h = (np.ceil(outer.max(0) + 1 - lo)).astype(int)
    canvas = Image.new("L", (int(w) * SUPERSAMPLE, int(h) * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for p, f in scaled:
        draw.polygon([tuple(q) for q in ((p - lo) * SUPERSAMPLE)], fill=f)
    small = canvas.resize((int(w), int(h)), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------- textures


def _noise(rng: np.random.Generator, sigma: float, shape) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _muted(rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.uniform(60, 200) + rng.uniform(-35, 35, 3), 0, 255)


def background(rng: np.random.Generator, width: int, height: int,
               kind: str | None = None) -> tuple[np.ndarray, str]:
    """A textured, muted background.

    Returns: (float32[height, width, 3] in [0, 255], kind) with kind one of BACKGROUNDS."""
    kind = kind or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b = _muted(rng), _muted(rng)
    theta = rng.uniform(0, 2 * math.pi)
    proj = xx * math.cos(theta) + yy * math.sin(theta)
    t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    img = a + (b - a) * t[..., None]
    if kind == "noisy":
        cells = int(rng.integers(3, 9))
        low = _noise(rng, 22, (cells, cells, 3))
        low = np.stack([np.asarray(Image.fromarray(low[..., k]).resize(
            (width, height), Image.Resampling.BICUBIC)) for k in range(3)], -1)
        img = img + low + _noise(rng, 12, (height, width, 3))
    elif kind == "striped":
        period = rng.uniform(6, 24)
        phi = rng.uniform(0, 2 * math.pi)
        stripe_dir = rng.uniform(0, math.pi)
        u = xx * math.cos(stripe_dir) + yy * math.sin(stripe_dir)
        wave = (np.sin(2 * math.pi * u / period + phi) > 0).astype(np.float32)
        img = img + (_muted(rng) - img) * (0.55 * wave[..., None])
    elif kind == "spotted":
        layer = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(layer)
        for _ in range(int(rng.integers(4, 12))):
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            rx, ry = rng.uniform(5, 30, 2)
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=int(rng.integers(120, 256)))
        soft = np.asarray(layer.filter(ImageFilter.GaussianBlur(3)), np.float32) / 255.0
        img = img + (_muted(rng) - img) * soft[..., None]
    return img.astype(np.float32), kind


# ----------------------------------------------------------------------------- scenes


def _place(rng, alpha: np.ndarray, width: int, height: int, owner: np.ndarray,
           full_areas: list[int], margin: float = 0.2, tries: int = 30):
    """Find a top-left (x, y) for `alpha` where it keeps >= MIN_INSIDE of itself inside the
    image and leaves every earlier object >= MIN_VISIBLE visible. None if no spot is found."""
    h, w = alpha.shape
    solid = alpha >= 0.5
    total = int(solid.sum())
    if total == 0:
        return None
    for _ in range(tries):
        x = int(rng.integers(-int(margin * w), max(width - int((1 - margin) * w), 0) + 1))
        y = int(rng.integers(-int(margin * h), max(height - int((1 - margin) * h), 0) + 1))
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 <= x0 or y1 <= y0:
            continue
        inside = solid[y0 - y:y1 - y, x0 - x:x1 - x]
        if inside.sum() < MIN_INSIDE * total:
            continue
        covered = owner[y0:y1, x0:x1][inside]
        ok = True
        if covered.size and (covered >= 0).any():
            lost = np.bincount(covered[covered >= 0], minlength=len(full_areas))
            visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(full_areas))
            ok = all(visible[k] - lost[k] >= MIN_VISIBLE * full_areas[k]
                     for k in range(len(full_areas)))
        if ok:
            return x, y
    return None


def _touching(spot: tuple[int, int], alpha: np.ndarray, owner: np.ndarray,
              placed: list) -> set[str]:
    """Colours of the earlier objects that `alpha` placed at `spot` would cover or touch."""
    x, y = spot
    h, w = alpha.shape
    height, width = owner.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    a = alpha[y0 - y:y1 - y, x0 - x:x1 - x]
    return {placed[j][1] for j in np.unique(owner[y0:y1, x0:x1][a > 0]) if j >= 0}


def _pick_colour(rng, ground: np.ndarray, avoid: set[str]) -> str:
    """A colour name that contrasts with `ground` (float[3], the mean RGB under the shape)."""
    names = list(COLOURS)
    order = rng.permutation(len(names))
    best, best_d = names[order[0]], -1.0
    for i in order:
        name = names[i]
        d = float(np.abs(np.array(COLOURS[name]) - ground).sum())
        if name not in avoid and d >= MIN_CONTRAST:
            return name
        if name not in avoid and d > best_d:
            best, best_d = name, d
    return best


def draw_scene(rng: np.random.Generator, width: int, height: int, categories: list[str],
               object_size: tuple[int, int], n_objects: int,
               background_kind: str | None = None) -> Scene:
    """Draw up to `n_objects` shapes from `categories` on a textured background (fewer when
    no placement keeps every object clearly visible; at least one is always drawn).

    Returns: Scene with image (RGB, width x height) and objects in drawing order, each with its
    box (x1, y1, x2, y2) and visible mask bool[height, width]."""
    img, kind = background(rng, width, height, background_kind)
    owner = np.full((height, width), -1, dtype=np.int32)
    placed: list[tuple[str, str, np.ndarray, int, int]] = []  # name, colour, alpha, x, y
    full_areas: list[int] = []
    cap = max(8, int(0.6 * min(width, height)))
    lo, hi = min(object_size[0], cap), min(object_size[1], cap)
    for k in range(n_objects):
        for _attempt in range(4):
            name = categories[int(rng.integers(len(categories)))]
            shape, fixed = category_parts(name)
            size = float(rng.uniform(lo, hi))
            alpha = shape_alpha(shape, size, rng.uniform(0, 2 * math.pi), rng.uniform(0.87, 1.15))
            spot = _place(rng, alpha, width, height, owner, full_areas)
            # two touching objects of one colour would read as one blob: place elsewhere
            if spot is not None and fixed and fixed in _touching(spot, alpha, owner, placed):
                spot = None
            if spot is not None or (k == 0 and _attempt == 3):
                break
        if spot is None:
            if k > 0:
                continue
            # The first object always fits: shrink it into the image centre.
            alpha = shape_alpha(shape, lo, 0.0)
            spot = ((width - alpha.shape[1]) // 2, (height - alpha.shape[0]) // 2)
        x, y = spot
        h, w = alpha.shape
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        a = alpha[y0 - y:y1 - y, x0 - x:x1 - x]
        region = img[y0:y1, x0:x1]
        ground = region[a >= 0.5].mean(0) if (a >= 0.5).any() else region.reshape(-1, 3).mean(0)
        colour = fixed or _pick_colour(rng, ground, _touching(spot, alpha, owner, placed))
        fill = np.clip(np.array(COLOURS[colour], np.float32) + rng.normal(0, 8, 3), 0, 255)
        shade = 1.0 + rng.uniform(-0.12, 0.12) * np.linspace(-1, 1, a.shape[0])[:, None, None]
        region[:] = region * (1 - a[..., None]) + np.clip(fill * shade, 0, 255) * a[..., None]
        owner[y0:y1, x0:x1][a >= 0.5] = len(placed)
        full_areas.append(int((alpha >= 0.5).sum()))
        placed.append((name, colour, alpha, x, y))

    img = np.clip(img + _noise(rng, 4, img.shape), 0, 255).astype(np.uint8)
    objects = []
    for k, (name, colour, alpha, x, y) in enumerate(placed):
        ys, xs = np.nonzero(alpha >= 0.5)
        x1, y1 = max(float(xs.min() + x), 0.0), max(float(ys.min() + y), 0.0)
        x2, y2 = min(float(xs.max() + 1 + x), float(width)), min(float(ys.max() + 1 + y),
                                                                  float(height))
        vis = owner == k
        objects.append(SceneObject(name, colour, (x1, y1, x2, y2), int(vis.sum()),
                                   full_areas[k], vis))
    return Scene(Image.fromarray(img, "RGB"), objects, kind)


def random_scene(rng: np.random.Generator, spec: SyntheticSpec, categories: list[str]) -> Scene:
    """One detection image: size, object count and content all drawn from `rng`."""
    width = int(rng.integers(spec.image_side[0], spec.image_side[1] + 1))
    height = int(rng.integers(spec.image_side[0], spec.image_side[1] + 1))
    n = int(rng.integers(spec.objects_per_image[0], spec.objects_per_image[1] + 1))
    return draw_scene(rng, width, height, categories, spec.object_size, n)


# ----------------------------------------------------------------------------- captions

_NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
_BG_PHRASE = {"gradient": "a smooth gradient", "noisy": "a noisy", "striped": "a striped",
              "spotted": "a spotted"}


def plural(name: str) -> str:
    return name + ("es" if name.endswith(("s", "x", "sh", "ch")) else "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(count: int, colour: str | None, name: str, size_word: str | None = None) -> str:
    words = [w for w in (size_word, colour) if w]
    noun = " ".join(words + [name if count == 1 else plural(name)])
    det = _article(noun) if count == 1 else _NUMBERS.get(count, str(count))
    return f"{det} {noun}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _on_background(kind: str) -> str:
    phrase = _BG_PHRASE[kind]
    return f"on {phrase} background" if kind != "gradient" else f"on {phrase}"


def scene_caption(rng: np.random.Generator, objects: list[SceneObject], kind: str,
                  colour_prob: float = 0.0) -> str:
    """A caption naming every object of a small scene, grouped by (category, colour); colours
    are named with probability `colour_prob`."""
    use_colour = rng.random() < colour_prob
    groups: dict[tuple[str, str | None], int] = {}
    for o in objects:
        named = use_colour and category_parts(o.category)[1] is None  # else in its name
        key = (o.category, o.colour if named else None)
        groups[key] = groups.get(key, 0) + 1
    items = [_phrase(n, c, name) for (name, c), n in groups.items()]
    body = _join(items)
    form = int(rng.integers(5))
    if form == 0:
        return body
    if form == 1:
        return f"a photo of {body}"
    if form == 2:
        return f"{body} {_on_background(kind)}"
    if form == 3:
        return f"an image with {body}"
    return f"a drawing of {body} {_on_background(kind)}"


def crop_caption(rng: np.random.Generator, obj: SceneObject, kind: str, rel_size: float,
                 colour_prob: float = 0.0) -> str:
    """A caption for a crop centred on `obj` (it fills `rel_size` of the crop side); its colour
    is named with probability `colour_prob`."""
    size_word = "large" if rel_size > 0.75 else ("small" if rel_size < 0.55 else None)
    colour = obj.colour if rng.random() < colour_prob else None
    if category_parts(obj.category)[1] is not None:  # the colour is part of the name
        colour = None
    thing = _phrase(1, colour, obj.category, size_word if rng.random() < 0.5 else None)
    form = int(rng.integers(7))
    if form == 0:
        return f"a photo of {thing}"
    if form == 1:
        return thing
    if form == 2:
        return f"a close-up photo of {_phrase(1, colour, obj.category)}"
    if form == 3:
        return f"{thing} {_on_background(kind)}"
    if form == 4:
        return f"a cropped photo of the {obj.category}"
    if form == 5:
        return f"a {obj.category} shape"
    return f"{thing} with parts of other shapes around it"


def caption_sample(rng: np.random.Generator, categories: list[str], size: int = 64,
                   crop_fraction: float = 0.5,
                   colour_prob: float = 0.0) -> tuple[Image.Image, str]:
    """One image-caption pair of the teacher's training corpus.

    With probability `crop_fraction` a crop-like image: one object fills most of the frame,
    with fragments of neighbours and background around it (what the teacher later sees in a
    proposal crop); otherwise a small whole scene of 1-3 objects.

    Returns: (RGB image size x size, caption)."""
    if rng.random() < crop_fraction:
        canvas = int(2.5 * size)
        main_size = float(rng.uniform(0.55, 1.05) * size)
        scene = draw_scene(rng, canvas, canvas, categories,
                           (int(0.5 * size), int(1.1 * size)), int(rng.integers(2, 6)))
        # Draw the main object last, so it is on top and whole.
        main_scene = _overlay_main(rng, scene, categories, main_size)
        obj = main_scene.objects[-1]
        x1, y1, x2, y2 = obj.box
        side = min(max(x2 - x1, y2 - y1) * float(rng.uniform(1.0, 1.7)), canvas)
        # a jittered square window around the object, kept inside the canvas (no padding)
        left = (x1 + x2 - side) / 2 + rng.uniform(-0.1, 0.1) * side
        top = (y1 + y2 - side) / 2 + rng.uniform(-0.1, 0.1) * side
        left, top = min(max(left, 0.0), canvas - side), min(max(top, 0.0), canvas - side)
        crop = main_scene.image.crop((round(left), round(top), round(left + side),
                                      round(top + side)))
        image = crop.resize((size, size), Image.Resampling.BILINEAR)
        rel = max(x2 - x1, y2 - y1) / side
        return image, crop_caption(rng, obj, main_scene.background, rel, colour_prob)
    scene = draw_scene(rng, size, size, categories, (int(0.3 * size), int(0.6 * size)),
                       int(rng.integers(1, 4)))
    return scene.image, scene_caption(rng, scene.objects, scene.background, colour_prob)


def _overlay_main(rng, scene: Scene, categories: list[str], main_size: float) -> Scene:
    """`scene` with one more object drawn on top near the centre (it may hide others)."""
    img = np.asarray(scene.image, np.float32).copy()
    height, width = img.shape[:2]
    for _attempt in range(4):  # the main object's colour differs from what it touches
        name = categories[int(rng.integers(len(categories)))]
        shape, fixed = category_parts(name)
        alpha = shape_alpha(shape, main_size, rng.uniform(0, 2 * math.pi),
                            rng.uniform(0.87, 1.15))
        h, w = alpha.shape
        x = int((width - w) / 2 + rng.uniform(-0.15, 0.15) * width)
        y = int((height - h) / 2 + rng.uniform(-0.15, 0.15) * height)
        x, y = min(max(x, 0), width - w), min(max(y, 0), height - h)
        touching = {o.colour for o in scene.objects
                    if o.mask is not None and o.mask[y:y + h, x:x + w][alpha > 0].any()}
        if fixed not in touching:
            break
    region = img[y:y + h, x:x + w]
    ground = region[alpha >= 0.5].mean(0)
    colour = fixed or _pick_colour(rng, ground, touching)
    fill = np.clip(np.array(COLOURS[colour], np.float32) + rng.normal(0, 8, 3), 0, 255)
    region[:] = region * (1 - alpha[..., None]) + fill * alpha[..., None]
    ys, xs = np.nonzero(alpha >= 0.5)
    box = (float(xs.min() + x), float(ys.min() + y), float(xs.max() + 1 + x),
           float(ys.max() + 1 + y))
    area = int((alpha >= 0.5).sum())
    main = SceneObject(name, colour, box, area, area)
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    return Scene(image, scene.objects + [main], scene.background)


# ----------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class PairSpec:
    """The `pairs: synthetic:` block: generated image-text pairs without boxes (DetCLIPv2).

    Scenes like the detection images, drawn from the whole vocabulary (base and novel), each
    with a caption naming some of its objects (`pair_caption`)."""

    n_images: int = 2000
    seed: int = 0
    image_side: tuple[int, int] = (160, 256)  # pairs train at a lower resolution
    objects_per_image: tuple[int, int] = (2, 6)
    object_size: tuple[int, int] = (24, 112)  # as the detection images
    name_prob: float = 0.7  # each category in the scene is named with this probability

    @classmethod
    def from_dict(cls, d: dict, where: str = "pairs.synthetic") -> PairSpec:
        return scene_spec_from_dict(cls, d, where)


def scene_spec_from_dict(cls, d: dict, where: str):
    """A PairSpec / GroundingSpec (n_images, seed, image_side, objects_per_image, object_size,
    name_prob) from a manifest block, validated: unknown keys, ranges that are not [min, max]
    integers with 0 < min <= max, a non-integer or out-of-range n_images / seed, a name_prob
    outside (0, 1] are one-line errors naming `where`."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()}
    spec = cls(**kw)
    for name in ("image_side", "objects_per_image", "object_size"):
        value = getattr(spec, name)
        if not (isinstance(value, tuple) and len(value) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
                and 0 < value[0] <= value[1]):
            got = list(value) if isinstance(value, tuple) else repr(value)
            raise ValueError(f"{where}: {name} must be [min, max] integers with "
                             f"0 < min <= max, got {got}")
    for name in ("n_images", "seed"):
        value = getattr(spec, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{where}: {name} must be an integer, got {value!r}")
    if spec.n_images < 1 or spec.seed < 0:
        raise ValueError(f"{where}: n_images must be >= 1 and seed >= 0, got "
                         f"{spec.n_images} and {spec.seed}")
    p = spec.name_prob
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 < p <= 1.0:
        raise ValueError(f"{where}: name_prob must be in (0, 1], got {p!r}")
    return spec


def pair_scene(rng: np.random.Generator, spec: PairSpec, categories: list[str]) -> Scene:
    """One pair image: size, object count and content drawn from `rng` (as `random_scene`)."""
    width = int(rng.integers(spec.image_side[0], spec.image_side[1] + 1))
    height = int(rng.integers(spec.image_side[0], spec.image_side[1] + 1))
    n = int(rng.integers(spec.objects_per_image[0], spec.objects_per_image[1] + 1))
    return draw_scene(rng, width, height, categories, spec.object_size, n)


_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
_PAIR_GROUNDS = {"gradient": "smooth gradient", "noisy": "noisy", "striped": "striped",
                 "spotted": "spotted"}


def _mention(rng: np.random.Generator, category: str, colours: list[str],
             vocabulary: set[str]) -> str:
    """"a red circle", "two red circles", "some hexagons", "the star", "a blue ring" (the
    colour of a shape-only category only when all its objects share it and the colour +
    shape is not itself a category, so a dictionary matcher still finds `category`)."""
    count = len(colours)
    name = category
    coloured = f"{colours[0]} {category}"
    if (category_parts(category)[1] is None and len(set(colours)) == 1
            and coloured not in vocabulary and rng.random() < 0.3):
        name = coloured
    if count == 1:
        det = ("the", "one", _article(name))[min(int(rng.integers(6)), 2)]
        return f"{det} {name}"
    det = "some" if rng.random() < 0.15 else _COUNT_WORDS.get(count, str(count))
    return f"{det} {plural(name)}"


def pair_caption(rng: np.random.Generator, objects: list[SceneObject], kind: str,
                 vocabulary: list[str], name_prob: float = 0.7) -> tuple[str, list[bool]]:
    """A caption naming SOME of a scene's objects, like a web caption describes part of an
    image: each category present is named with probability `name_prob` (at least one is),
    with its true count, by its exact vocabulary name or that name's plural (`plural`).

    Returns: (caption, named: one flag per object of `objects`)."""
    order: list[str] = []
    for o in objects:
        if o.category not in order:
            order.append(o.category)
    chosen = [c for c in order if rng.random() < name_prob]
    if not chosen:
        chosen = [order[int(rng.integers(len(order)))]]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    vocab = set(vocabulary)
    items = [_mention(rng, c, [o.colour for o in objects if o.category == c], vocab)
             for c in chosen]
    ground = f"a {_PAIR_GROUNDS[kind]} background"
    body = _join(items)
    form = int(rng.integers(9))
    if form in (5, 6) and len(items) < 2:
        form -= 4  # "next to" / "with" need two mentions
    if form == 0:
        caption = body
    elif form == 1:
        caption = f"a photo of {body}"
    elif form == 2:
        caption = f"{body} on {ground}"
    elif form == 3:
        caption = f"an image with {body}"
    elif form == 4:
        caption = f"a picture showing {body} against {ground}"
    elif form == 5:
        caption = f"{items[0]} next to {_join(items[1:])}"
    elif form == 6:
        caption = f"{items[0]} with {_join(items[1:])} on {ground}"
    elif form == 7:
        caption = f"a drawing of {body}, {ground}"
    else:
        caption = f"{body} in this picture"
    caption = caption[0].upper() + caption[1:] if rng.random() < 0.3 else caption
    named = set(chosen)
    return caption, [o.category in named for o in objects]


# ----------------------------------------------------------------------------- grounding

GROUNDING_REDRAWS = 8  # a grounding scene is redrawn (same stream) until it holds a base object


@dataclass(frozen=True)
class GroundingSpec:
    """The `grounding: synthetic:` block: generated grounding data (GLIP / MDETR's format).

    Scenes like the pair images, drawn from the whole vocabulary, whose captions name objects
    of BASE categories only, each named phrase tied to all the boxes of its category by a
    character span (`grounding_caption`). Novel objects may be in the picture: never named,
    never boxed, so the novel protocol stays honest."""

    n_images: int = 1000
    seed: int = 0
    image_side: tuple[int, int] = (160, 256)
    objects_per_image: tuple[int, int] = (1, 6)
    object_size: tuple[int, int] = (24, 112)  # as the detection images
    name_prob: float = 1.0  # each base category in the scene is named with this probability

    @classmethod
    def from_dict(cls, d: dict, where: str = "grounding.synthetic") -> GroundingSpec:
        return scene_spec_from_dict(cls, d, where)


def grounding_scene(rng: np.random.Generator, spec: GroundingSpec, categories: list[str],
                    base: set[str]) -> Scene:
    """One grounding image drawn from all of `categories` (as `pair_scene`), redrawn from the
    same stream up to GROUNDING_REDRAWS times until it holds an object of a `base` category
    (the last draw is kept either way: its caption then names nothing)."""
    for _ in range(GROUNDING_REDRAWS):
        width = int(rng.integers(spec.image_side[0], spec.image_side[1] + 1))
        height = int(rng.integers(spec.image_side[0], spec.image_side[1] + 1))
        n = int(rng.integers(spec.objects_per_image[0], spec.objects_per_image[1] + 1))
        scene = draw_scene(rng, width, height, categories, spec.object_size, n)
        if any(o.category in base for o in scene.objects):
            break
    return scene


def _compose(pieces: list) -> tuple[str, dict[str, tuple[int, int]]]:
    """Join text pieces: a str is plain text, a (text, key) pair is text whose [start, end)
    character span is recorded under `key`. Returns (text, {key: (start, end)})."""
    text, spans = "", {}
    for p in pieces:
        if isinstance(p, tuple):
            spans[p[1]] = (len(text), len(text) + len(p[0]))
            p = p[0]
        text += p
    return text, spans


def _join_pieces(items: list[list]) -> list:
    """`_join` over piece lists: A; A and B; A, B and C."""
    out = list(items[0])
    for k, item in enumerate(items[1:], 1):
        out += [" and " if k == len(items) - 1 else ", ", *item]
    return out


def grounding_caption(rng: np.random.Generator, objects: list[SceneObject], kind: str,
                      vocabulary: list[str], base: set[str], name_prob: float = 1.0
                      ) -> tuple[str, list[tuple[tuple[int, int], ...]]]:
    """A caption naming the scene's BASE categories (each with probability `name_prob`, at
    least one when there is one), worded like `pair_caption` ("two red circles next to the
    blue star on a striped background"); novel objects are never named.

    A named category's phrase is its mention without the determiner ("red circles", "blue
    star": it holds the vocabulary name or its plural) and every object of that category
    points at it. Returns: (caption, spans: per object of `objects`, a tuple of [start, end)
    character spans into the caption: one span for a named object, none for the others)."""
    order: list[str] = []
    for o in objects:
        if o.category in base and o.category not in order:
            order.append(o.category)
    ground = f"a {_PAIR_GROUNDS[kind]} background"
    if not order:
        return f"{ground} with nothing to name", [() for _ in objects]
    chosen = [c for c in order if rng.random() < name_prob]
    if not chosen:
        chosen = [order[int(rng.integers(len(order)))]]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    vocab = set(vocabulary)
    items = []
    for c in chosen:
        det, noun = _mention(rng, c, [o.colour for o in objects if o.category == c],
                             vocab).split(" ", 1)
        items.append([f"{det} ", (noun, c)])
    body = _join_pieces(items)
    form = int(rng.integers(9))
    if form in (5, 6) and len(items) < 2:
        form -= 4  # "next to" / "with" need two mentions
    pieces = {
        0: body,
        1: ["a photo of ", *body],
        2: [*body, f" on {ground}"],
        3: ["an image with ", *body],
        4: ["a picture showing ", *body, f" against {ground}"],
        5: [*items[0], " next to ", *_join_pieces(items[1:])] if len(items) > 1 else None,
        6: ([*items[0], " with ", *_join_pieces(items[1:]), f" on {ground}"]
            if len(items) > 1 else None),
        7: ["a drawing of ", *body, f", {ground}"],
        8: [*body, " in this picture"],
    }[form]
    caption, where = _compose(pieces)
    if rng.random() < 0.3:  # the first character is always a determiner's, never a phrase's
        caption = caption[0].upper() + caption[1:]
    return caption, [(where[o.category],) if o.category in where else () for o in objects]
