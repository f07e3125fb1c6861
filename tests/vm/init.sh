#!/bin/busybox sh
# The test guest's /init: load the virtio and virtiofs modules, mount the share whose tag the kernel
# command line names (sopsnix.tag=TAG), then print what the guest sees of it to the serial console
# every second, between "@@tick N begin" and "@@tick N end" lines that tests/vm/guest.py parses.
# With sopsnix.probe=1 it only reports that it booted and powers off (the accelerator probe).

/bin/busybox mkdir -p /bin /proc /sys /dev /mnt/share
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 0 > /proc/sys/kernel/printk

if grep -q 'sopsnix.probe=1' /proc/cmdline; then
    echo "@@probe ok"
    poweroff -f
fi

for module in $(cat /modules/load-order); do
    insmod "/modules/$module" || echo "@@insmod failed: $module"
done

tag=$(sed -n 's/.*sopsnix\.tag=\([^ ]*\).*/\1/p' /proc/cmdline)
if ! mount -t virtiofs "$tag" /mnt/share; then
    echo "@@mount failed: $tag"
    poweroff -f
fi
echo "@@mounted $tag"

tick=0
while :; do
    tick=$((tick + 1))
    echo "@@tick $tick begin"
    echo "@@ls"
    ls -la /mnt/share
    echo "@@files"
    find /mnt/share -type f | sort | while read -r file; do
        echo "@@file ${file#/mnt/share/}"
        cat "$file"
        echo
    done
    echo "@@stat"
    stat /mnt/share
    echo "@@tick $tick end"
    sleep 1
done
