"""
The toy world: a miniature of the paper's setting, made from a seed in seconds, so that everything runs
with no download. Version 2 (docs/METHOD.md section 12, every parameter with its source).

Scenes of objects of 330 classes in 22 semantic groups (55 near-duplicate pairs), drawn by one long-tailed
frequency, with colours, sizes and positions; a simulated detector that sees each object as a noisy box
and a feature vector (group + class + colour + size + noise, so related classes have related features),
whose tag, colour and confidences are its own linear read-out of that very feature, as a real detector's
classifier reads the region feature it exports; captions; general text that uses the same words outside
captions; and the four downstream tasks in the real datasets' file formats. Everything is written in the
formats real data comes in, so no other code can tell toy from real.

    python toy.py                   # make the toy world under toy_world/ (pretrain.py does it on first use)
    python toy.py --show pt000003   # draw one scene: pt000003.png with boxes, tags and scores, a caption
    python toy.py --report          # the detector's accuracy, a linear probe's K-shot curve, class counts
"""

import glob
import json
import os
import shutil
import zlib

import numpy as np

import guards
from data import Vocab
from tasks import train_subset
from storage import FeatureStore, FeatureWriter, WriteError, read_json, write_atomic, write_json

TOY_DIR = "toy_world"
VERSION = 4  # written in ROOT/done; a world of another version is built again (3: the tasks of docs/METHOD.md §14;
#             4: NLVR2 four times larger, §18)
VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_vocab.txt")  # made by train_vocab
# Toy world v2 (docs/METHOD.md section 12): 330 classes in 22 groups of 15. PAIRS are the near-duplicates
# (synonyms, as a third of Visual Genome's 1,600 classes are): the detector's features barely tell them apart.
GROUPS = {
    "vehicle": ["car", "truck", "bus", "bicycle", "bike", "motorcycle", "motorbike", "fire truck", "van", "taxi",
                "cab", "train", "tractor", "airplane", "plane"],
    "street": ["traffic light", "stop sign", "street sign", "sign", "pole", "lamp post", "street light",
               "fire hydrant", "parking meter", "cone", "fence", "mailbox", "flag", "banner", "billboard"],
    "animal": ["dog", "puppy", "cat", "kitten", "horse", "pony", "cow", "sheep", "lamb", "bird", "pig", "goat",
               "chicken", "duck", "rabbit"],
    "wild animal": ["elephant", "giraffe", "zebra", "bear", "lion", "tiger", "monkey", "deer", "fox", "wolf",
                    "squirrel", "mouse", "rat", "pigeon", "dove"],
    "kitchenware": ["cup", "mug", "bowl", "plate", "dish", "knife", "fork", "spoon", "glass", "bottle", "jar",
                    "pot", "pan", "kettle", "tray"],
    "food": ["apple", "banana", "pizza", "sandwich", "cake", "hot dog", "orange", "bread", "donut", "doughnut",
             "carrot", "broccoli", "cookie", "biscuit", "egg"],
    "produce": ["tomato", "potato", "onion", "lettuce", "pepper", "lemon", "lime", "grape", "strawberry", "cherry",
                "pear", "peach", "melon", "watermelon", "corn"],
    "furniture": ["chair", "stool", "table", "desk", "bed", "sofa", "couch", "bench", "lamp", "shelf", "cabinet",
                  "drawer", "dresser", "armchair", "ottoman"],
    "person": ["man", "guy", "woman", "lady", "boy", "kid", "girl", "child", "baby", "chef", "player", "skier",
               "surfer", "police officer", "soldier"],
    "clothing": ["shirt", "blouse", "jacket", "coat", "dress", "gown", "skirt", "hat", "cap", "shoe", "boot",
                 "sweater", "scarf", "glove", "tie"],
    "accessory": ["bag", "backpack", "purse", "handbag", "umbrella", "parasol", "watch", "bracelet", "necklace",
                  "ring", "wallet", "suitcase", "briefcase", "helmet", "badge"],
    "body part": ["head", "face", "hair", "eye", "nose", "mouth", "ear", "hand", "arm", "leg", "foot", "finger",
                  "neck", "shoulder", "knee"],
    "electronics": ["tv", "television", "laptop", "computer", "monitor", "screen", "keyboard", "phone", "cellphone",
                    "remote", "camera", "speaker", "printer", "tablet", "cable"],
    "appliance": ["refrigerator", "fridge", "oven", "stove", "microwave", "toaster", "sink", "faucet", "dishwasher",
                  "blender", "counter", "cupboard", "napkin", "towel", "cutting board"],
    "home": ["toilet", "bathtub", "tub", "shower", "mirror", "curtain", "drape", "rug", "carpet", "pillow", "cushion",
             "blanket", "vase", "candle", "book"],
    "sports": ["ball", "soccer ball", "football", "frisbee", "kite", "skateboard", "surfboard", "snowboard", "ski",
               "racket", "racquet", "bat", "net", "goal", "paddle"],
    "plant": ["tree", "bush", "shrub", "flower", "rose", "plant", "leaf", "branch", "palm tree", "pine tree", "vine",
              "stump", "log", "weed", "hedge"],
    "building": ["building", "house", "tower", "church", "roof", "door", "doorway", "balcony", "chimney", "staircase",
                 "stairway", "column", "pillar", "arch", "bridge"],
    "landscape": ["mountain", "hill", "rock", "stone", "cloud", "river", "lake", "ocean", "sea", "wave", "beach",
                  "shore", "sun", "moon", "shadow"],
    "office": ["paper", "pen", "pencil", "notebook", "box", "container", "basket", "bucket", "can", "clock",
               "picture", "photo", "painting", "poster", "letter"],
    "boat": ["boat", "ship", "sailboat", "yacht", "canoe", "kayak", "ferry", "raft", "dock", "pier", "anchor",
             "sail", "mast", "buoy", "harbor"],
    "background": ["road", "street", "sky", "wall", "floor", "grass", "window", "ceiling", "water", "sand", "snow",
                   "field", "ground", "pavement", "sidewalk"],
}
PAIRS = [("bicycle", "bike"), ("motorcycle", "motorbike"), ("taxi", "cab"), ("airplane", "plane"),
         ("lamp post", "street light"), ("sign", "street sign"), ("flag", "banner"),
         ("dog", "puppy"), ("cat", "kitten"), ("horse", "pony"), ("sheep", "lamb"),
         ("mouse", "rat"), ("pigeon", "dove"), ("cup", "mug"), ("plate", "dish"), ("pot", "pan"),
         ("donut", "doughnut"), ("cookie", "biscuit"), ("lemon", "lime"), ("melon", "watermelon"),
         ("sofa", "couch"), ("table", "desk"), ("cabinet", "dresser"), ("chair", "armchair"),
         ("man", "guy"), ("woman", "lady"), ("boy", "kid"), ("girl", "child"),
         ("shirt", "blouse"), ("jacket", "coat"), ("dress", "gown"), ("hat", "cap"), ("shoe", "boot"),
         ("purse", "handbag"), ("umbrella", "parasol"), ("suitcase", "briefcase"), ("face", "head"),
         ("tv", "television"), ("monitor", "screen"), ("phone", "cellphone"), ("refrigerator", "fridge"),
         ("oven", "stove"), ("bathtub", "tub"), ("curtain", "drape"), ("rug", "carpet"), ("pillow", "cushion"),
         ("racket", "racquet"), ("bush", "shrub"), ("staircase", "stairway"), ("column", "pillar"),
         ("mountain", "hill"), ("rock", "stone"), ("ocean", "sea"), ("boat", "ship"), ("road", "street")]
