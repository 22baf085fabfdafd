#!/usr/bin/env bash
# Check the images before you push them: build the cpu image, then run the whole compiled pipeline with
# kfp.local's docker runner -- every step in its image, as UID 10001, with the compiled executor command and
# no package index -- reading Fashion-MNIST from an S3-API store (the real SeaweedFS server on loopback, with
# the SeaweedFS overlay's own identities: the bucket job's root key, the pipeline's key for the run, the
# sampler's read-only key for the model pull), and read the metrics and the sample grid back from the pipeline
# root.
# Installs what it needs (podman, runc, mmdebstrap from Debian; the project venv). About 10 minutes here.
# Usage: bash scripts/container_check.sh [WORKDIR]        (default: runs/container-check)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(realpath -m "${1:-runs/container-check}")
mkdir -p "$work"
bash scripts/setup_env.sh
py=$repo/.venv/bin/python
t0=$(date +%s)
stamp() { echo "container-check: $* (+$(( $(date +%s) - t0 )) s)"; }

# --- podman -------------------------------------------------------------------------------------------------
if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v runc >/dev/null; then
  stamp "installing podman, runc, mmdebstrap (Debian)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap >/dev/null
fi
# The two settings this kind of machine needs, in a file of our own (CONTAINERS_CONF), not the system's:
# the sandbox refuses to raise RLIMIT_NOFILE/NPROC (podman's default ulimits fail every container), and
# crun stops with "cgroups in hybrid mode not supported" where runc works.
cat > "$work/containers.conf" <<'EOF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$work/containers.conf

