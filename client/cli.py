"""``python -m client``: enrol folders or images, query an image (print the matches, or save them with their heatmap
overlays), compare two images, delete an item, erase a person. A thin layer over ``ReIDClient``. The URL and key
come from ``--url`` / ``--api-key`` or the environment (``REID_URL``, ``REID_API_KEY``). Every failure, the
server's refusals and an unreachable server alike, is one line on stderr and exit status 1."""

import argparse
import base64
import json
import os
import re
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import httpx
from tqdm import tqdm

from client.api import DEFAULT_URL, ReIDClient
from client.types import QueryResult, ReIDError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")


def market_ids(path: Path) -> Tuple[Optional[str], Optional[str]]:
    """(person id, camera id) from a Market-1501 file name, ``0042_c3s1_...`` -> ("0042", "c3"); else (None, None).
    The person id is kept as written, as curl and the web page send it: ``0042`` and ``42`` are two ids."""
    found = MARKET_NAME.match(path.name)
    return (found.group(1), f"c{found.group(2)}") if found else (None, None)


def enrolment_images(paths: List[Path]) -> List[Path]:
    """The images of ``paths`` in their order: a folder's by name, a file as given (the server accepts or
    refuses it)."""
    images = [
        image
        for path in paths
        for image in (
            sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
        )
    ]
    if not images:
        raise SystemExit(f"error: no images in {', '.join(map(str, paths))} ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def enroll_images(
    reid: ReIDClient, paths: List[Path], batch: int, market_names: bool, person_id=None, camera_id=None
) -> int:
    """Enrol the images of ``paths`` (folders or image files) in batches (each all or nothing); returns how many
    were enrolled."""
    images = enrolment_images(paths)
    if market_names and any(market_ids(p)[0] is None for p in images):
        raise SystemExit(
            f"--market-names: {next(p.name for p in images if market_ids(p)[0] is None)} is not PPPP_cC..."
        )
    done = 0
    for start in tqdm(range(0, len(images), batch), desc="enrol", unit="batch"):
        chunk = images[start : start + batch]
        ids = [market_ids(p) for p in chunk] if market_names else [(person_id, camera_id)] * len(chunk)
        persons, cameras = [i for i, _ in ids], [c for _, c in ids]
        done += len(reid.enroll(chunk, persons if all(persons) else None, cameras if all(cameras) else None))
    return done


