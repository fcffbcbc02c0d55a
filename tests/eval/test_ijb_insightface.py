# IJB 1:1 against insightface's own eval_ijbc.py / onnx_ijbc.py code: pooling, scores and TAR@FAR in every mode.
"""insightface's scripts (recognition/arcface_torch/eval_ijbc.py and onnx_ijbc.py, from a temporary copy: the
`arcface_torch_copy` fixture) run here for everything after the feature extraction, on the same per-image
features, metadata files, detector scores and pairs as the toolkit:

- their metadata readers on the synthetic release's files, and onnx_ijbc.py's lines that read the faceness
  (detector) scores;
- their three mode blocks (use_flip_test, use_norm_score, use_detector_score) on the concatenated
  [f(x), f(flip x)] features; the toolkit gets the same f(x), f(flip x) through its own extract_embeddings
  (flip on or off) and its --keep-image-norm / --detector-score-weighting options: all 8 modes;
- their image2template_feature, verification and verification2;
- their `for method in methods:` loop: sklearn's roc_curve, then the ROC point nearest each FAR.

Asserted per mode: template features and template scores within 1e-6, the TAR at every FAR 1e-6 ... 1e-1 of
their loop equal to the toolkit's `tar_at_far_insightface` (same convention), their printed '%.2f' equal to
the toolkit's console percent, and the toolkit's exact convention (k-th impostor threshold) the same on their
scores as on the toolkit's. Each patch that running their code needs is listed in PATCHES (printed by
test_patches_are_listed; `pytest -s` also prints every mode's numbers under both conventions). Their scripts
know no unusable image, so all images are usable here.
"""

from __future__ import annotations

import ast
import builtins
import itertools
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sklearn.preprocessing
import torch
from sklearn.metrics import auc, roc_curve
from sklearn.preprocessing import normalize

from tests.eval.factories import write_ijb_release
from toolkit.eval.benchmark import Benchmark
from toolkit.eval.extract import extract_embeddings
from toolkit.eval.ijb import IJBBenchmark, IJBRelease, load_release, verification_1to1
from toolkit.eval.roc import DEFAULT_FARS, far_key, tar_at_far, tar_at_far_nearest

SCRIPTS = ("eval_ijbc.py", "onnx_ijbc.py")
FUNCTIONS = ("read_template_media_list", "read_template_pair_list", "image2template_feature", "verification",
             "verification2")
MODE_FLAGS = ("use_flip_test", "use_norm_score", "use_detector_score")
FARS = DEFAULT_FARS   # their x_labels: 1e-6 ... 1e-1 (asserted)

PATCHES = [
    "only these parts of each script run, taken out of its syntax tree with `ast` and executed as they are: the "
    f"functions {', '.join(FUNCTIONS)}; the three `if use_flip_test / use_norm_score / use_detector_score:` "
    "blocks; `x_labels = [...]`; the `for method in methods:` loop of the ROC and the TPR table; and "
    "(onnx_ijbc.py's main) the lines from `faceness_scores = []` to `faceness_scores = np.array(...)`. Not run: "
    "the imports (cv2, mxnet, menpo, prettytable, backbones), argparse, the model and its feature extraction "
    "(they need a GPU model and packages the tests do not install)",
    "`np.int` -> `int` (an AST rewrite of the functions; np.int was removed in NumPy 1.24)",
    "`pd.read_csv(path, sep=' ', header=None).values` -> a stand-in that splits each line on ' ' (pandas is not "
    "a test dependency)",
    "in the ROC loop, `plt` and `tpr_fpr_table` are stand-ins that draw nothing and collect the table's rows, "
    "`colours` maps the method to None, `methods` is one method whose scores are given in memory (the script "
    "saves and reloads them with np.save / np.load)",
    "in the ROC loop, `min` is the builtin wrapped to record the (distance, index) it returns, so that the TPR is "
    "compared unrounded (the script prints it as '%.2f' of percent, which is compared too)",
    "inputs given as the scripts' variables: img_feats = [f(x), f(flip x)] as float32 (what get_image_feature "
    "returns; onnx_ijbc.py's extract returns float64, the same values), files = the lines of "
    "P_name_5pts_score.txt, use_* = the mode, target / args.target = 'IJBC'",
]