# --- the image ----------------------------------------------------------------------------------------------
# No container registry is reachable here: the base is made from Debian packages. torch: PyTorch's CPU index is
# unreachable too, so a CPU build lying in a local find-links folder when one is there with its +cpu torchvision
# (a 2 GB image), else PyPI's CUDA build (a 7 GB image that needs about 25 GiB free to build). The FID steps
# import torchvision, and PyPI's torchvision does not load beside a +cpu torch.
registry=localhost/nvae tag=check
torch_args=(--torch-index pypi) need_gib=25
links=$(python3 -m pip config get global.find-links 2>/dev/null || true)
for dir in $links; do
  wheel=$(ls "$dir"/torch-*+cpu-cp311-*.whl 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$wheel" ] || continue
  version=$(basename "$wheel" | cut -d- -f2)
  minor=$(cut -d. -f2 <<<"$version")
  if ls $(for d in $links; do echo "$d/torchvision-0.$((minor + 15)).*+cpu-cp311-*.whl"; done) >/dev/null 2>&1; then
    torch_args=(--torch-index pypi --torch-version "$version") need_gib=10
  else
    echo "container-check: $(basename "$wheel") has no +cpu torchvision beside it; PyPI's CUDA torch instead" >&2
  fi
  break
done
storage=$(podman info --format '{{.Store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers)
mkdir -p "$storage"
# Images of an earlier check (and what a failed build left untagged) first: they are rebuilt anyway.
podman rmi -f "$registry/nvae-cpu:$tag" "$registry/nvae-gpu:$tag" >/dev/null 2>&1 || true
podman image prune -f >/dev/null 2>&1 || true
free_gib=$(df -Pk "$storage" | awk 'NR==2 {print int($4 / 1048576)}')
if [ "$free_gib" -lt "$need_gib" ]; then
  echo "container-check: only $free_gib GiB free under $storage; building the image needs about $need_gib GiB" >&2
  exit 1
fi
stamp "building the cpu image (torch: ${torch_args[*]}; $free_gib GiB free)"
bash scripts/images.sh --registry "$registry" --tag "$tag" --debian-base "${torch_args[@]}"
# The train step runs in the gpu image. This machine has no GPU: the cpu image stands in under the gpu name
# (the train step then trains on the CPU, as it does in the cpu image; scripts/images.sh --gpu builds the real one).
podman tag "$registry/nvae-cpu:$tag" "$registry/nvae-gpu:$tag"
# The cpu image builds the training step's compiled CPU kernels (g++ and Python's headers, as its user 10001).
podman run --rm "$registry/nvae-cpu:$tag" python -c "
import torch
from model import kernels
kernels.MIN_NUMEL = 0
x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
out = kernels.dw_grad_weight(x, x, 5, 2)
assert out is not None, 'the compiled CPU kernels are off in the cpu image'
ref = torch.ops.aten.convolution_backward(x, x, torch.zeros(8, 1, 5, 5), None, [1, 1], [2, 2], [1, 1], False,
                                          [0, 0], 8, [False, True, False])[1]
torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
print('compiled CPU kernels: built and equal to oneDNN')
"
stamp "image ready, its compiled CPU kernels built"

# --- services: podman's Docker-compatible API, and an S3-API server on loopback ----------------------------
pids=()
# The check's images go when it ends (KEEP_IMAGES=1 keeps them): each run rebuilds them from the sources anyway,
# and a machine that runs the check again and again must not fill its disk.
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # SeaweedFS may not stop on TERM: KILL its process group after a grace period
  if [ -n "${weed_pid:-}" ]; then
    kill -TERM -- "-$weed_pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$weed_pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$weed_pid" 2>/dev/null || true
  fi
  if [ "${KEEP_IMAGES:-0}" != 1 ]; then
    podman rmi -f "$registry/nvae-cpu:$tag" "$registry/nvae-gpu:$tag" >/dev/null 2>&1 || true
    podman image prune -f >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
sock=$work/podman.sock
rm -f "$sock"
podman system service --time=0 "unix://$sock" &
pids+=($!)
export DOCKER_HOST=unix://$sock
# Ports with port + 10000 free too (SeaweedFS serves gRPC there).
read -r master volume filer port < <("$py" - <<'EOF'
import random, socket
found = []
while len(found) < 4:
    p = random.randint(20000, 39999)
    try:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", p)); b.bind(("127.0.0.1", p + 10000))
        if p not in found:
            found.append(p)
    except OSError:
        pass
print(*found)
EOF
)
# The overlay's identities (k8s/overlays/seaweedfs/s3-identities.json) with keys made for this check.
declare -A key
for user in ROOT PIPELINE SAMPLER; do
  key[${user}_ACCESS_KEY]=check-${user,,}-$RANDOM$RANDOM
  key[${user}_SECRET_KEY]=$("$py" -c 'import secrets; print(secrets.token_hex(16))')
done
identities=$(cat k8s/overlays/seaweedfs/s3-identities.json)
for name in "${!key[@]}"; do identities=${identities//"\${NVAE_$name}"/${key[$name]}}; done
case "$identities" in *'${'*) echo "container-check: an identity of the overlay has no key" >&2; exit 1 ;; esac
printf '%s\n' "$identities" >"$work/s3-identities.json"
rm -rf "$work/seaweedfs" && mkdir -p "$work/seaweedfs"
setsid "$repo/.venv/bin/weed" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$work/seaweedfs" \
  -master.port="$master" -volume.port="$volume" -filer.port="$filer" -master.volumeSizeLimitMB=32 -volume.max=0 \
  -metricsPort=0 -s3 -s3.port="$port" -s3.config="$work/s3-identities.json" -s3.port.iceberg=0 -s3.port.lance=0 \
  >"$work/s3.log" 2>&1 &
weed_pid=$!
export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_DEFAULT_REGION=us-east-1
as_user() {  # as_user ROOT|PIPELINE|SAMPLER: that identity's keys in the environment
  export AWS_ACCESS_KEY_ID=${key[${1}_ACCESS_KEY]} AWS_SECRET_ACCESS_KEY=${key[${1}_SECRET_KEY]}
}
"$py" - "$sock" "$AWS_ENDPOINT_URL" <<'EOF'
import os, sys, time, urllib.error, urllib.request
deadline = time.time() + 60
while True:
    try:
        urllib.request.urlopen(sys.argv[2], timeout=1)
    except urllib.error.HTTPError:  # S3 answers (403 without credentials)
        if os.path.exists(sys.argv[1]):
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("container-check: podman service or SeaweedFS did not start")
    time.sleep(0.2)
EOF
stamp "SeaweedFS up on $AWS_ENDPOINT_URL"
as_user ROOT
"$repo/.venv/bin/nvae" store init --bucket nvae   # what the cluster's bucket job runs, with the root key
as_user PIPELINE                                   # the pipeline's pods: read and write in bucket nvae only

# --- the data, uploaded as for a cluster run ---------------------------------------------------------------
"$repo/.venv/bin/nvae" data upload --dataset fashion-mnist --source /usr/share/datasets/fashion-mnist \
  --to s3://nvae/raw/fashion-mnist
stamp "data uploaded"

# --- the pipeline, every step in its image -----------------------------------------------------------------
root=$work/pipeline-root
rm -rf "$root"
"$repo/.venv/bin/nvae" pipeline run --local --runner docker --root "$root" \
  --image-registry "$registry" --image-tag "$tag" \
  --set source=s3://nvae/raw/fashion-mnist --set steps=30 --set iw_samples=5 --set eval_limit=50 \
  --set readjust_iters=20 --set num_samples=16 --set registry=s3://nvae/models/nvae-fmnist \
  | tee "$work/pipeline.log"
stamp "pipeline finished"
# The train step checkpointed into the store under the run's id, where a retried pod would resume.
"$py" - <<'EOF'
import boto3
keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="nvae", Prefix="runs/").get("Contents", [])]
pointers = [k for k in keys if k.endswith("/checkpoints/latest.json")]
assert len(pointers) == 1, keys
print(f"run checkpoints: s3://nvae/{pointers[0]}")
EOF