CLASSES = [c for g in GROUPS.values() for c in g]
GROUP_OF = {c: g for g, cs in GROUPS.items() for c in cs}
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "gray"]
SIZES = ["small", "large"]
PLURAL = {"sheep": "sheep", "deer": "deer", "knife": "knives", "man": "men", "woman": "women", "child": "children",
          "mouse": "mice", "foot": "feet", "leaf": "leaves", "shelf": "shelves", "wolf": "wolves", "scarf": "scarves",
          "tomato": "tomatoes", "potato": "potatoes", "police officer": "police officers", "fire truck": "fire trucks",
          "hot dog": "hot dogs"}
# what VQA's "which N is in the scene?" calls a group: no class's name, so that the question names none
GROUP_NOUN = {"street": "roadside object", "home": "household item", "sports": "sports item", "office": "office item",
              "plant": "greenery", "building": "structure", "boat": "watercraft"}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen"]
SCENES = {  # scene type: (groups its objects come from, its background classes)
    "street": (["vehicle", "street", "person", "clothing", "animal", "building"], ["road", "sky", "sidewalk"]),
    "city": (["building", "vehicle", "street", "person", "accessory"], ["street", "sky", "pavement"]),
    "kitchen": (["kitchenware", "food", "produce", "appliance", "person"], ["wall", "floor", "window"]),
    "farm": (["animal", "person", "vehicle", "plant", "produce"], ["grass", "sky", "field"]),
    "living room": (["furniture", "home", "electronics", "person", "animal"], ["wall", "floor", "window"]),
    "dining room": (["food", "kitchenware", "furniture", "produce"], ["floor", "window", "ceiling"]),
    "bathroom": (["home", "appliance", "body part", "clothing"], ["wall", "floor", "ceiling"]),
    "office": (["office", "electronics", "furniture", "person", "clothing"], ["wall", "floor", "window"]),
    "beach": (["landscape", "boat", "person", "sports", "body part"], ["sand", "water", "sky"]),
    "park": (["plant", "sports", "person", "animal", "accessory"], ["grass", "sky", "ground"]),
    "zoo": (["wild animal", "plant", "person", "landscape"], ["ground", "grass", "sky"]),
    "ski slope": (["landscape", "sports", "plant", "person", "clothing"], ["snow", "sky", "ground"]),
}
OBJECTS = (6, 14)  # objects in a scene, uniform; with 2 or 3 background regions, 8 to 17 regions (real: 36)
FEATURE_DIM = 128
NOISE = 4.5  # the feature noise sigma, calibrated on TFA's K-shot curve (docs/METHOD.md section 12)
ZIPF_S, ZIPF_Q = 4.9, 561.0  # class frequency (docs/METHOD.md section 12): weight (1600 rank / 330 + q)^-s
DETECTOR_REGIONS = 100_000  # the regions the simulated detector is fitted on, once per world


def plural(c):
    if c in PLURAL:
        return PLURAL[c]
    if c.endswith(("s", "x", "ch", "sh")):
        return c + "es"
    if c.endswith("y") and c[-2] not in "aeiou":
        return c[:-1] + "ies"
    return c + "s"


def things(scene):
    """The scene's objects, without the background regions (road, sky, ...)."""
    return [o for o in scene["objects"] if not o.get("background")]


def write_lines(path, lines):
    """A text file of `lines`, never half written (storage.write_atomic)."""
    write_atomic(path, lambda f: f.write("\n".join(lines) + "\n"), "w")


def lda(x, y, n_classes, prior=None, shrink=0.01):
    """A linear discriminant, closed form: class means and one pooled covariance, shrunk towards its mean
    variance by `shrink` -> (W, b), the logits x @ W.T + b. prior: class probabilities (None: equal).
    The simulated detector (fitted once per world) and the probes of detector_report are this."""
    x = np.asarray(x, np.float64)
    n = np.bincount(y, minlength=n_classes)
    order = np.argsort(y, kind="stable")
    means = np.zeros((n_classes, x.shape[1]))
    starts = np.concatenate([[0], np.cumsum(n)[:-1]])
    means[n > 0] = np.add.reduceat(x[order], starts[n > 0]) / n[n > 0, None]
    r = x - means[y]
    cov = (1 - shrink) * (r.T @ r) / len(x) + shrink * x.var(0).mean() * np.eye(x.shape[1])
    W = np.linalg.solve(cov, means.T).T  # (C, D)
    b = -0.5 * (W * means).sum(1) + (np.log(np.maximum(prior, 1e-12)) if prior is not None else 0.0)
    b[n == 0] = -1e9  # a class never seen is never the answer
    return W.astype(np.float32), b.astype(np.float32)


def read_out(features, W, b):
    """The detector's read-out of stored features: the top class and its softmax probability."""
    logits = np.asarray(features, np.float32) @ W.T + b  # (K, C)
    top = logits.argmax(1)
    p = np.exp(logits - logits[np.arange(len(top)), top][:, None])
    return top, (1 / p.sum(1)).astype(np.float32)


