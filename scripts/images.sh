#!/usr/bin/env bash
# Builds weft's two local container images as docker-archive tarballs, idempotently (cached by content):
#   weft.local/pause:1    the sandbox image, from kubelet-assets/pause.c (gcc -static -Os)
#   weft.local/busybox:1  Debian's busybox-static with applet symlinks (sh, httpd, wget, nc, sleep, ...)
# Output: $WEFT_IMAGES_DIR (default <repo>/target/images)/{pause,busybox}.tar; prints that directory.
# Import one with `weft image import FILE --address SOCKET` (containerd's k8s.io namespace).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${WEFT_IMAGES_DIR:-$repo/target/images}"
mkdir -p "$out"

need=()
command -v gcc >/dev/null 2>&1 || need+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v containerd >/dev/null 2>&1 || need+=(containerd)
command -v runc >/dev/null 2>&1 || need+=(runc)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# A docker-archive (manifest.json + config + one layer) of rootfs directory $1 as image $2, command $3 (JSON array).
archive() {
  local rootfs="$1" tag="$2" cmd="$3" dest="$4" work
  work="$(mktemp -d)"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$rootfs" -cf "$work/layer.tar" .
  local diff
  diff="$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
  mkdir -p "$work/$diff"
  mv "$work/layer.tar" "$work/$diff/layer.tar"
  printf '{"architecture":"amd64","os":"linux","created":"1970-01-01T00:00:00Z","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"weft scripts/images.sh"}]}' \
    "$cmd" "$diff" >"$work/config.json"
  local cfg
  cfg="$(sha256sum "$work/config.json" | cut -d' ' -f1)"
  mv "$work/config.json" "$work/$cfg.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' "$cfg" "$tag" "$diff" >"$work/manifest.json"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work" -cf "$dest.tmp" manifest.json "$cfg.json" "$diff"
  mv "$dest.tmp" "$dest"
  rm -rf "$work"
}

# The key of a build: its inputs' content; a tarball whose key file matches is up to date.
build_if_changed() {
  local name="$1" key="$2"
  shift 2
  if [ -e "$out/$name.tar" ] && [ "$(cat "$out/$name.key" 2>/dev/null)" = "$key" ]; then
    return 0
  fi
  "$@"
  echo "$key" >"$out/$name.key"
}

build_pause() {
  local root
  root="$(mktemp -d)"
  gcc -static -Os -s -o "$root/pause" "$repo/kubelet-assets/pause.c"
  archive "$root" weft.local/pause:1 '["/pause"]' "$out/pause.tar"
  rm -rf "$root"
}

APPLETS=(sh ash httpd wget nc sleep env cat echo ls ps kill true false test mkdir rm touch grep hostname id ip
  ifconfig netstat printf head tail wc sed awk date uname top mount nslookup ping tr seq sync cut)

build_busybox() {
  local root
  root="$(mktemp -d)"
  mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/var/www" "$root/proc" "$root/sys" "$root/dev"
  chmod 1777 "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for a in "${APPLETS[@]}"; do ln -sf busybox "$root/bin/$a"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
  echo 'hello from weft.local/busybox:1' >"$root/var/www/index.html"
  archive "$root" weft.local/busybox:1 '["sh"]' "$out/busybox.tar"
  rm -rf "$root"
}

build_if_changed pause "$(cat "$repo/kubelet-assets/pause.c" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)" build_pause
build_if_changed busybox "$( (sha256sum /bin/busybox; cat "${BASH_SOURCE[0]}") | sha256sum | cut -d' ' -f1)" build_busybox
echo "$out"
