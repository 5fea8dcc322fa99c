#!/bin/busybox sh
# PID 1 of the nested-KVM host (see docs/nested-host.md): loads kvm_amd, mounts the host's
# file system (shared by virtiofsd) at /host, gives it this machine's /dev, /proc and /sys, a
# fresh tmpfs at /dev/shm and at the run's private temporary directory, runs the command script
# named on the kernel command line in a chroot there, prints its exit status with the run's
# token, and powers off.
/bin/busybox --install -s /bin
export PATH=/bin

finish() {
    echo "thaw-nested-host: exit $token $1"
    sync
    poweroff -f
    sleep 3600
}

fail() {
    echo "thaw-nested-host: $*"
    finish 125
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
run=
tmp=
token=
for word in $(cat /proc/cmdline 2>/dev/null); do
    case "$word" in
        thaw.nested.run=*) run="${word#*=}" ;;
        thaw.nested.tmp=*) tmp="${word#*=}" ;;
        thaw.nested.token=*) token="${word#*=}" ;;
    esac
done
[ -n "$run" ] && [ -n "$tmp" ] || fail "no thaw.nested.run= or thaw.nested.tmp= on the command line"

release=$(uname -r)
while read -r module; do
    insmod "/lib/modules/$release/$module" || fail "cannot load $module"
done < "/lib/modules/$release/thaw-modules.load"
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd: does the emulated CPU offer SVM?"

mkdir -p /host
mount -t virtiofs host /host || fail "cannot mount the host's file system (virtiofs)"
mount --rbind /dev /host/dev || fail "cannot bind /dev"
mount -t proc proc /host/proc || fail "cannot mount /host/proc"
mount -t sysfs sysfs /host/sys || fail "cannot mount /host/sys"
# cgroup v2, as a systemd host has it: thawd gives each jailed worker a cgroup of its own there.
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup || echo "thaw-nested-host: no cgroup v2"
mkdir -p /host/dev/shm && mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
# The command's TMPDIR: RAM of this machine, where Unix sockets work and nothing reaches the host.
mount -t tmpfs -o mode=1777 tmpfs "/host$tmp" || fail "cannot mount the temporary directory"
ip link set lo up || fail "cannot bring up the loopback interface"

cd /
chroot /host /bin/sh "$run" </dev/null
finish $?
