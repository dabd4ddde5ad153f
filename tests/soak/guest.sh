#!/bin/sh
# The guest's part of the chaos soak (tests/tests/soak.rs), run by /init at every boot.
# Every byte the host checks is moved by kernel copies (cat, tmpfs, the tty layer): on the
# nested KVM the soak runs on, guest user code that copies data with SSE stores now and then
# writes zeros (resources/README.md), so no user-space copy carries checked data, except
# vproxy's endpoint (minivmm-vp), whose damage the host reports apart.
P=/dev/virtio-ports
for t in 1 2 3; do
	stty -F /dev/ttyS$t 115200 raw -echo ignbrk -ixon -ixoff -crtscts clocal
done
ip link set lo up
rm -f /tmp/stop
# Echo channels: what the host sends comes back on the same channel. This shell holds them
# open from here on (a tty nobody has open drops what it receives); a virtio port's read ends
# when its host side goes away, and the loop waits for the host to come back.
exec 4<>/dev/ttyS1 5<>$P/soak.v0 6<>$P/soak.v2
cat <&4 >&4 &
E() { (while [ ! -e /tmp/stop ]; do cat <&$1 >&$1; sleep 2; done) & }
E 5
E 6
# Writers: a pattern file (records numbered from 0) sent again and again until the host says
# stop; then the number of whole passes, which the host checks against what it received.
W() {
	(n=0; exec 3>$2
	while [ ! -e /tmp/stop ]; do cat /soak/$1 >&3 || break; n=$((n + 1)); sleep $3; done
	echo "SOAK-SENT $1 $n") &
	WP="$WP $!"
}
W c3 /dev/ttyS2 5
W c4 /dev/ttyS3 5
W v1 $P/soak.v1 1
W v3 $P/soak.v3 1
W v4 $P/soak.v4 1
# The port the host adds and removes: found by name (no /dev/virtio-ports link for it).
(while [ ! -e /tmp/stop ]; do
	for p in /sys/class/virtio-ports/*; do
		n=; read -r n <$p/name 2>/dev/null
		[ "$n" = soak.hot ] && cat /soak/hot >/dev/${p##*/} 2>/dev/null
	done
	sleep 1
done) &
# vproxy: an echo service behind the guest endpoint.
L=; for i in $(seq 16); do L="$L -l"; done
nc $L -p 7 -e cat &
minivmm-vp --channel $P/soak.vp --iforward echo:127.0.0.1:7 &
echo SOAK-UP
# The host writes "stop" to the control port when the soak is over (a read of a port whose
# host side is not connected ends at once: try again).
x=
until [ "$x" = stop ]; do read -r x <$P/soak.ctl || sleep 1; done
touch /tmp/stop
wait $WP
grep -h . /proc/tty/driver/serial | sed 's/^/SOAK-UART /'
echo SOAK-DONE
while :; do sleep 1000; done
