"""Convert a raw CALVIN split to an LMDB in GR1-Training's key schema (data/convert.py does the work).

    python calvin2lmdb.py --input_dir task_ABC_D --output_dir calvin_lmdb [--workers N] [--config F] [key=value ...]

Uses every core, commits whole segments in bounded transactions and is resumable: re-run the same command after an
interruption and it finishes with exactly the content of an uninterrupted run. No GPU is needed; the optional
inst_emb keys (never read by training) are written only when the CLIP weights of clip_ckpt exist.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import numpy as np

from config import Config, ConfigError, add_config_arguments, config_from_args, expand_path
from processes import INTERRUPTED_EXIT_CODE, sigterm_as_keyboard_interrupt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Transfer CALVIN dataset to lmdb format.")
    parser.add_argument("--input_dir", default="./ABC_D", help="CALVIN split root holding training/ and validation/")
    parser.add_argument("--output_dir", default="./calvin_lmdb", help="LMDB directory to write (created if absent)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes that load and JPEG-encode frames (default: all cores; 1 = no pool)")
    parser.add_argument("--commit_every", type=int, default=32,
                        help="segments per write transaction (bounds memory and the work lost on a kill)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing LMDB in --output_dir instead of refusing / resuming")
    parser.add_argument("--map_size_gb", type=float, default=1024, help="LMDB map size (a sparse upper bound)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.workers < 1 or args.commit_every < 1:
        parser.error("--workers and --commit_every must be >= 1")
    if not args.map_size_gb > 0:
        parser.error("--map_size_gb must be > 0")
    return args


def text_embedder(cfg: Config) -> Callable[[np.ndarray], np.ndarray] | None:
    """CLIP's text tower for inst_emb when its weights exist, else None (GR1 never reads inst_emb)."""
    from data.convert import clip_text_embedder
    path = expand_path(cfg.clip_ckpt)
    if not path or not os.path.isfile(path):
        print(f"inst_emb not written: no CLIP weights at clip_ckpt={cfg.clip_ckpt!r} (training never reads it)")
        return None
    print(f"inst_emb: CLIP text embeddings from {path}")
    return clip_text_embedder(cfg)


def main(args: argparse.Namespace) -> None:
    from data.calvin_format import CalvinFormatError
    from data.convert import ConversionError, convert, make_plan
    from models.files import CheckpointError
    sigterm_as_keyboard_interrupt()  # SIGTERM stops like Ctrl-C: committed segments kept, exit code 130
    try:
        cfg = config_from_args(args)
        make_plan(args.input_dir)  # input errors first (before CLIP weights are loaded)
        stats = convert(args.input_dir, args.output_dir, workers=args.workers, commit_every=args.commit_every,
                        overwrite=args.overwrite, embedder=text_embedder(cfg), map_size=int(args.map_size_gb * 2**30),
                        progress=not args.no_progress)
    except (CalvinFormatError, ConversionError, ConfigError, CheckpointError, FileNotFoundError) as e:
        sys.exit(f"calvin2lmdb: error: {e}")
    except KeyboardInterrupt:
        print("calvin2lmdb: interrupted; committed segments are kept: run the same command again to continue",
              file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    resumed = f", resumed at segment {stats.resumed_from_segment}" if stats.resumed_from_segment else ""
    print(f"wrote {stats.frames} frames in {stats.seconds:.1f} s ({stats.frames_per_second:.1f} frames/s, "
          f"{args.workers} workers{resumed}) to {args.output_dir}")


if __name__ == "__main__":
    main(parse_args())