class ToyWorld:
    """Draws scenes and what a detector and people would say about them. Deterministic from seed."""

    def __init__(self, seed=0):
        self.seed, self.rng = seed, np.random.default_rng(seed)
        g = np.random.default_rng(seed + 1)  # the detector's feature space and the class frequencies, per world
        unit = lambda n: g.standard_normal((n, FEATURE_DIM)) / np.sqrt(FEATURE_DIM)
        self.group_vec = dict(zip(GROUPS, unit(len(GROUPS))))
        self.class_vec = unit(len(CLASSES)) * np.exp(g.uniform(np.log(0.5), np.log(2), len(CLASSES)))[:, None]
        for a, b in PAIRS:  # near-duplicates: the second is the first turned a little (cosine 0.99)
            i, j = CLASSES.index(a), CLASSES.index(b)
            self.class_vec[j] = 0.99 * self.class_vec[i] + 0.14 * np.linalg.norm(self.class_vec[i]) * unit(1)[0]
        self.color_vec, self.size_vec = 0.7 * unit(len(COLORS)), 0.4 * unit(len(SIZES))
        groups = np.stack([self.group_vec[GROUP_OF[c]] for c in CLASSES])  # (C, D)
        self.mean = (groups + self.class_vec).astype(np.float32)  # (C, D)
        self.color_vec, self.size_vec = self.color_vec.astype(np.float32), self.size_vec.astype(np.float32)
        rank = g.permutation(len(CLASSES)) + 1  # rank 1 is the commonest class
        weight = (1600 * rank / len(CLASSES) + ZIPF_Q) ** -ZIPF_S
        self.freq = weight / weight.sum()  # (C,): one frequency for images, captions, text and tasks
        self.index = {c: i for i, c in enumerate(CLASSES)}
        self._detector, self._p = None, {}

    def pick(self, classes, size=None, r=None):
        """Classes drawn from `classes` by the world's frequency."""
        key = tuple(classes)
        if key not in self._p:
            p = self.freq[[self.index[c] for c in classes]]
            self._p[key] = np.cumsum(p / p.sum())
        cdf = self._p[key]  # inverse-CDF sampling: Generator.choice with p rebuilds it at every call
        picked = np.minimum(np.searchsorted(cdf, (r or self.rng).random(size), side="right"), len(cdf) - 1)
        return classes[int(picked)] if size is None else [classes[i] for i in picked]

    def scene(self, kind=None, classes=None):
        """Ground truth: a scene type, its objects (class, colour, size, pixel box) and background regions."""
        r = self.rng
        kind = str(kind or r.choice(list(SCENES)))
        groups, background = SCENES[kind]
        W, H = 640, 480
        if classes is None:
            classes = self.pick([c for g in groups for c in GROUPS[g]], int(r.integers(OBJECTS[0], OBJECTS[1] + 1)))
        n = len(classes)
        u = r.random((n + 4, 6))  # one draw per scene: colour, size, box; the last 4 rows for the background
        colors, small = (u[:, 0] * len(COLORS)).astype(int), u[:n, 1] < 0.5
        wh = np.where(small[:, None], 0.1 + 0.15 * u[:n, 2:4], 0.3 + 0.2 * u[:n, 2:4]) * (W, H)
        xy = u[:n, 4:6] * ((W, H) - wh)
        boxes = np.round(np.concatenate([xy, xy + wh], 1), 1).tolist()
        objects = [{"class": str(c), "color": COLORS[k], "size": "small" if s else "large", "box": box}
                   for c, k, s, box in zip(classes, colors, small, boxes)]
        top = lambda c: c in ("sky", "wall", "window", "ceiling")
        for c, k in zip(background[:2 + (u[n, 1] < 0.5)], colors[n:]):  # stuff regions: tagged, seldom talked about
            objects.append({"class": c, "color": COLORS[k], "size": "large", "background": True,
                            "box": [0.0, 0.0 if top(c) else H / 2, float(W), H / 2 if top(c) else float(H)]})
        return {"kind": kind, "width": W, "height": H, "objects": objects}

    def features(self, scene, r):
        """The region features of a scene's objects, as stored (fp16): ReLU(group + class + colour + size
        + noise), ReLU'd like a real box head's output (docs/METHOD.md section 12)."""
        o = scene["objects"]
        return self.region_features([self.index[x["class"]] for x in o], [COLORS.index(x["color"]) for x in o],
                                    [SIZES.index(x["size"]) for x in o], r)

    def region_features(self, classes, colors, sizes, r):
        scale = np.float32(NOISE / np.sqrt(FEATURE_DIM))  # each noise entry N(0, sigma^2 / d)
        noise = r.standard_normal((len(classes), FEATURE_DIM), dtype=np.float32) * scale
        f = self.mean[classes] + self.color_vec[colors] + self.size_vec[sizes] + noise
        return np.maximum(f, 0).astype(np.float16)

    @property
    def detector(self):
        """The simulated detector: linear read-outs of the class and of the colour from the feature,
        fitted once on DETECTOR_REGIONS regions of this world's scenes (its own random stream, so that
        the world's scenes do not move), as BUTD's classifier is trained once on Visual Genome."""
        if self._detector is None:
            world = ToyWorld.__new__(ToyWorld)
            world.__dict__.update(self.__dict__, rng=np.random.default_rng([self.seed, 23]))
            classes, colors, sizes = [], [], []
            while len(classes) < DETECTOR_REGIONS:
                o = world.scene()["objects"]
                classes += [self.index[x["class"]] for x in o]
                colors += [COLORS.index(x["color"]) for x in o]
                sizes += [SIZES.index(x["size"]) for x in o]
            x = self.region_features(classes, colors, sizes, world.rng).astype(np.float32)
            y = np.array(classes)
            prior = np.bincount(y, minlength=len(CLASSES)) / len(y)
            W, b = lda(x, y, len(CLASSES), prior)
            Wa, ba = lda(x, np.array(colors), len(COLORS), np.full(len(COLORS), 1 / len(COLORS)))
            self._detector = {"class_W": W, "class_b": b, "attr_W": Wa, "attr_b": ba}
        return self._detector

    def detect(self, scene):
        """What the detector gives for a scene: per region a box (jittered), the stored feature, the top-1
        tag and its confidence, and the colour and its confidence, both read out of that very feature."""
        r, W, H = self.rng, scene["width"], scene["height"]
        box = np.array([o["box"] for o in scene["objects"]])  # (K, 4) pixels
        wh = np.tile(box[:, 2:] - box[:, :2], 2)
        box = np.clip(box + r.normal(0, 0.05, box.shape) * wh, 0, [W, H, W, H]) / [W, H, W, H]
        f = self.features(scene, r)
        d = self.detector
        labels, scores = read_out(f, d["class_W"], d["class_b"])
        attrs, attr_scores = read_out(f, d["attr_W"], d["attr_b"])
        return dict(features=f, boxes=box, labels=labels, scores=scores, attributes=attrs, attr_scores=attr_scores,
                    width=W, height=H)

    # -- language about scenes ------------------------------------------------

    def caption(self, scene):
        r, objects = self.rng, things(scene)
        a, b = (objects[i] for i in r.choice(len(objects), 2, replace=False))
        # the classes in scene order: a set's order changes with PYTHONHASHSEED, and so did the captions
        counts = {c: sum(o["class"] == c for o in objects) for c in dict.fromkeys(o["class"] for o in objects)}
        many = [c for c, n in counts.items() if n > 1]
        form = r.integers(5)
        if form == 0:
            return f"a {a['color']} {a['class']} {relation(a, b)} a {b['size']} {b['class']} ."
        if form == 1:
            return f"a {a['size']} {a['color']} {a['class']} in a {scene['kind']} ."
        if form == 2 and many:
            c = r.choice(many)
            return f"{NUMBERS[counts[c]]} {plural(c)} and a {b['color']} {b['class']} in the {scene['kind']} ."
        if form == 3:
            return f"there is a {a['color']} {a['class']} and a {b['color']} {b['class']} ."
        return f"a {a['class']} {relation(a, b)} the {b['color']} {b['class']} in a {scene['kind']} ."

    def sentence(self, group):
        """General text: the object words used outside captions, in contexts shared by a group,
        so that text alone can learn that a truck is like a car."""
        r = self.rng
        x, y = self.pick(GROUPS[group]), self.pick(CLASSES)
        t = r.choice(GENERAL_TEXT.get(group, []) + GENERAL_TEXT["any"])
        return t.format(x=x, xs=plural(x), y=y, ys=plural(y), color=r.choice(COLORS), size=r.choice(SIZES))

    def document(self):
        group = GROUP_OF[self.pick(CLASSES[:-len(GROUPS["background"])])]  # by the world's class frequency
        return [self.sentence(group) for _ in range(self.rng.integers(3, 8))]


