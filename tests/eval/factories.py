# Synthetic benchmark data for the evaluation tests: IJB release layout, .bin sets, identity folders, models.
import io
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from toolkit.eval.align import ARCFACE_TEMPLATE_112

CROP_W, CROP_H = 72, 88  # loose crops, larger than the aligned 112 x 112 is not needed for a test


def subject_colour(subject: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + subject)
    return rng.integers(30, 226, size=3)


def face_crop(subject: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(H x W x 3 uint8 crop, 5 x 2 landmarks inside it): the face is a subject-coloured patch around the
    landmarks, which are the template shrunk, shifted and rotated a little."""
    angle = rng.uniform(-0.2, 0.2)
    scale = rng.uniform(0.45, 0.55)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centred = (ARCFACE_TEMPLATE_112 - ARCFACE_TEMPLATE_112.mean(0)) * scale @ rot.T
    landmarks = centred + np.array([CROP_W / 2, CROP_H / 2]) + rng.uniform(-3, 3, size=2)
    image = rng.integers(0, 40, size=(CROP_H, CROP_W, 3)).astype(np.uint8)
    x0, y0 = np.floor(landmarks.min(0)).astype(int) - 8
    x1, y1 = np.ceil(landmarks.max(0)).astype(int) + 8
    image[max(y0, 0):y1, max(x0, 0):x1] = np.clip(subject_colour(subject) + rng.integers(-10, 10, size=3), 0, 255)
    return image, landmarks


def write_ijb_release(root: Path, *, prefix: str = "ijbc", num_subjects: int = 12, templates_per_subject: int = 3,
                      media_per_template: int = 2, images_per_media: int = 2, seed: int = 0,
                      with_1n: bool = True) -> dict:
    """An IJB-layout folder; returns {"images": [...], "template_subject": {...}} for the tests' references.
    Templates t = subject * templates_per_subject + j + 1; every template pair is listed (1 = same subject)."""
    rng = np.random.default_rng(seed)
    (root / "loose_crop").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    tid_lines, lmk_lines, images = [], [], []
    template_subject = {}
    media_id = 100
    image_id = 1
    for subject in range(num_subjects):
        for j in range(templates_per_subject):
            template = subject * templates_per_subject + j + 1
            template_subject[template] = subject
            for _ in range(media_per_template):
                media_id += 1
                for _ in range(images_per_media):
                    name = f"{image_id}.jpg"
                    image, landmarks = face_crop(subject, rng)
                    Image.fromarray(image).save(root / "loose_crop" / name, quality=95)
                    score = rng.uniform(0.5, 1.0)
                    tid_lines.append(f"{name} {template} {media_id}")
                    lmk_lines.append(name + " " + " ".join(f"{v:.3f}" for v in landmarks.ravel()) + f" {score:.4f}")
                    images.append({"name": name, "template": template, "media": media_id, "subject": subject})
                    image_id += 1
    templates = sorted(template_subject)
    pair_lines = [f"{a} {b} {int(template_subject[a] == template_subject[b])}"
                  for i, a in enumerate(templates) for b in templates[i + 1:]]
    (root / "meta" / f"{prefix}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (root / "meta" / f"{prefix}_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    (root / "meta" / f"{prefix}_template_pair_label.txt").write_text("\n".join(pair_lines) + "\n")
    if with_1n:
        half = num_subjects // 2
        g1 = [t for t in templates if t % templates_per_subject == 1 and template_subject[t] < half]
        g2 = [t for t in templates if t % templates_per_subject == 1 and template_subject[t] >= half]
        probes = [t for t in templates if t % templates_per_subject != 1]
        for filename, chosen in ((f"{prefix}_1N_gallery_G1.csv", g1), (f"{prefix}_1N_gallery_G2.csv", g2),
                                 (f"{prefix}_1N_probe_mixed.csv", probes)):
            rows = ["TEMPLATE_ID,SUBJECT_ID,FILENAME"] + [f"{t},{template_subject[t]},img/{t}.jpg" for t in chosen]
            (root / "meta" / filename).write_text("\n".join(rows) + "\n")
    return {"images": images, "template_subject": template_subject}


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_bin(path: Path, *, num_pairs: int = 40, size: int = 32, seed: int = 0) -> None:
    """An insightface-style .bin: pairs of subject-coloured faces, half genuine."""
    rng = np.random.default_rng(seed)
    images, is_same = [], []
    for p in range(num_pairs):
        same = p % 2 == 0
        a = int(rng.integers(0, 50))
        b = a if same else (a + 1 + int(rng.integers(0, 48))) % 50
        for subject in (a, b):
            image = np.clip(subject_colour(subject) + rng.integers(-20, 20, size=(size, size, 3)), 0, 255)
            images.append(jpeg_bytes(image.astype(np.uint8)))
        is_same.append(same)
    path.write_bytes(pickle.dumps((images, is_same), protocol=2))


def write_identity_folder(root: Path, *, num_identities: int = 6, per_identity: int = 4, size: int = 32,
                          seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for identity in range(num_identities):
        folder = root / f"id{identity:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_identity):
            image = np.clip(subject_colour(identity) + rng.integers(-20, 20, size=(size, size, 3)), 0, 255)
            Image.fromarray(image.astype(np.uint8)).save(folder / f"{k}.png")


class ColourNet(torch.nn.Module):
    """A tiny deterministic 'backbone': channel means and a few pooled cells through a fixed projection.
    Colour-coded synthetic subjects separate well with it, which is all the plumbing tests need."""

    def __init__(self, embedding_size: int = 16):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.proj = torch.nn.Linear(12, embedding_size, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(embedding_size, 12, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return self.proj(self.pool(x).flatten(1))


def export_onnx(model: torch.nn.Module, path: Path, image_size: int) -> Path:
    model.eval()
    example = torch.zeros(2, 3, image_size, image_size)
    torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["embedding"],
                      dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}})
    return path


def run_cli(*argv) -> int:
    """launch/evaluate.py's main in this process: no loader workers, no progress bars, batches of 64."""
    from launch.evaluate import main

    return main([*argv, "--num-workers", "0", "--no-progress", "--batch-size", "64"])


def one_error_line(capsys) -> str:
    """The command's stderr is exactly one `error:` line and no traceback; returns it."""
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return err[0]