# ----- insightface's code, run from the copy ------------------------------------------------------------------

class NoNpInt(ast.NodeTransformer):
    """`np.int` -> `int` (PATCHES)."""

    def visit_Attribute(self, node):
        self.generic_visit(node)
        if isinstance(node.value, ast.Name) and node.value.id == "np" and node.attr == "int":
            return ast.copy_location(ast.Name(id="int", ctx=node.ctx), node)
        return node


class PandasStandIn:
    """pd.read_csv(path, sep=' ', header=None).values, for the files these scripts read (PATCHES)."""

    @staticmethod
    def read_csv(path, sep=" ", header=None):
        assert header is None
        with open(path) as handle:
            rows = [line.rstrip("\n").split(sep) for line in handle if line.strip()]
        return SimpleNamespace(values=np.array(rows, dtype=object))


class PlotStandIn:
    def plot(self, *args, **kwargs):
        pass


class TableStandIn:
    def __init__(self):
        self.rows = []

    def add_row(self, row):
        self.rows.append(row)


def _named(node, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


class Script:
    """The parts of one insightface script that run here (PATCHES), compiled from the copy's file."""

    def __init__(self, path: Path):
        self.path = path
        tree = ast.parse(path.read_text(), filename=str(path))
        self.namespace = {"np": np, "pd": PandasStandIn, "sklearn": sklearn, "normalize": normalize,
                          "roc_curve": roc_curve, "auc": auc, "print": lambda *args, **kwargs: None}
        functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS]
        assert sorted(f.name for f in functions) == sorted(FUNCTIONS), f"{path.name}: not all of {FUNCTIONS}"
        exec(self._compile([NoNpInt().visit(f) for f in functions]), self.namespace)
        nodes = list(ast.walk(tree))
        blocks = [n for n in nodes if isinstance(n, ast.If) and isinstance(n.test, ast.Name)
                  and n.test.id in MODE_FLAGS]
        assert [b.test.id for b in blocks] == list(MODE_FLAGS), f"{path.name}: mode blocks {blocks}"
        self.mode_blocks = self._compile(blocks)
        labels = [n for n in nodes if isinstance(n, ast.Assign) and any(_named(t, "x_labels") for t in n.targets)]
        loops = [n for n in nodes if isinstance(n, ast.For) and _named(n.target, "method")]
        assert len(labels) == 1 and len(loops) == 1, f"{path.name}: x_labels {len(labels)}, ROC loops {len(loops)}"
        self.x_labels_code, self.roc_loop = self._compile(labels), self._compile(loops)
        self.faceness_code = self._faceness_lines(nodes)

    def _compile(self, statements):
        module = ast.fix_missing_locations(ast.Module(body=list(statements), type_ignores=[]))
        return compile(module, str(self.path), "exec")

    def _faceness_lines(self, nodes):
        """onnx_ijbc.py main's `faceness_scores = []` ... `faceness_scores = np.array(...)` (None elsewhere)."""
        for node in nodes:
            body = getattr(node, "body", None)
            if not isinstance(body, list):
                continue
            assigns = [i for i, s in enumerate(body) if isinstance(s, ast.Assign)
                       and any(_named(t, "faceness_scores") for t in s.targets)]
            if len(assigns) == 2:
                return self._compile(body[assigns[0]:assigns[1] + 1])
        return None

    def run(self, code, **variables) -> dict:
        scope = dict(self.namespace, **variables)
        exec(code, scope)
        return scope

    def read_meta(self, root: Path):
        meta = root / "meta"
        templates, medias = self.namespace["read_template_media_list"](str(meta / "ijbc_face_tid_mid.txt"))
        p1, p2, label = self.namespace["read_template_pair_list"](str(meta / "ijbc_template_pair_label.txt"))
        return templates, medias, p1, p2, label

    def faceness(self, root: Path) -> np.ndarray:
        files = (root / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines(keepends=True)
        return self.run(self.faceness_code, files=files)["faceness_scores"]

    def image_features(self, img_feats, faceness_scores, *, flip: bool, norm: bool, detector: bool):
        return self.run(self.mode_blocks, img_feats=img_feats, faceness_scores=faceness_scores,
                        use_flip_test=flip, use_norm_score=norm, use_detector_score=detector)["img_input_feats"]

    def templates_and_scores(self, img_input_feats, templates, medias, p1, p2):
        feats, unique = self.namespace["image2template_feature"](img_input_feats, templates, medias)
        scores = self.namespace["verification"](feats, unique, p1, p2)
        assert np.array_equal(scores, self.namespace["verification2"](feats, unique, p1, p2))
        return feats, unique, scores

    def tar_at_far(self, label, score) -> tuple[list[float], list[float], list[str]]:
        """(x_labels, the TPR their loop reads at each, the row it prints)."""
        picked = []

        def recording_min(*args, **kwargs):
            found = builtins.min(*args, **kwargs)
            picked.append(found)
            return found

        x_labels = self.run(self.x_labels_code)["x_labels"]
        table = TableStandIn()
        scope = self.run(self.roc_loop, label=label, scores={"m": score}, methods=np.array(["m"]),
                         x_labels=x_labels, colours={"m": None}, plt=PlotStandIn(), tpr_fpr_table=table,
                         target="IJBC", args=SimpleNamespace(target="IJBC"), min=recording_min)
        assert len(picked) == len(x_labels) and len(table.rows) == 1
        return x_labels, [float(scope["tpr"][index]) for _, index in picked], table.rows[0][1:]


@pytest.fixture(scope="module")
def scripts(arcface_torch_copy) -> dict[str, Script]:
    return {name: Script(arcface_torch_copy / name) for name in SCRIPTS}


# ----- the toolkit's side: features through its own extraction -------------------------------------------------

class IndexImages(torch.utils.data.Dataset):
    """Image i is the 1 x 1 x 2 'picture' [i, -1 - i]: its mirror [-1 - i, i] tells which embedding to give."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([[[float(i), -1.0 - i]]]), 0


class IndexEmbedder:
    """f(image i) = straight[i], f(mirror of image i) = mirrored[i]: the features fed to insightface's code."""

    def __init__(self, straight_ID, mirrored_ID):
        self.straight, self.mirrored = torch.as_tensor(straight_ID), torch.as_tensor(mirrored_ID)

    def __call__(self, images_B112):
        code = images_B112[:, 0, 0, 0].long()
        return torch.where((code >= 0)[:, None], self.straight[code.clamp(min=0)],
                           self.mirrored[(-1 - code).clamp(min=0)])


def synthetic_features(subject_I: np.ndarray, seed: int, dim: int = 32, noise: float = 2.2):
    """(f(x), f(flip x)) float32 I x D: subject centre + noise, with lengths that differ a lot between images (so
    that keeping or removing the norm matters); the mirror image's embedding is close to the image's."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(int(subject_I.max()) + 1, dim))
    straight = centres[subject_I] + noise * rng.normal(size=(subject_I.size, dim))
    straight *= rng.uniform(0.3, 3.0, size=(subject_I.size, 1))
    mirrored = straight + 0.3 * noise * rng.normal(size=straight.shape)
    return straight.astype(np.float32), mirrored.astype(np.float32)


MODES = [dict(norm=norm, detector=detector, flip=flip)
         for norm, detector, flip in itertools.product((True, False), repeat=3)]


def mode_name(mode: dict) -> str:
    """insightface's names: N1D1F1 = use_norm_score, use_detector_score, use_flip_test all True (their default)."""
    return f"N{int(mode['norm'])}D{int(mode['detector'])}F{int(mode['flip'])}"


def compare_mode(script: Script, release: IJBRelease, straight, mirrored, theirs_meta, faceness, mode) -> dict:
    """Both sides in one mode; asserts the agreement and returns the numbers for the report."""
    emb, status = extract_embeddings(IndexEmbedder(straight, mirrored), IndexImages(len(straight)), batch_size=512,
                                     num_workers=0, flip=mode["flip"], progress=False)
    ours, extras = verification_1to1(release, emb, status, detector_score_weighting=mode["detector"],
                                     keep_image_norm=mode["norm"], fars=FARS)
    our_scores = extras["scores"]   # score_pairs of the template features, as the benchmark scores them

    templates, medias, p1, p2, label = theirs_meta
    img_feats = np.concatenate([straight, mirrored], axis=1)
    feats = script.image_features(img_feats, faceness, flip=mode["flip"], norm=mode["norm"],
                                  detector=mode["detector"])
    their_templates, unique, their_scores = script.templates_and_scores(feats, templates, medias, p1, p2)
    assert np.array_equal(unique, extras["template_ids"])
    template_diff = float(np.abs(their_templates - extras["template_features"]).max())
    score_diff = float(np.abs(their_scores - our_scores).max())
    assert template_diff <= 1e-6 and score_diff <= 1e-6, (mode_name(mode), template_diff, score_diff)

    x_labels, their_tar, their_row = script.tar_at_far(label, their_scores)
    assert list(x_labels) == list(FARS)
    nearest = ours["tar_at_far_insightface"]
    assert [nearest[far_key(f)]["tar"] for f in FARS] == their_tar, mode_name(mode)
    assert [Benchmark.percent(nearest[far_key(f)]["tar"]) for f in FARS] == their_row
    genuine, impostor = their_scores[label == 1], their_scores[label == 0]
    same_scores = tar_at_far_nearest(genuine, impostor, FARS)   # the convention alone, on their very scores
    assert [same_scores[far_key(f)]["tar"] for f in FARS] == their_tar
    exact = ours["tar_at_far"]
    on_their_scores = tar_at_far(genuine, impostor, FARS)
    assert [(p["tar"], p["achieved_far"]) for p in on_their_scores.values()] == \
        [(p["tar"], p["achieved_far"]) for p in exact.values()], mode_name(mode)
    return {"mode": mode_name(mode), "template_diff": template_diff, "score_diff": score_diff,
            "nearest": {far_key(f): nearest[far_key(f)] for f in FARS}, "exact": exact}


def report(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    for row in rows:
        print(f"  {row['mode']}: max |template feature diff| {row['template_diff']:.2e}, max |score diff| "
              f"{row['score_diff']:.2e}")
        for key in row["exact"]:
            e, n = row["exact"][key], row["nearest"][key]
            exact = "-" if e["tar"] is None else f"{100 * e['tar']:.2f}% (FAR {e['achieved_far']:.2e})"
            print(f"    FAR {key}: exact k-th impostor {exact}; insightface nearest corner {100 * n['tar']:.2f}% "
                  f"(FPR {n['achieved_far']:.2e})")


def test_patches_are_listed(scripts):
    print("\npatches to run insightface's eval_ijbc.py / onnx_ijbc.py here:")
    for number, patch in enumerate(PATCHES, 1):
        print(f"  {number}. {patch}")
    assert scripts["onnx_ijbc.py"].faceness_code is not None


@pytest.fixture(scope="module")
def small_release(tmp_path_factory):
    """The synthetic release's files (60 subjects x 3 templates, 720 images, 16,110 pairs)."""
    root = tmp_path_factory.mktemp("ijbc_insightface")
    info = write_ijb_release(root, num_subjects=60, templates_per_subject=3, with_1n=False, seed=4)
    return root, np.array([image["subject"] for image in info["images"]])


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_mode_on_a_release_folder_gives_insightfaces_numbers(scripts, small_release, name, request):
    root, subject_I = small_release
    script = scripts[name]
    release = load_release(root)
    theirs_meta = script.read_meta(root)
    faceness = scripts["onnx_ijbc.py"].faceness(root)   # eval_ijbc.py reads them inside get_image_feature
    np.testing.assert_array_equal(faceness, release.detector_scores_I)
    templates, medias, p1, p2, label = theirs_meta
    assert np.array_equal(templates, release.templates_I) and np.array_equal(medias, release.medias_I)
    assert np.array_equal(np.stack([p1, p2], axis=1), release.pairs_P2) and np.array_equal(label, release.labels_P)
    straight, mirrored = synthetic_features(subject_I, seed=5)
    rows = [compare_mode(script, release, straight, mirrored, theirs_meta, faceness, mode) for mode in MODES]
    report(f"{name} on {root.name} ({len(label):,} pairs, {int((label == 0).sum()):,} impostor)", rows)
    # The modes give different numbers: each option changes what is compared, on both sides alike.
    tars = {row["mode"]: row["nearest"]["1e-02"]["tar"] for row in rows}
    assert len(set(tars.values())) > 2 and tars["N1D1F1"] != tars["N0D0F1"]


def large_release(num_subjects: int = 375, templates_per_subject: int = 4, seed: int = 6):
    """An IJB-like set in memory: 1,500 templates of 1 to 3 media of 1 to 3 images, every template pair listed
    (1,124,250 pairs, 1,122,000 impostor: enough for FAR 1e-6 by the exact convention)."""
    rng = np.random.default_rng(seed)
    templates, medias, subjects = [], [], []
    media = 0
    for subject in range(num_subjects):
        for j in range(templates_per_subject):
            template = subject * templates_per_subject + j + 1
            for _ in range(int(rng.integers(1, 4))):
                media += 1
                count = int(rng.integers(1, 4))
                templates += [template] * count
                medias += [media] * count
                subjects += [subject] * count
    ids = np.arange(1, num_subjects * templates_per_subject + 1)
    first, second = np.triu_indices(ids.size, k=1)
    pairs = np.stack([ids[first], ids[second]], axis=1)
    labels = ((pairs[:, 0] - 1) // templates_per_subject == (pairs[:, 1] - 1) // templates_per_subject)
    num_images = len(templates)
    release = IJBRelease(root=Path("in-memory"), prefix="ijbc", image_names=[f"{i}.jpg" for i in range(num_images)],
                         templates_I=np.array(templates, dtype=np.int64), medias_I=np.array(medias, dtype=np.int64),
                         landmarks_I52=np.zeros((num_images, 5, 2), np.float32),
                         detector_scores_I=rng.uniform(0.5, 1.0, num_images).astype(np.float32),
                         pairs_P2=pairs.astype(np.int64), labels_P=labels.astype(np.int8))
    return release, np.array(subjects)


def test_a_million_impostor_pairs_every_far_from_1e_6_in_insightfaces_mode(scripts):
    mode = MODES[0]   # N1D1F1, their default (every mode runs on the release folder above)
    started = time.perf_counter()
    release, subject_I = large_release()
    straight, mirrored = synthetic_features(subject_I, seed=7, noise=1.6)
    theirs_meta = (release.templates_I, release.medias_I, release.pairs_P2[:, 0], release.pairs_P2[:, 1],
                   release.labels_P.astype(np.int64))
    row = compare_mode(scripts["eval_ijbc.py"], release, straight, mirrored, theirs_meta,
                       release.detector_scores_I, mode)
    assert all(point["tar"] is not None for point in row["exact"].values())   # >= 1M impostors: even 1e-6
    report(f"eval_ijbc.py, {len(release.labels_P):,} pairs in memory ({time.perf_counter() - started:.1f} s)", [row])


def test_the_benchmark_reports_both_conventions(small_release):
    root, subject_I = small_release
    straight, mirrored = synthetic_features(subject_I, seed=5)
    benchmark = IJBBenchmark("ijbc", root)
    result = benchmark.score(straight + mirrored, np.zeros(len(straight), np.int8))
    verification = result["verification"]
    assert set(verification["tar_at_far_insightface"]) == set(verification["tar_at_far"]) == {
        far_key(f) for f in FARS}
    lines = IJBBenchmark.summary_lines("ijbc", result)
    assert lines[1].startswith("ijbc (IJB-C 1:1) TAR% at FAR by insightface's eval_ijbc.py convention (nearest "
                               "ROC corner) 1e-06: ")