GENERAL_TEXT = {
    "vehicle": ["the {x} stopped at the traffic light .", "he bought a new {x} last year .",
                "she drove the {x} to work .", "the {x} was parked outside the station .",
                "a {x} needs fuel to run .", "they washed the {x} in the driveway ."],
    "animal": ["the {x} was hungry and wanted food .", "a {x} is an animal that lives on a farm .",
               "the vet looked at the sick {x} .", "the {x} slept in the sun all day .",
               "children like to feed the {x} .", "the {x} ran across the field ."],
    "kitchenware": ["she washed the {x} after dinner .", "put the {x} back in the cupboard .",
                    "the {x} fell and made a loud noise .", "he set the {x} on the kitchen counter .",
                    "a clean {x} was next to the sink ."],
    "food": ["the {x} tasted sweet and fresh .", "he ate a {x} for lunch .", "she bought a {x} at the market .",
             "the {x} was still warm from the oven .", "kids love to eat {xs} ."],
    "furniture": ["they moved the {x} into the new house .", "the old {x} is made of wood .",
                  "she sat down near the {x} .", "the {x} was too heavy to carry .",
                  "we painted the {x} last summer ."],
    "person": ["the {x} walked to work in the morning .", "a {x} said hello to the neighbours .",
               "the {x} laughed at the joke .", "the {x} was reading a book .", "a young {x} waved from the window ."],
    "street": ["the {x} was at the corner of the road .", "they put a new {x} near the crossing ."],
    "wild animal": ["the {x} lives in the wild .", "we watched a {x} at the zoo .", "a {x} hid behind the trees ."],
    "produce": ["she chopped the {x} for the salad .", "a fresh {x} from the garden .", "he grew {xs} last summer ."],
    "clothing": ["she wore a {x} to the party .", "he folded the {x} and put it away .", "the {x} was too small ."],
    "accessory": ["she lost her {x} on the train .", "he carried a {x} to work .", "the {x} was a gift ."],
    "body part": ["he hurt his {x} playing football .", "the doctor looked at her {x} ."],
    "electronics": ["he plugged in the {x} .", "the {x} stopped working yesterday .", "she bought a new {x} online ."],
    "appliance": ["the {x} in the kitchen is broken .", "he cleaned the {x} after cooking ."],
    "home": ["she put the {x} in the bathroom .", "the {x} was old but clean .", "we need a new {x} at home ."],
    "sports": ["the team needed a {x} for the game .", "she played with the {x} in the park ."],
    "plant": ["the {x} grew tall in the garden .", "he cut the {x} in the spring .", "a {x} stood by the path ."],
    "building": ["the {x} was built long ago .", "they painted the {x} last year .", "we walked past the {x} ."],
    "landscape": ["the {x} looked beautiful at sunset .", "they walked toward the {x} .", "a {x} far away ."],
    "office": ["she left the {x} on her desk .", "he wrote on the {x} .", "put the {x} in the drawer ."],
    "boat": ["the {x} sailed across the bay .", "they tied the {x} to the dock .", "a {x} in the harbor ."],
    "any": ["the {x} was {color} and {size} .", "a {size} {x} is not like a {y} .",
            "the {x} and the {y} were both {color} .", "there was a {color} {x} in the picture .",
            "how many {xs} did you see ?", "what color is your {x} ?", "is there a {x} in the house ?",
            "what is next to the {y} ?", "we saw two {xs} and three {ys} ."],
}


def relation(a, b):
    """Where a is relative to b, from their box centres."""
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a["box"], b["box"]
    dx, dy = (ax1 + ax2 - bx1 - bx2) / 2, (ay1 + ay2 - by1 - by2) / 2
    if abs(dx) > abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def make_toy_world(root=TOY_DIR, seed=0, scale=1.0, log=print):
    """Write the toy world under `root` (skipped if it is already there). `scale` shrinks it for tests.

    root/vocab.txt                         the WordPiece vocabulary, a copy of toy_vocab.txt
    root/detector.npz                      the simulated detector: class_W, class_b, attr_W, attr_b (read_out)
    root/scenes.json                       ground truth of every scene, by image id
    root/features/{pretrain,extra,heldout,vqa,nlvr2,flickr30k,refcoco}   feature stores
    root/pretrain/captions.txt             captions of *other* scenes than the pretrain images (unaligned)
    root/pretrain/pairs.jsonl              {"image_id", "caption"}: the pretrain images' own captions (aligned)
    root/pretrain/text.txt                 general text, a sentence per line, blank line between documents
    root/heldout/{captions.txt,text.txt}   the same, never trained on, for held-out losses
    root/tasks/...                         VQA v2, NLVR2, Flickr30K (Karpathy) and RefCOCO+ (UNC) files
    """
    done = os.path.join(root, "done")
    if os.path.exists(done):
        with open(done) as f:
            if f.read().strip() == str(VERSION):
                return make_later_corpora(root, seed)
        log(f"{root}: a toy world of an earlier version (its tasks differ): built again")
        shutil.rmtree(root)
    if os.path.isdir(root) and os.listdir(root):  # half made by an earlier version, or not a toy world at all
        if not set(os.listdir(root)) <= {"pretrain", "heldout", "features", "tasks", "vocab.txt", "detector.npz",
                                         "scenes.json"}:
            raise SystemExit(f"{root}: not a toy world, and not empty; give another --toy-root")
        shutil.rmtree(root)
    for old in glob.glob(f"{root}.partial-*"):  # left by a build that was killed
        if not alive(int(old.rsplit("-", 1)[1])):
            shutil.rmtree(old, ignore_errors=True)
    # built in a folder of its own, then moved into place whole: a build cut short leaves nothing a later run trusts
    part = f"{root}.partial-{os.getpid()}"
    try:
        count = build_toy_world(part, seed, scale)
        try:
            os.rename(part, root)
        except OSError:
            if not os.path.exists(os.path.join(root, "done")):  # another process's build is not there instead
                raise
    except (OSError, WriteError) as e:  # a full disk
        raise WriteError(root, e) from None
    finally:  # what is left of the build: all of it when it was cut short, nothing once moved into place
        shutil.rmtree(part, ignore_errors=True)
    log(f"toy world written to {root}/: {count} scenes")
    return root


