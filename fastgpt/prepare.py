"""``python -m fastgpt.prepare SOURCE... --out DIR``: a corpus too big for memory, as token shards.

Streams the sources (``.txt``/``.md`` files, one document each; ``.jsonl``, one document per line;
each optionally ``.gz``; ``.parquet``, one document per row; directories searched recursively; glob patterns), tokenizes them in
``--workers`` processes and writes uint16 shards plus ``meta.json`` to ``--out``, for
``python train.py --dataset DIR``. The format, the train/val split, the rule for cutting long
documents and what an interruption leaves are described in :mod:`fastgpt.data.streaming`.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time

from fastgpt.data.streaming import prepare_corpus
from fastgpt_kernels import _processes


def build_parser() -> argparse.ArgumentParser:
    """The command's options; their defaults are :func:`prepare_corpus`'s."""
    defaults = {name: p.default for name, p in inspect.signature(prepare_corpus).parameters.items()}
    parser = argparse.ArgumentParser(prog="python -m fastgpt.prepare",
                                     description="Tokenize a corpus too big for memory into uint16 shards and "
                                                 "meta.json, for python train.py --dataset DIR.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="a .txt, .md or .jsonl file (optionally .gz), a .parquet file, a directory (searched recursively) "
                             "or a glob pattern (quote it)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory; an earlier corpus there is replaced")
    parser.add_argument("--tokenizer", choices=["gpt2", "char"], default=defaults["tokenizer"],
                        help="GPT-2's BPE, or one token per character of the corpus")
    parser.add_argument("--workers", type=int, default=defaults["workers"],
                        help="tokenizing processes (1: the main process)")
    parser.add_argument("--text_field", "--text-field", default=defaults["text_field"],
                        help="the JSONL field, or the Parquet column, that holds a document's text")
    parser.add_argument("--val_fraction", "--val-fraction", type=float, default=defaults["val_fraction"],
                        help="expected fraction of documents in the val split (decided per document by a hash)")
    parser.add_argument("--shard_tokens", "--shard-tokens", type=int, default=defaults["shard_tokens"],
                        help="tokens per shard file (2 bytes each)")
    return parser


def main(argv=None) -> int:
    """Entry point of ``python -m fastgpt.prepare``: returns the exit status."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        with _processes.stop_on_signals():  # SIGTERM and SIGHUP stop the workers as Ctrl-C does
            meta = prepare_corpus(args.sources, args.out, tokenizer=args.tokenizer, workers=args.workers,
                                  text_field=args.text_field, val_fraction=args.val_fraction,
                                  shard_tokens=args.shard_tokens)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted{f' ({exc})' if str(exc) else ''}: {args.out} holds no meta.json, so it is not a "
              "corpus yet; run the same command again (it starts clean)", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    seconds = time.perf_counter() - start
    disk_mb = sum(s["bytes"] for s in meta["sources"]) / 1e6
    for split, entry in meta["splits"].items():
        print(f"{split}: {entry['documents']:,} documents, {entry['tokens']:,} tokens in {len(entry['shards'])} "
              f"shard(s)")
    print(f"{len(meta['sources'])} file(s), {disk_mb:,.1f} MB in {seconds:.1f} s: {disk_mb / seconds:.1f} MB/s "
          f"with {args.workers} worker(s); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
