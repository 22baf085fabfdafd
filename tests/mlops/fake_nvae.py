#!/usr/bin/env python3
"""A stand-in `nvae` for the DVC wiring tests: writes each command's outputs in milliseconds.

Each output's bytes are a hash of the command line and the bytes of its inputs, so an output changes exactly when
the real one would (its parameters or upstream outputs changed). Every call is appended to $FAKE_NVAE_LOG.
"""

import hashlib
import json
import os
import sys
from pathlib import Path


def digest(argv: list[str], inputs: list[str]) -> bytes:
    h = hashlib.sha256(" ".join(argv).encode())
    for path in inputs:
        p = Path(path)
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                h.update(f.read_bytes())
    return h.hexdigest().encode()


def opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def write(path: str, data: bytes) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)


def write_onnx(path: str | Path, doc: str, checkpoint: str | Path | None) -> None:
    """A small real ONNX file (an Identity) whose metadata says it was exported from `checkpoint`, as `nvae
    export-onnx` records it (none when None); `doc` (its doc string) varies its bytes."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["z"], ["images"])], "decoder",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    proto = helper.make_model(graph, doc_string=doc)
    if checkpoint is not None:
        sha = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
        helper.set_model_props(proto, {"nvae.checkpoint_sha256": sha})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))


def main(argv: list[str]) -> int:
    command = argv[0]
    with open(os.environ["FAKE_NVAE_LOG"], "a") as log:
        log.write(" ".join(argv) + "\n")
    if command == "prepare":
        # Fold the raw source in through the command line only (its 30 MB are hashed by DVC, not here).
        write(f"{opt(argv, '--out')}/manifest.json", digest(argv, []))
    elif command == "train":
        out, d = opt(argv, "--out"), digest(argv, [opt(argv, "--data")])
        write(f"{out}/checkpoint.pt", d)
        for name in (
            "train_summary.json",
            "train_metrics.jsonl",
            "eval_metrics.jsonl",
            "samples/step-00000001.png",
        ):
            write(f"{out}/{name}", d)
        # DVCLive's layout: a summary of the last values, one TSV per metric, the sample grids
        loss = 1.5 + int(d[:4], 16) / 65536  # differs whenever the command line or the data do
        summary = {
            "train": {"loss": loss, "nelbo_bpd": 3.9, "kl": 40.0},
            "step": 1,
            "eval": {"active_fraction": 0.5},
        }
        write(f"{out}/dvclive/metrics.json", json.dumps(summary).encode())
        write(f"{out}/dvclive/plots/metrics/train/loss.tsv", f"step\tloss\n0\t2.0\n1\t{loss}\n".encode())
        write(f"{out}/dvclive/plots/images/samples/step-00000001.png", d)
    elif command == "evaluate":
        d = digest(argv, [opt(argv, "--checkpoint"), opt(argv, "--data")])
        metrics = {"nll_bpd": 3.5, "nelbo_bpd": 3.6, "num_images": 8, "iw_samples": 2, "kl_per_group": [1.0]}
        write(
            opt(argv, "--out"), json.dumps({**metrics, "digest": d.decode()}).encode()
        )  # what publish reads
        write(opt(argv, "--kl-plot"), d)
    elif command == "readjust-bn":
        write(opt(argv, "--out"), digest(argv, [opt(argv, "--checkpoint")]))
    elif command == "export-onnx":  # real ONNX bytes: `nvae model publish` reads its metadata
        checkpoint = opt(argv, "--checkpoint")
        write_onnx(opt(argv, "--out"), digest(argv, [checkpoint]).decode(), checkpoint)
    elif command == "sample":
        write(f"{opt(argv, '--out')}/samples.npz", digest(argv, [opt(argv, "--onnx")]))
    elif command == "fid":
        d = digest(argv, [opt(argv, "--onnx"), opt(argv, "--data")])
        n = int(opt(argv, "--n"))
        metrics = {"fid": 10 + int(d[:4], 16) / 65536 if n else None, "fid_samples": n}
        write(opt(argv, "--out"), json.dumps(metrics).encode())
    elif command == "model" and argv[1] == "publish":
        inputs = [opt(argv, f) for f in ("--onnx", "--checkpoint", "--metrics", "--data-manifest")]
        write(opt(argv, "--manifest-out"), digest(argv, inputs))
    else:
        print(f"fake nvae: unknown command {command}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