def alive(pid):
    """Whether process `pid` still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def build_toy_world(root, seed, scale):
    """make_toy_world's work, into `root`; the number of scenes."""
    n = lambda k: max(4, int(k * scale))
    world, scenes = ToyWorld(seed), {}
    os.makedirs(os.path.join(root, "pretrain"), exist_ok=True)
    os.makedirs(os.path.join(root, "heldout"), exist_ok=True)

    def store(name, items):  # items: (image_id, scene); writes a feature store of their detections
        w = FeatureWriter(os.path.join(root, "features", name), FEATURE_DIM, CLASSES, attr_names=COLORS,
                          extractor={"detector": "toy world simulated detector", "version": 2, "seed": seed},
                          shard_size=4000)
        for image_id, s in items:
            scenes[image_id] = s
            d = world.detect(s)
            w.add(image_id, d["features"], d["boxes"], d["labels"], d["scores"], d["width"], d["height"],
                  d["attributes"], d["attr_scores"])
        w.close()

    def text(n_docs):
        return [line for _ in range(n_docs) for line in world.document() + [""]]

    # pre-training corpora: images, captions of other scenes, aligned pairs, general text
    images = [(f"pt{i:06d}", world.scene()) for i in range(n(12000))]
    store("pretrain", images)
    store("extra", [(f"ex{i:06d}", world.scene()) for i in range(n(6000))])
    write_lines(os.path.join(root, "pretrain", "captions.txt"),
                [world.caption(world.scene()) for _ in range(n(12000))])
    write_lines(os.path.join(root, "pretrain", "pairs.jsonl"),
                [json.dumps({"image_id": i, "caption": world.caption(s)}) for i, s in images])
    write_lines(os.path.join(root, "pretrain", "text.txt"), text(n(6000)))
    store("heldout", [(f"ho{i:06d}", world.scene()) for i in range(n(300))])
    write_lines(os.path.join(root, "heldout", "captions.txt"),
                [world.caption(world.scene()) for _ in range(n(300))])
    write_lines(os.path.join(root, "heldout", "text.txt"), text(n(150)))

    make_toy_tasks(world, root, n, store)

    shutil.copyfile(VOCAB, os.path.join(root, "vocab.txt"))  # the same pieces for every seed and scale
    np.savez(os.path.join(root, "detector.npz"), **world.detector)
    write_json(os.path.join(root, "scenes.json"), scenes)
    make_later_corpora(root, seed)
    write_lines(os.path.join(root, "done"), [str(VERSION)])
    return len(scenes)


def train_vocab(root, out=VOCAB):
    """How toy_vocab.txt was made: WordPiece trained on every word of the toy world at `root` (seed 0),
    as BERT's covers all of English. The trainer breaks ties between equally frequent merges in an
    order that changes from process to process (tokenizers issue 1794), so two trainings differ in a
    few pieces, and every figure downstream with them: it ran once and its output is kept. Run it
    again (python toy.py --train-vocab) after changing the toy world's words."""
    from tokenizers import BertWordPieceTokenizer
    tok = BertWordPieceTokenizer(lowercase=True)
    words = [" ".join(CLASSES + COLORS + SIZES + NUMBERS + list(SCENES) + [plural(c) for c in CLASSES])]
    questions = os.path.join(root, "tasks", "vqa", "v2_OpenEnded_mscoco_train2014_questions.json")
    words += [q["question"] for q in read_json(questions)["questions"]]
    for f in ("text.txt", "captions.txt"):
        with open(os.path.join(root, "pretrain", f)) as lines:
            words += lines.read().splitlines()
    tok.train_from_iterator(words, vocab_size=1500, min_frequency=2, show_progress=False,
                            special_tokens=list(Vocab.RESERVED))
    pieces = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    for path in (out, os.path.join(root, "vocab.txt")):
        write_lines(path, pieces)
    return out


# The U_SBU row of the paper pre-trains on Conceptual Captions images with SBU captions: captions
# that users wrote for other photos (Flickr), in other words. Its miniature: captions in a second
# style (plain sentences, words of the general text) of scenes drawn with other scene-type
# proportions (more outdoor photos), never of the pre-training images.
SBU_KINDS = {"street": 0.15, "city": 0.10, "farm": 0.15, "beach": 0.15, "park": 0.15, "zoo": 0.05, "ski slope": 0.10,
             "living room": 0.05, "kitchen": 0.03, "dining room": 0.03, "bathroom": 0.02, "office": 0.02}
SBU_TEMPLATES = ["we saw a {a[color]} {a[class]} and a {b[class]} .", "the {a[class]} was {a[color]} and {a[size]} .",
                 "a {a[class]} near the {b[class]} in the {kind} .",
                 "there was a {a[size]} {a[class]} next to the {b[class]} .",
                 "she saw a {a[color]} {a[class]} in the picture ."]


def sbu_caption(r, scene):
    objects = things(scene)
    a, b = (objects[i] for i in r.choice(len(objects), 2, replace=False))
    return SBU_TEMPLATES[r.integers(len(SBU_TEMPLATES))].format(a=a, b=b, kind=scene["kind"])