def save_result(result: QueryResult, folder: Path) -> None:
    """result.json (the answer without its base64 images) and one PNG per overlay: query.png, match01_<id>.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    if result.query_heatmap:
        (folder / "query.png").write_bytes(base64.b64decode(result.query_heatmap["overlay_png"]))
    for match in result.matches:
        if match.heatmap:
            (folder / f"match{match.rank:02d}_{match.id}.png").write_bytes(
                base64.b64decode(match.heatmap["overlay_png"])
            )
    (folder / "result.json").write_text(json.dumps(strip_images(result.raw), indent=2))


def strip_images(value):
    if isinstance(value, dict):
        return {k: strip_images(v) for k, v in value.items() if not k.endswith("_png")}
    if isinstance(value, list):
        return [strip_images(v) for v in value]
    return value


def print_result(result: QueryResult) -> None:
    print(f"{'rank':>4}  {'id':>8}  {'score':>7}  person      camera")
    for m in result.matches:
        print(f"{m.rank:>4}  {m.id:>8}  {m.score:7.4f}  {str(m.person_id or '-'):10s}  {m.camera_id or '-'}")
    print(f"gallery {result.gallery_size} items, {result.timing_ms.get('total', 0):.0f} ms")


def print_verification(reid: ReIDClient, image_a: Path, image_b: Path) -> None:
    """The two images' score, and the model's answer where it has a same-person threshold, with where it came from."""
    result = reid.verify(image_a, image_b)
    print(f"score {result.score:.4f}")
    if result.same_person is None:
        print("same person: no threshold (the model is not calibrated and REID_VERIFY_THRESHOLD is unset)")
        return
    where = result.calibration.get("calibrated_on") if result.threshold_source == "model" else "REID_VERIFY_THRESHOLD"
    print(
        f"same person: {'yes' if result.same_person else 'no'} at threshold {result.threshold:.4f} (from {where}; "
        "a threshold set on other cameras is a guide on yours, not a verdict)"
    )


def run_query(reid: ReIDClient, args) -> QueryResult:
    """One image's query, or a track's when several images are given."""
    options = dict(
        exclude_camera_id=args.exclude_camera_id,
        camera_id=args.camera_id,
        heatmaps=not args.no_heatmaps,
        overlays=args.save is not None,  # the PNGs --save writes; else the grids alone
        rerank=args.rerank,
        group_by="person" if args.group_by_person else None,
    )
    if len(args.images) == 1:
        return reid.query(args.images[0], args.top_k, **options)
    return reid.query_track(args.images, args.top_k, args.aggregate, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description="Enrol and query a re-ID service.")
    parser.add_argument("--url", default=os.environ.get("REID_URL", DEFAULT_URL), help="the service (env REID_URL)")
    parser.add_argument("--api-key", default=os.environ.get("REID_API_KEY"), help="X-API-Key (env REID_API_KEY)")
    commands = parser.add_subparsers(dest="command", required=True)
    enrol = commands.add_parser("enrol", help="enrol every image of folders, or image files")
    enrol.add_argument("paths", type=Path, nargs="+", metavar="FOLDER_OR_IMAGE")
    enrol.add_argument(
        "--batch", type=int, default=32, help="images per request (at most the server's REID_MAX_IMAGES_PER_REQUEST)"
    )
    enrol.add_argument(
        "--market-names", action="store_true", help="person and camera ids from Market-1501 file names (0042_c3...)"
    )
    enrol.add_argument("--person-id", help="one person id for every image")
    enrol.add_argument("--camera-id", help="one camera id for every image")
    query = commands.add_parser("query", help="query with one image, or with several images of one person (a track)")
    query.add_argument("images", type=Path, nargs="+", help="one image, or a track's images")
    query.add_argument(
        "--aggregate",
        choices=("mean", "best"),
        default="mean",
        help="a track: the mean of its embeddings, or each gallery item's best score over its images",
    )
    query.add_argument("--group-by-person", action="store_true", help="at most one match per known person, the best")
    query.add_argument("--top-k", type=int, default=10)
    query.add_argument("--exclude-camera-id")
    query.add_argument("--camera-id")
    query.add_argument("--no-heatmaps", action="store_true")
    query.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking of a shortlist")
    query.add_argument("--save", type=Path, help="write result.json and the overlays (PNG) into this folder")
    verify = commands.add_parser(
        "verify", help="the score of two images, and same person or not where the model has a threshold"
    )
    verify.add_argument("image_a", type=Path)
    verify.add_argument("image_b", type=Path)
    delete = commands.add_parser("delete", help="delete an item")
    delete.add_argument("item_id", type=int)
    erase = commands.add_parser("erase-person", help="erase every item of a person")
    erase.add_argument("person_id")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        with ReIDClient(args.url, api_key=args.api_key) as reid:
            if args.command == "enrol":
                count = enroll_images(reid, args.paths, args.batch, args.market_names, args.person_id, args.camera_id)
                print(f"enrolled {count} images from {', '.join(map(str, args.paths))}")
            elif args.command == "query":
                result = run_query(reid, args)
                print_result(result)
                if args.save:
                    save_result(result, args.save)
            elif args.command == "verify":
                print_verification(reid, args.image_a, args.image_b)
            elif args.command == "erase-person":
                print(f"erased {reid.erase_person(args.person_id)} items of person {args.person_id}")
            else:
                reid.delete(args.item_id)
    except ReIDError as error:
        sys.exit(f"error: {error}")
    except httpx.HTTPError as error:  # no server there, a refused or broken connection, a malformed URL
        sys.exit(f"error: cannot reach {args.url}: {error}")
    except OSError as error:  # an image or folder that cannot be read
        sys.exit(f"error: {error}")