# --- the registered model: listed, pulled (every file's sha256 checked) and served -------------------------
"$repo/.venv/bin/nvae" model list --registry s3://nvae/models/nvae-fmnist
# The sampler Deployment's init container, as it runs there: the cpu image, UID 10001, a read-only root.
rm -rf "$work/pulled" && mkdir -p "$work/pulled" && chmod 777 "$work/pulled"
as_user SAMPLER                                    # the sampler's init container: read models/ only
podman run --rm --network host --read-only --tmpfs /tmp -v "$work/pulled:/models" -e AWS_ENDPOINT_URL \
  -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_DEFAULT_REGION "$registry/nvae-cpu:$tag" \
  nvae model pull --registry s3://nvae/models/nvae-fmnist --version latest --out /models
"$py" - <<'EOF'
import boto3, botocore.exceptions
s3 = boto3.client("s3")
for bucket, key in (("nvae", "models/nvae-fmnist/intruder"), ("nvae", "raw/intruder")):
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    except botocore.exceptions.ClientError as exc:
        assert exc.response["Error"]["Code"] == "AccessDenied", exc.response["Error"]
    else:
        raise SystemExit(f"container-check: the sampler's key wrote s3://{bucket}/{key}")
print("container-check: the sampler's key reads models/ and writes nowhere")
EOF
"$py" - "$work/pulled" <<'EOF'
import json, socket, subprocess, sys, time
from pathlib import Path

import httpx