def make_later_corpora(root, seed=0):
    """Files added to the toy world after its first version, each from its own random stream, so
    that a world made before them gains them unchanged and nothing else in it moves:
    root/pretrain/captions_sbu.txt  the U_SBU row's captions (above), as many as captions.txt
    root/heldout/pairs.jsonl        the held-out images with a caption each, for the held-out match accuracy"""
    sbu, pairs = os.path.join(root, "pretrain", "captions_sbu.txt"), os.path.join(root, "heldout", "pairs.jsonl")
    if os.path.exists(sbu) and os.path.exists(pairs):
        return root
    world = ToyWorld(seed)
    world.rng = r = np.random.default_rng([seed, 2021])
    with open(os.path.join(root, "pretrain", "captions.txt")) as f:
        count = sum(1 for line in f if line.strip())
    kinds = list(SBU_KINDS)
    write_lines(sbu, [sbu_caption(r, world.scene(kinds[r.choice(len(kinds), p=list(SBU_KINDS.values()))]))
                      for _ in range(count)])
    heldout = FeatureStore(os.path.join(root, "features", "heldout")).ids()
    scenes = read_json(os.path.join(root, "scenes.json"))
    write_lines(pairs, [json.dumps({"image_id": i, "caption": world.caption(scenes[i])}) for i in heldout])
    return root


def make_toy_tasks(world, root, n, store):
    """The four downstream tasks on fresh scenes, each in its real dataset's file format (docs/METHOD.md §7);
    n(k) scales a count, store(name, [(image_id, scene)]) writes a feature store."""
    for make in (toy_vqa, toy_nlvr2, toy_flickr30k, toy_refcoco):
        make(world, os.path.join(root, "tasks"), n, store)
    # v4: 18,000 more NLVR2 training sentences, drawn after everything else so that every file of v3 stays the same
    nlvr2_sentences(world, os.path.join(root, "tasks"), store, "train", range(n(6000), n(24000)))


def toy_vqa(world, tasks, n, store):
    """VQA v2: questions and annotations files, 10 answers per question, COCO-style integer image ids."""
    r = world.rng
    os.makedirs(os.path.join(tasks, "vqa"), exist_ok=True)
    qid = 0
    for split, first_id, count in (("train2014", 100000, n(2000)), ("val2014", 200000, n(1000))):
        items = [(str(first_id + i), world.scene()) for i in range(count)]
        store(f"vqa_{split[:-4]}", items)
        questions, annotations = [], []
        for image_id, s in items:
            for qtype, atype, question, answer, options in toy_questions(r, s):
                qid += 1
                answers = [answer if r.random() < 0.9 else str(r.choice(options)) for _ in range(10)]
                questions.append({"image_id": int(image_id), "question": question, "question_id": qid})
                annotations.append({"question_id": qid, "image_id": int(image_id), "question_type": qtype,
                                    "answer_type": atype,
                                    "multiple_choice_answer": max(dict.fromkeys(answers), key=answers.count),
                                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                                for k, a in enumerate(answers)]})
        write_json(os.path.join(tasks, "vqa", f"v2_OpenEnded_mscoco_{split}_questions.json"),
                   {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split, "questions": questions})
        write_json(os.path.join(tasks, "vqa", f"v2_mscoco_{split}_annotations.json"),
                   {"data_type": "mscoco", "data_subtype": split, "annotations": annotations})


def toy_nlvr2(world, tasks, n, store):
    """NLVR2: JSON lines; each sentence is judged against 2 image pairs, named from the identifier."""
    os.makedirs(os.path.join(tasks, "nlvr2"), exist_ok=True)
    for split, count in (("train", n(6000)), ("dev", n(600)), ("test1", n(600))):
        nlvr2_sentences(world, tasks, store, split, range(count))


def nlvr2_sentences(world, tasks, store, split, numbers):
    """Sentences `numbers` of an NLVR2 split, added to its file and its feature store."""
    lines, items = [], []
    for k in numbers:
        sentence, make_pair = toy_nlvr2_sentence(world)
        for p in range(2):
            label = bool(world.rng.random() < 0.5)
            left, right = make_pair(label)
            items += [(f"{split}-{k}-{p}-img0", left), (f"{split}-{k}-{p}-img1", right)]
            lines.append(json.dumps({"identifier": f"{split}-{k}-{p}-0", "sentence": sentence, "label": str(label)}))
    store(f"nlvr2_{split}", items)
    file = os.path.join(tasks, "nlvr2", f"{split}.json")
    if numbers.start:  # after the split's first sentences
        with open(file) as f:
            lines = f.read().splitlines() + lines
    write_lines(file, lines)


def toy_flickr30k(world, tasks, n, store):
    """Flickr30K, Karpathy's split file: 5 captions per image."""
    os.makedirs(os.path.join(tasks, "flickr30k"), exist_ok=True)
    images, items = [], []
    for split, count in (("train", n(1000)), ("val", n(100)), ("test", n(100))):
        for _ in range(count):
            i, s = len(images), world.scene()
            items.append((str(700000 + i), s))
            sents = [world.caption(s) for _ in range(5)]
            images.append({"filename": f"{700000 + i}.jpg", "imgid": i, "split": split,
                           "sentids": list(range(5 * i, 5 * i + 5)),
                           "sentences": [{"raw": c, "tokens": c.replace(" .", "").split(), "imgid": i,
                                          "sentid": 5 * i + j} for j, c in enumerate(sents)]})
    store("flickr30k", items)
    write_json(os.path.join(tasks, "flickr30k", "dataset_flickr30k.json"), {"dataset": "flickr30k", "images": images})


