# Data conversion entry point: insightface RecordIO, image folders or WebFace42M -> shuffled WebDataset shards.
"""Writes shards + manifest.json for `data.backend: webdataset` (and `dali`).

    python launch/prepare_data.py recordio --rec DIR/train.rec --out OUT [options]
    python launch/prepare_data.py folder --root DIR --out OUT [options]          # DIR/IDENTITY/IMAGE
    python launch/prepare_data.py webface --root DIR --subset webface4m --out OUT  # DIR/0..9/IDENTITY/IMAGE
    python launch/prepare_data.py verify --manifest OUT/manifest.json              # recheck sizes and checksums

Options: --shard-size (images per shard; default 2000, fewer for small sets so that they make about 64
shards), --group-size (images of one identity kept together, default 2; UniMoCo's data.samples_per_label
must divide it), --image-size (112), --seed, --workers (processes), --overwrite (start over in an OUT that
holds another conversion), --no-progress.
A rerun with the same arguments skips finished shards and rewrites interrupted ones. User errors print
one line `error: ...` on stderr and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Running `python launch/prepare_data.py` from a checkout works even before `pip install -e .` (in a wheel this file is
# toolkit/launch/prepare_data.py and the path is left alone).
if (Path(__file__).resolve().parent.parent / "toolkit" / "__init__.py").is_file():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.command_line import CommandParser  # noqa: E402



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(description="Convert face data sets to shuffled WebDataset shards.")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--out", required=True, type=Path, help="output folder for shards and manifest.json")
        sub.add_argument("--shard-size", type=int, default=None,
                         help="images per shard (default: 2000, or fewer for a set under 128,000 images so that it "
                              "still makes about 64 shards: every rank x loader worker reads shards of its own)")
        sub.add_argument("--group-size", type=int, default=2,
                         help="images of one identity stored together (default 2; 1 = none)")
        sub.add_argument("--image-size", type=int, default=112, help="stored face size (default 112)")
        sub.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default 0)")
        sub.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                         help="processes writing shards (default: CPU count - 1)")
        sub.add_argument("--overwrite", action="store_true", help="start over if OUT holds another conversion")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")
        sub.add_argument("--debug", action="store_true", help="show tracebacks for user errors")

    recordio = commands.add_parser("recordio", help="insightface train.rec + train.idx (MS1MV3, Glint360K, ...)")
    recordio.add_argument("--rec", required=True, type=Path, help="train.rec")
    recordio.add_argument("--idx", type=Path, default=None, help="train.idx (default: next to train.rec)")
    add_common(recordio)
    folder = commands.add_parser("folder", help="one sub-folder of images per identity")
    folder.add_argument("--root", required=True, type=Path, help="folder holding IDENTITY/IMAGE files")
    add_common(folder)
    webface = commands.add_parser("webface", help="WebFace42M layout ROOT/0..9/IDENTITY/IMAGE")
    webface.add_argument("--root", required=True, type=Path, help="folder holding the part folders 0..9")
    choice = webface.add_mutually_exclusive_group(required=True)
    choice.add_argument("--subset", choices=["webface4m", "webface12m", "webface42m"],
                        help="webface4m = part 0, webface12m = parts 0-2, webface42m = parts 0-9")
    choice.add_argument("--parts", help="comma-separated part numbers, e.g. 0,1,2")
    add_common(webface)
    verify = commands.add_parser("verify", help="check the shards of a manifest: presence, sizes, checksums")
    verify.add_argument("--manifest", required=True, type=Path, help="the manifest.json written by a conversion")
    verify.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from toolkit.data import converters
    from toolkit.errors import FaceCLError

    if args.command == "verify":
        return verify_manifest(args.manifest)
    if args.command == "recordio":
        source = converters.RecordIOSource(args.rec, args.idx)
    elif args.command == "folder":
        source = converters.ImageFolderSource(args.root)
    else:
        if args.subset:
            parts = converters.webface_parts(args.subset)
        else:
            try:
                parts = tuple(int(p) for p in args.parts.split(","))
            except ValueError:
                raise FaceCLError(f"--parts must be comma-separated integers, got {args.parts!r}") from None
        source = converters.WebFaceSource(args.root, parts)
    settings = converters.ConvertSettings(shard_size=args.shard_size, group_size=args.group_size,
                                          image_size=args.image_size, seed=args.seed, num_workers=args.workers)
    manifest = converters.convert(source, args.out, settings, overwrite=args.overwrite,
                                  progress=not args.no_progress)
    print(f"manifest: {args.out / 'manifest.json'} ({manifest.num_samples} images, {manifest.num_classes} classes, "
          f"{len(manifest.shards)} shards)")
    return 0


def verify_manifest(path: Path) -> int:
    from toolkit.data.shards import dali_index_path, file_sha256, load_manifest
    from toolkit.errors import FaceCLError

    try:
        manifest = load_manifest(path)
    except (FileNotFoundError, ValueError) as exc:
        raise FaceCLError(str(exc)) from None
    problems = []
    for entry in manifest.shards:
        shard = manifest.shard_path(entry)
        if not shard.is_file():
            problems.append(f"{entry.name}: missing")
        elif shard.stat().st_size != entry.size_bytes:
            problems.append(f"{entry.name}: {shard.stat().st_size} bytes, manifest says {entry.size_bytes}")
        elif file_sha256(shard) != entry.sha256:
            problems.append(f"{entry.name}: checksum differs from the manifest")
        if not dali_index_path(shard).is_file():
            problems.append(f"{dali_index_path(shard).name}: DALI index missing")
    for line in problems:
        print(line)
    print(f"{len(manifest.shards)} shards checked, {len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    from toolkit.errors import command_main

    return command_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
