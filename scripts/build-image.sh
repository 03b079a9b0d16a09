#!/usr/bin/env bash
# build-image.sh -- a container image for hpcdist jobs from Debian's packages alone (no registry needed).
#
#   bash scripts/build-image.sh /var/tmp/hpcdist-image                 # Charliecloud image (a directory)
#   bash scripts/build-image.sh /var/tmp/hpcdist-bundle --oci          # OCI bundle (rootfs/ + config.json)
#                                                                      # for Slurm's srun --container (crun/runc)
#   bash scripts/build-image.sh DIR --mount /scratch --mount /data     # more mount points
#   bash scripts/build-image.sh BUNDLE --oci --from IMAGE              # an OCI bundle around an image built
#                                                                      # before (hard links, no second debootstrap)
#
# The image is Debian bookworm (minbase, Python 3.11 like the host) with mount points for the folders hpcdist
# binds for this checkout, its Python environment and each --mount (see hpc.container.binds). The training
# environment itself (torch, deepspeed, hpcdist) is bind-mounted from the host at the same paths, so the
# image stays small and the job runs exactly the code the host would; a site that wants it inside the image
# installs the project's wheel there (pip install hpcdist-*.whl[train]) instead.
# Needs root (mmdebstrap), and Debian's package mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[build-image $(date +%T)] $*" >&2; }

out=${1:?usage: build-image.sh DIR [--oci] [--mount /PATH ...]}
shift
oci=0
from=
mounts=()
while [ $# -gt 0 ]; do
    case "$1" in
        --oci) oci=1 ;;
        --from) from="${2:?--from needs an image directory}"; shift ;;
        --mount) mounts+=("${2:?--mount needs a path}"); shift ;;
        *) echo "build-image.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
python=$PWD/.venv/bin/python
[ -x "$python" ] || python=$(command -v python3)
# The folders hpcdist binds for these (hpc.container.binds): each top folder, but under one an image owns (/opt,
# /usr, /var...) the folder itself; the interpreter's environment; and where their links lead.
mapfile -t mounts < <(PYTHONPATH=. "$python" -c 'import os, sys; from hpc import container as c
print(*c.binds(sys.argv[2:], sys.argv[1], c.Container("charliecloud", ""), os.path.realpath), sep="\n")' \
    "$python" "$PWD" /tmp ${mounts[@]+"${mounts[@]}"})
[ ${#mounts[@]} -gt 0 ] || { echo "build-image.sh: $python could not name the mount points (see above)" >&2; exit 2; }

[ ! -e "$out" ] || { echo "build-image.sh: $out exists; remove it or pick another directory" >&2; exit 2; }
command -v mmdebstrap >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap; }
rootfs=$out
[ "$oci" = 0 ] || rootfs=$out/rootfs
mkdir -p "$(dirname "$rootfs")"
if [ -n "$from" ]; then
    [ -f "$from/etc/hpcdist-image" ] || { echo "build-image.sh: $from is not an image build-image.sh made" >&2; exit 2; }
    log "linking the image $from into $rootfs"
    cp -al "$from" "$rootfs"
else
    log "debootstrapping Debian bookworm into $rootfs (~15 s)"
    mmdebstrap --quiet --variant=minbase --include=python3,procps bookworm "$rootfs"
fi
for m in "${mounts[@]}"; do
    mkdir -p "$rootfs$m"
done
# Present, so that ch-run binds the host's over them: node names (MASTER_ADDR) must resolve inside as outside.
touch "$rootfs/etc/hosts" "$rootfs/etc/resolv.conf"
rm -f "$rootfs/etc/hpcdist-image"  # linked from --from's image: a new file, not a write through the link
echo "hpcdist image, built $(date -u +%FT%TZ) from Debian bookworm; mount points: ${mounts[*]}" > "$rootfs/etc/hpcdist-image"

if [ "$oci" = 1 ]; then
    command -v runc >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q runc; }
    # Slurm's srun --container fills in the process (args, env, cwd) itself; the bundle gives the root, the
    # host's network (gloo, NCCL and the rendezvous must reach the other nodes) and the bind mounts.
    (cd "$out" && runc spec)
    python3 - "$out/config.json" "${mounts[@]}" <<'PY'
import json, sys
path, mounts = sys.argv[1], sys.argv[2:]
spec = json.load(open(path))
spec["root"] = {"path": "rootfs", "readonly": True}
spec["process"]["terminal"] = False
# Only the mount namespace: the host's network (rendezvous), hostname (node names), PIDs (the watchdog and the
# drill find ranks by pid) and shared memory are the job's, as outside.
spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] == "mount"]
spec.pop("hostname", None)
spec["linux"].pop("uidMappings", None)
spec["linux"].pop("gidMappings", None)
spec["mounts"] += [{"destination": m, "type": "bind", "source": m, "options": ["rbind", "rw"]} for m in mounts]
spec["mounts"] += [{"destination": f, "type": "bind", "source": f, "options": ["bind", "ro"]}
                   for f in ("/etc/hosts", "/etc/resolv.conf")]
json.dump(spec, open(path, "w"), indent=1)
PY
fi
log "image ready: $out ($(du -sh "$out" | cut -f1)); mount points: ${mounts[*]}"
