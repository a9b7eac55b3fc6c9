#!/usr/bin/env bash
# Builds a Debian 12 Vagrant box for the libvirt provider locally, from the Debian mirror apt uses here, without
# loop mounts: debootstrap a root filesystem, `mke2fs -d` it into an ext4 image, `qemu-img convert` to qcow2. The disk
# has no partition table and no bootloader: the box's own Vagrantfile boots its kernel and initrd directly
# (vagrant-libvirt's kernel/initrd/cmd_line). It has what a Vagrant box needs (the vagrant user with Vagrant's insecure
# public key, passwordless sudo, sshd, ifupdown + DHCP on eth0, rsync) plus the packages vagrant/provision/node.sh
# installs, so emulated VMs need no apt at provisioning. Cached under target/vagrant/box/; `vagrant box add`ed as
# $WEFT_BOX_NAME (default weft-debian12). --force rebuilds everything.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${WEFT_BOX_DIR:-$repo/target/vagrant/box}"
name="${WEFT_BOX_NAME:-weft-debian12}"
size="${WEFT_BOX_SIZE:-8G}"
force=0
[ "${1:-}" = --force ] && force=1
[ "$(id -u)" = 0 ] || { echo "vagrant-box.sh: run as root (debootstrap, file ownership in the image)" >&2; exit 1; }

bash "$repo/scripts/vagrant-deps.sh" --box-only
mirror="${WEFT_DEBIAN_MIRROR:-$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
  | head -n1 | awk '{print $2}' || true)}"
mirror="${mirror:-http://deb.debian.org/debian}"
pubkey="${VAGRANT_INSECURE_PUB:-$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n1 || true)}"
[ -s "$pubkey" ] || { echo "vagrant-box.sh: Vagrant's insecure public key not found (set VAGRANT_INSECURE_PUB)" >&2; exit 1; }

mkdir -p "$out"
rootfs="$out/rootfs"
box="$out/$name.box"
if [ "$force" = 1 ]; then rm -rf "$rootfs" "$box" "$out/stage"; fi

packages=(linux-image-amd64 systemd-sysv udev dbus openssh-server sudo rsync ifupdown isc-dhcp-client iproute2 kmod
  ca-certificates curl procps less
  containerd runc containernetworking-plugins iptables ipset ipvsadm conntrack dnsutils openssl etcd-server etcd-client
  iperf3) # iperf3: test-vm.sh's overlay benchmark
# The stamp holds the package list: a changed list means a fresh debootstrap.
if [ "$(cat "$rootfs/.weft-debootstrap-done" 2>/dev/null)" != "${packages[*]}" ]; then
  rm -rf "$rootfs" "$box"
  echo "vagrant-box.sh: debootstrap bookworm from $mirror into $rootfs"
  debootstrap --include="$(IFS=,; echo "${packages[*]}")" bookworm "$rootfs" "$mirror"
  echo "${packages[*]}" >"$rootfs/.weft-debootstrap-done"
fi

if [ ! -e "$rootfs/.weft-configured" ]; then
  echo "vagrant-box.sh: configuring the root filesystem"
  in_root() { chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
  echo "deb $mirror bookworm main" >"$rootfs/etc/apt/sources.list"
  printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$rootfs/etc/fstab"
  echo vagrant >"$rootfs/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 vagrant\n::1 localhost ip6-localhost ip6-loopback\n' >"$rootfs/etc/hosts"
  printf 'auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n\nsource /etc/network/interfaces.d/*\n' \
    >"$rootfs/etc/network/interfaces"
  mkdir -p "$rootfs/etc/network/interfaces.d"
  # Installed but not running in every VM: node.sh enables what a node needs.
  for s in etcd containerd; do in_root systemctl disable "$s.service" >/dev/null 2>&1 || true; done
  # Every VM makes its own host keys on first boot.
  rm -f "$rootfs"/etc/ssh/ssh_host_*
  mkdir -p "$rootfs/etc/systemd/system/ssh.service.d"
  printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
    >"$rootfs/etc/systemd/system/ssh.service.d/weft-hostkeys.conf"
  printf 'UseDNS no\n' >"$rootfs/etc/ssh/sshd_config.d/vagrant.conf"
  in_root systemctl enable ssh.service networking.service >/dev/null
  # Serial console: the console logs test-vm.sh keeps on failure.
  in_root systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1 || true
  if ! in_root id vagrant >/dev/null 2>&1; then
    in_root useradd --create-home --shell /bin/bash vagrant
  fi
  echo 'vagrant:vagrant' | in_root chpasswd
  echo 'root:vagrant' | in_root chpasswd
  printf 'vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n' >"$rootfs/etc/sudoers.d/vagrant"
  chmod 0440 "$rootfs/etc/sudoers.d/vagrant"
  install -d -m 0700 "$rootfs/home/vagrant/.ssh"
  install -m 0600 "$pubkey" "$rootfs/home/vagrant/.ssh/authorized_keys"
  in_root chown -R vagrant:vagrant /home/vagrant/.ssh
  in_root apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
  touch "$rootfs/.weft-configured"
fi

if [ ! -s "$box" ]; then
  stage="$out/stage"
  rm -rf "$stage"
  mkdir -p "$stage"
  kernel="$(ls "$rootfs"/boot/vmlinuz-* | sort -V | tail -n1)"
  initrd="$(ls "$rootfs"/boot/initrd.img-* | sort -V | tail -n1)"
  cp "$kernel" "$stage/vmlinuz"
  cp "$initrd" "$stage/initrd.img"
  echo "vagrant-box.sh: ext4 image ($size) from $rootfs (mke2fs -d, no loop mount)"
  mke2fs -q -F -t ext4 -L root -d "$rootfs" "$stage/root.raw" "$size"
  qemu-img convert -f raw -O qcow2 "$stage/root.raw" "$stage/box.img"
  rm -f "$stage/root.raw"
  gib="${size%G}"
  printf '{"provider":"libvirt","format":"qcow2","virtual_size":%s}\n' "$gib" >"$stage/metadata.json"
  cat >"$stage/Vagrantfile" <<'BOXVF'
# The box's defaults: no bootloader on the disk, so libvirt boots the kernel and initrd shipped beside it.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0 biosdevname=0"
    lv.disk_bus = "virtio"
  end
end
BOXVF
  tar -C "$stage" -cf "$box.tmp" metadata.json Vagrantfile box.img vmlinuz initrd.img
  mv "$box.tmp" "$box"
  rm -rf "$stage"
fi

if [ "$force" = 1 ] || [ "$box" -nt "$out/.added" ] || ! vagrant box list 2>/dev/null | grep -q "^$name "; then
  vagrant box add --force --name "$name" "$box"
  touch "$out/.added"
fi
# qemu runs as libvirt-qemu and cannot read the box's copy under root's ~/.vagrant.d: a readable copy where libvirt
# keeps kernels (the Vagrantfile's WEFT_BOX_KERNEL/WEFT_BOX_INITRD point at it).
boot=/var/lib/libvirt/boot
mkdir -p "$boot"
tar -C "$boot" -xf "$box" vmlinuz initrd.img
mv "$boot/vmlinuz" "$boot/$name-vmlinuz"
mv "$boot/initrd.img" "$boot/$name-initrd.img"
chmod 0644 "$boot/$name-vmlinuz" "$boot/$name-initrd.img"
echo "vagrant-box.sh: box $name ($box); kernel and initrd also in $boot/$name-{vmlinuz,initrd.img}"
