#!/bin/sh
# The guest's PID 1 (thinbox-guest-vm): mounts the kernel filesystems, loads the
# modules the image carries (in dependency order), then hands the virtio
# serial port "thinbox.console" to the host's command loop. Kernel messages and this
# script's own output go to ttyS0, which the host logs to kernel.log.
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
while read -r m; do
  insmod "/lib/modules/$m" || echo "thinbox-init: insmod $m failed"
done < /etc/thinbox/modules
ip link set lo up 2>/dev/null
# The host's port appears once the device has told the driver about it.
port=
i=0
while [ -z "$port" ] && [ $i -lt 200 ]; do
  for p in /sys/class/virtio-ports/*; do
    if [ "$(cat "$p/name" 2>/dev/null)" = thinbox.console ] && [ -c "/dev/${p##*/}" ]; then port=/dev/${p##*/}; fi
  done
  [ -n "$port" ] || { sleep 0.05; i=$((i+1)); }
done
if [ -z "$port" ]; then
  echo "thinbox-init: no virtio port thinbox.console: the host cannot reach this guest; powering off"
  poweroff -f
fi
echo "thinbox-init: modules loaded, console on $port"
# PID 1 must not exit: if the loop ever ends, the kernel panics and, with
# panic=-1 and QEMU's -no-reboot, the VM stops, which the host reports.
exec sh /etc/thinbox/console "$port"