pulled = Path(sys.argv[1])
manifest = json.loads((pulled / "manifest.json").read_text())
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen([sys.executable, "-m", "serving", "--onnx", str(pulled / "decoder.onnx"), "--port", str(port)])
try:
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline and server.poll() is None, "the sampler did not start"
        time.sleep(0.3)
    meta = httpx.get(f"http://127.0.0.1:{port}/v2/models/nvae-decoder").json()
    served = meta["parameters"]["registry_version"]
    assert served == f"{manifest['name']}/{manifest['version']}", (served, manifest["version"])
    body = {"inputs": [{"name": "n", "datatype": "INT64", "shape": [1], "data": [4]},
                       {"name": "temperature", "datatype": "FP32", "shape": [1], "data": [0.8]}]}
    r = httpx.post(f"http://127.0.0.1:{port}/v2/models/nvae-decoder/infer", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"][0] == 4, r.text[:300]
    card = manifest["card"]
    print(f"container-check: registry version {served} served (steps {card['steps']}, "
          f"NLL {card['nll_bpd']:.3f}, run {card['run_id']})")
finally:
    server.terminate()
    server.wait(timeout=30)
EOF

# --- results, read back from the pipeline root -------------------------------------------------------------
"$py" - "$root" <<'EOF'
import json, math, sys
from pathlib import Path

from PIL import Image

from pipelines.nvae_pipeline import find_local_outputs

found = find_local_outputs(Path(sys.argv[1]))
metrics = json.loads(Path(found["metrics"]).read_text())
grid = Image.open(found["sample_grid"])
grid.load()
manifest = json.loads((Path(found["run"]) / "prepare" / "data" / "manifest.json").read_text())
objects = manifest["source"]["objects"]
assert manifest["source"]["uri"] == "s3://nvae/raw/fashion-mnist" and objects, manifest["source"]
assert math.isfinite(metrics["nll_bpd"]) and metrics["nll_bpd"] > 0, metrics
for page in ("curves", "kl_report", "reconstructions"):  # the UI's visualisations, each its own artifact
    assert b"data:image/png;base64," in Path(found[page]).read_bytes(), page
# Written inside the containers, by the images' user, not by this (root) process.
owners = {p.relative_to(found["run"]).as_posix(): p.stat().st_uid for p in map(Path, found.values())}
assert set(owners.values()) == {10001}, owners
print(f"container-check: every artifact written by UID 10001 ({len(owners)} checked)")
print(f"container-check: prepare read {len(objects)} objects from {manifest['source']['uri']}")
print(f"container-check: NLL {metrics['nll_bpd']:.3f} bits/dim (K={metrics['iw_samples']}, "
      f"{metrics['num_images']} images), {metrics['active_channels']} active channels")
print(f"container-check: sample grid {found['sample_grid']} ({grid.size[0]}x{grid.size[1]})")
print(f"container-check: onnx {found['onnx']}")
EOF

# --- the same pipeline from an authors' checkpoint in the store: no training --------------------------------
as_user PIPELINE  # the sampler check above switched keys
"$repo/.venv/bin/nvae" store put tests/model/nvlabs s3://nvae/nvlabs/tiny-mnist/
# FID on, in the evaluation image: Inception weights of pytorch-fid's architecture with random values, from the
# store, checked by their SHA-256.
mkdir -p "$work/fid"
inception_sha256=$("$py" -c 'import sys; from inference.fid import write_random_weights; print(write_random_weights(sys.argv[1]))' "$work/fid/inception.pth")
"$repo/.venv/bin/nvae" store put "$work/fid" s3://nvae/fid/
imported=$work/pipeline-root-imported
rm -rf "$imported"
"$repo/.venv/bin/nvae" pipeline run --local --runner docker --root "$imported" \
  --image-registry "$registry" --image-tag "$tag" \
  --set dataset=mnist --set preset=mnist --set source=s3://nvae/raw/fashion-mnist --set prepare_limit=200 \
  --set import_checkpoint=s3://nvae/nvlabs/tiny-mnist/tiny-mnist.pt --set checkpoint_store= \
  --set iw_samples=2 --set eval_limit=20 --set readjust_iters=5 --set num_samples=4 \
  --set fid_samples=8 --set fid_inception=s3://nvae/fid/inception.pth --set fid_inception_sha256="$inception_sha256" \
  | tee "$work/pipeline-imported.log"
"$py" - "$imported" <<'EOF'
import json, sys
from pathlib import Path

from pipelines.nvae_pipeline import find_local_outputs

found = find_local_outputs(Path(sys.argv[1]))
metrics = json.loads(Path(found["metrics"]).read_text())
assert metrics["dataset"] == "mnist" and metrics["num_images"] == 20, metrics
assert "Not trained in this run" in Path(found["curves"]).read_text()
fid = json.loads(Path(found["fid"]).read_text())
assert fid["fid_samples"] == 8 and fid["fid_bn_readjusted"] and fid["fid"] == fid["fid"], fid
print(f"container-check: the authors' checkpoint imported in the train step's image, NLL "
      f"{metrics['nll_bpd']:.3f} bits/dim (K={metrics['iw_samples']}), onnx {found['onnx']}")
print(f"container-check: FID {fid['fid']:.2f} over {fid['fid_samples']} samples in the evaluation image "
      f"(random Inception weights from the store)")
EOF
stamp "pipeline from an authors' checkpoint finished"
stamp "passed"