def toy_refcoco(world, tasks, n, store):
    """RefCOCO+ (UNC): refs(unc).p and COCO instances.json; testA refers to people, testB to objects."""
    r = world.rng
    os.makedirs(os.path.join(tasks, "refcoco+"), exist_ok=True)
    refs, coco_images, annotations, items = [], [], [], []
    for split, count in (("train", n(6000)), ("val", n(600)), ("testA", n(600)), ("testB", n(600))):
        made = 0
        while made < count:
            training = split in ("train", "val")
            s = toy_refcoco_scene(world, people=split == "testA" or (training and r.random() < 0.5))
            image_id = 300000 + len(coco_images)
            targets = [o for o in things(s) if (GROUP_OF[o["class"]] == "person") == (split != "testB") or training]
            o = targets[r.integers(len(targets))]
            expression = referring_expression(o, things(s))
            if expression is None:
                continue
            made += 1
            items.append((str(image_id), s))
            coco_images.append({"id": image_id, "width": s["width"], "height": s["height"],
                                "file_name": f"COCO_train2014_{image_id:012d}.jpg"})
            for obj in things(s):
                x1, y1, x2, y2 = obj["box"]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": CLASSES.index(obj["class"]) + 1,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
                if obj is o:
                    ann_id = annotations[-1]["id"]
            refs.append({"ref_id": len(refs), "ann_id": ann_id, "image_id": image_id, "split": split,
                         "category_id": CLASSES.index(o["class"]) + 1,
                         "sent_ids": [len(refs)], "file_name": coco_images[-1]["file_name"],
                         "sentences": [{"sent": expression, "raw": expression, "tokens": expression.split(),
                                        "sent_id": len(refs)}]})
    store("refcoco", items)
    import pickle
    with open(os.path.join(tasks, "refcoco+", "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f)
    write_json(os.path.join(tasks, "refcoco+", "instances.json"), {
        "images": coco_images, "annotations": annotations,
        "categories": [{"id": i + 1, "name": c, "supercategory": GROUP_OF[c]} for i, c in enumerate(CLASSES)]})


def toy_questions(r, s):
    """(question_type, answer_type, question, answer, wrong-answer options) about a scene."""
    objs = things(s)
    counts = {c: sum(o["class"] == c for o in objs) for c in CLASSES}
    unique = [o for o in objs if counts[o["class"]] == 1]
    out = []
    if unique:
        o = unique[r.integers(len(unique))]
        out.append(("what color is the", "other", f"what color is the {o['class']}?", o["color"], COLORS))
    c = r.choice([o["class"] for o in objs] + list(GROUPS[GROUP_OF[objs[0]["class"]]]))
    out.append(("how many", "number", f"how many {plural(c)} are there?", str(counts[c]), ["0", "1", "2", "3", "4"]))
    present = r.random() < 0.5
    group = GROUPS[GROUP_OF[objs[r.integers(len(objs))]["class"]]]
    pool = [x for x in group if (counts[x] > 0) == present] or [x for x in group]
    c = r.choice(pool)
    out.append(("is there a", "yes/no", f"is there a {c} in the picture?", "yes" if counts[c] else "no", ["yes", "no"]))
    present = {}  # group: its classes among the objects
    for o in objs:
        present.setdefault(GROUP_OF[o["class"]], set()).add(o["class"])
    groups = sorted(g for g, cs in present.items() if len(cs) == 1)  # one class of the group: one right answer
    if groups:
        g = groups[r.integers(len(groups))]
        out.append(("which", "other", f"which {GROUP_NOUN.get(g, g)} is in the scene?", present[g].pop(),
                    CLASSES[:-len(GROUPS['background'])]))
    return out


def toy_nlvr2_sentence(world):
    """A statement about two images, and a function that draws a (left, right) scene pair for which
    the statement is true or false, as asked. Two lookups: is the class in the left image, is it in both
    (counting and colour statements were not learnt from any number of examples tried: docs/LOG.md 15)."""
    r = world.rng
    kind = r.choice(list(SCENES))
    pool = [x for g in SCENES[kind][0] for x in GROUPS[g]]
    c = world.pick(pool)

    def scene(copies):  # a scene of this kind with `copies` objects of class c
        others = [x for x in world.pick(pool, int(r.integers(4, 11))) if x != c]
        return world.scene(kind, classes=others + [c] * copies)

    if r.random() < 0.5:
        sentence = f"there is a {c} in the left image ."
        pair = lambda t: (scene(int(r.integers(1, 3)) if t else 0), scene(int(r.integers(0, 2))))
    else:
        sentence = f"both images contain a {c} ."
        pair = lambda t: ((scene(1), scene(1)) if t else
                          (scene(1), scene(0)) if r.random() < 0.5 else (scene(0), scene(1)))
    return sentence, pair


def toy_refcoco_scene(world, people):
    """A scene with look-alike distractors: two or three objects of one class, one or two of another, and a
    few others."""
    r = world.rng
    kind = r.choice(["street", "farm", "living room"] if people else ["kitchen", "dining room", "street", "farm"])
    groups = [g for g in SCENES[kind][0] if (g == "person") == people] or SCENES[kind][0]
    a = world.pick(GROUPS["person"] if people else [x for g in groups for x in GROUPS[g]])
    b = world.pick([x for g in SCENES[kind][0] for x in GROUPS[g]])
    others = [x for x in world.pick([x for g in SCENES[kind][0] for x in GROUPS[g]], int(r.integers(2, 9)))
              if x not in (a, b)]
    return world.scene(kind, classes=[a] * int(r.integers(2, 4)) + [b] * int(r.integers(1, 3)) + others)


def referring_expression(o, objects):
    """The shortest description that fits `o` and no other object (RefCOCO+ has no location words)."""
    for keys in (["class"], ["color", "class"], ["size", "class"], ["size", "color", "class"]):
        if sum(all(x[k] == o[k] for k in keys) for x in objects) == 1:
            return "the " + " ".join(o[k] for k in keys)
    return None


def draw_scene(root, image_id, out_png):
    """Look at a toy scene: its objects as coloured boxes, the detector's tags and scores, and a
    caption, in a PNG."""
    from PIL import Image, ImageDraw
    with open(os.path.join(root, "scenes.json")) as f:
        scene = json.load(f).get(image_id)
    if scene is None:
        raise KeyError(f"{root}/scenes.json: no scene {image_id!r}")
    stores = [FeatureStore(os.path.join(root, "features", n)) for n in os.listdir(os.path.join(root, "features"))]
    det = next(s for s in stores if image_id in s)[image_id]
    W, H = scene["width"], scene["height"]
    rgb = {"red": (220, 50, 50), "blue": (60, 90, 220), "green": (60, 170, 80), "yellow": (230, 200, 40),
           "black": (30, 30, 30), "white": (245, 245, 245), "brown": (140, 90, 50), "gray": (150, 150, 150)}
    img = Image.new("RGB", (W, H + 40), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for o in sorted(scene["objects"], key=lambda o: not o.get("background")):  # background first
        draw.rectangle(o["box"], fill=rgb[o["color"]] if not o.get("background") else None, outline=(200, 200, 200))
    for box, label, score in zip(det["boxes"], det["labels"], det["scores"]):
        x1, y1, x2, y2 = box * [W, H, W, H]
        draw.rectangle([x1, y1, x2, y2], outline=(255, 0, 255), width=2)
        text = f"{CLASSES[label]} {score:.2f}"
        draw.rectangle(draw.textbbox((x1 + 3, y1 + 2), text), fill=(255, 255, 255))
        draw.text((x1 + 3, y1 + 2), text, fill=(200, 0, 200))
    draw.text((8, H + 12), ToyWorld(zlib.crc32(image_id.encode())).caption(scene), fill=(0, 0, 0))
    img.save(out_png)
    return out_png


# -- the detector's statistics (issue 23's bars; docs/METHOD.md section 12) -------


def probe_curve(x, y, x_test, y_test, shots=(1, 5, 10, 30)):
    """Accuracy on (x_test, y_test) of a linear probe (lda) fitted on all of (x, y), with the classes'
    frequencies as priors, and on the first K regions of each class (equal priors; shrinkage the best of
    0.3, 0.6, 1.0 on the test regions, which favours the few-shot probe)."""
    C = len(CLASSES)
    right = lambda W, b: float(np.mean(read_out(x_test, W, b)[0] == y_test))
    out = {"all": right(*lda(x, y, C, np.bincount(y, minlength=C) / len(y)))}
    for k in shots:
        first = np.concatenate([np.flatnonzero(y == c)[:k] for c in range(C)])
        out[str(k)] = max(right(*lda(x[first], y[first], C, shrink=s)) for s in (0.3, 0.6, 1.0))
    return out


def task_train_images(root):
    """Each task's training examples in file order, as tasks.py loads them (RefCOCO+: one per sentence, and
    a toy ref has one), each as its image ids."""
    t = os.path.join(root, "tasks")
    vqa = read_json(os.path.join(t, "vqa", "v2_OpenEnded_mscoco_train2014_questions.json"))["questions"]
    with open(os.path.join(t, "nlvr2", "train.json")) as f:
        nlvr2 = [json.loads(line)["identifier"].rsplit("-", 1)[0] for line in f if line.strip()]
    flickr = read_json(os.path.join(t, "flickr30k", "dataset_flickr30k.json"))["images"]
    import pickle
    with open(os.path.join(t, "refcoco+", "refs(unc).p"), "rb") as f:
        refs = pickle.load(f)
    return {"vqa": [[str(q["image_id"])] for q in vqa],
            "nlvr2": [[f"{i}-img0", f"{i}-img1"] for i in nlvr2],
            "flickr30k": [[os.path.splitext(im["filename"])[0]] for im in flickr if im["split"] == "train"],
            "refcoco": [[str(r["image_id"])] for r in refs if r["split"] == "train"]}


def class_words(lines):
    """(class-word tokens, all tokens) of whitespace-split lines; a two-word name counts as two."""
    names = set(CLASSES) | {plural(c) for c in CLASSES}
    hits = total = 0
    for line in lines:
        t = line.split()
        total += len(t)
        i = 0
        while i < len(t):
            n = 2 if " ".join(t[i:i + 2]) in names and i + 1 < len(t) else 1 if t[i] in names else 0
            hits, i = hits + n, i + max(n, 1)
    return hits, total


def detector_report(root, fraction=1 / 16):
    """The made world's detector and class statistics: the tags' and attributes' accuracy, that each
    stored tag is the detector's read-out of its stored feature, a linear probe's accuracy at 1, 5, 10 and
    30 regions per class and on all pre-training regions (held-out regions), the class frequencies of the
    pre-training images and of each task's training set and its `fraction` (tasks.train_subset)."""
    scenes, det = read_json(os.path.join(root, "scenes.json")), np.load(os.path.join(root, "detector.npz"))
    index = {c: i for i, c in enumerate(CLASSES)}

    def regions(name):
        store = FeatureStore(os.path.join(root, "features", name))
        e = [store[i] for i in store.ids()]
        y = np.array([index[o["class"]] for i in store.ids() for o in scenes[i]["objects"]])
        col = np.array([COLORS.index(o["color"]) for i in store.ids() for o in scenes[i]["objects"]])
        cat = lambda k: np.concatenate([x[k] for x in e])
        return cat("features").astype(np.float32), y, cat("labels"), cat("attributes"), col

    x, y, tags, _, _ = regions("pretrain")
    xh, yh, tags_h, attrs_h, col_h = regions("heldout")
    counts = lambda ids: np.bincount([index[o["class"]] for i in ids for o in scenes[i]["objects"]],
                                     minlength=len(CLASSES))
    pretrain = np.bincount(y, minlength=len(CLASSES))
    probe = probe_curve(x, y, xh, yh)
    with open(os.path.join(root, "pretrain", "captions.txt")) as f:
        hits, total = class_words(f)
    report = {
        "classes": len(CLASSES), "groups": len(GROUPS), "pairs": len(PAIRS),
        "regions_per_image": float(len(y) / len(set(FeatureStore(os.path.join(root, "features", "pretrain")).ids()))),
        "tag_accuracy": float(np.mean(tags_h == yh)), "tag_accuracy_pretrain": float(np.mean(tags == y)),
        "attribute_accuracy": float(np.mean(attrs_h == col_h)),
        "tags_are_read_out": float(np.mean(read_out(xh, det["class_W"], det["class_b"])[0] == tags_h)),
        "probe": probe, "probe_ratio": {k: v / probe["all"] for k, v in probe.items() if k != "all"},
        "caption_class_word_share": hits / total,
        "pretrain_images": {"min_count": int(pretrain.min()), "median_count": float(np.median(pretrain))},
        "tasks": {}}
    for task, examples in task_train_images(root).items():
        part = [examples[i] for i in train_subset(len(examples), fraction)]
        full, sub = counts({i for e in examples for i in e}), counts({i for e in part for i in e})
        report["tasks"][task] = {
            "train_examples": len(examples), "subset_examples": len(part),
            "subset_classes_under_5": float(np.mean(sub < 5)), "subset_classes_absent": float(np.mean(sub == 0)),
            "train_classes_under_5": float(np.mean(full < 5)),
            "pretrain_count_of_subset_rare_classes_median": float(np.median(pretrain[sub < 5])) if (sub < 5).any()
            else None}
    return report


if __name__ == "__main__":
    p = guards.ArgumentParser(description="Make the toy world, or draw one of its scenes.")
    p.add_argument("--root", default=TOY_DIR, help="where the toy world lives (default: %(default)s)")
    p.add_argument("--seed", type=guards.COUNT, default=0, help="the world's seed (default: %(default)s)")
    p.add_argument("--show", metavar="IMAGE_ID", help="draw this scene (e.g. pt000000) to IMAGE_ID.png")
    p.add_argument("--report", action="store_true", help="print the detector's and the classes' statistics "
                   "(detector_report) as JSON")
    p.add_argument("--train-vocab", action="store_true",
                   help=f"train the vocabulary again on this world's words, into {os.path.basename(VOCAB)} "
                        "(after changing them)")
    args = p.parse_args()
    if os.path.exists(args.root) and not os.path.isdir(args.root):
        raise SystemExit(f"--root {args.root}: is a file, not a folder for the toy world")
    make_toy_world(args.root, args.seed)
    if args.train_vocab:
        print("wrote", train_vocab(args.root))
    if args.report:
        print(json.dumps(detector_report(args.root), indent=1))
    if args.show:
        try:
            print("wrote", draw_scene(args.root, args.show, f"{args.show}.png"))
        except KeyError as e:
            raise SystemExit(f"--show: {e.args[0]} (ids look like pt000003, ho000012, 100004)")

